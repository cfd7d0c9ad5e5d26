"""`sendvae convert-pickle`: the one explicit opt-in that unpickles a trusted legacy checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sendvae.cli import main
from sendvae.errors import UserError
from sendvae.models.vae import build_vae, vae_fingerprint
from sendvae.models.vae_formats import diffusers_to_ldm, load_vae
from sendvae.pickles import convert_pickle


class Marker:
    """A Python object in the pickle: weights_only=True refuses it; unpickling it writes ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        Path(self.path).write_text("unpickled")


def _legacy_vae_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, Path]:
    vae = build_vae("tiny-f4c4")
    with torch.no_grad():
        for i, p in enumerate(vae.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    marker = tmp_path / "unpickled"
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(vae).items()},
                "callbacks": Marker(marker), "global_step": 7}, path)
    return path, vae, marker


def test_without_trust_pickle_nothing_is_unpickled(tmp_path: Path, capsys) -> None:
    src, _, marker = _legacy_vae_checkpoint(tmp_path)
    with pytest.raises(UserError, match=f"refusing to unpickle {src}.*--trust-pickle"):
        convert_pickle(src, tmp_path / "out.safetensors")
    assert main(["convert-pickle", str(src), str(tmp_path / "out.safetensors")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_the_vae_loader_refuses_the_pickle_and_names_the_command(tmp_path: Path) -> None:
    src, _, marker = _legacy_vae_checkpoint(tmp_path)
    with pytest.raises(UserError) as info:
        load_vae(src)
    assert f"sendvae convert-pickle {src} {tmp_path / 'lightning.safetensors'} --trust-pickle" in str(info.value)
    assert not marker.exists()


def test_converted_file_loads_in_the_vae_loader_with_the_same_weights(tmp_path: Path, capsys) -> None:
    src, vae, marker = _legacy_vae_checkpoint(tmp_path)
    out = tmp_path / "lightning.safetensors"
    assert main(["convert-pickle", str(src), str(out), "--trust-pickle"]) == 0
    assert marker.exists()  # the user opted in: the pickle really was unpickled
    assert capsys.readouterr().out.strip() == str(out)
    tensors = load_file(str(out))
    assert "global_step" not in tensors and "state_dict.first_stage_model.encoder.conv_in.weight" in tensors
    loaded = load_vae(out)
    assert vae_fingerprint(loaded) == vae_fingerprint(vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).mean, vae.encode(x).mean, atol=0, rtol=0)


def test_entry_picks_a_nested_dict_and_a_wrong_one_lists_the_keys(tmp_path: Path) -> None:
    src = tmp_path / "sit.pt"
    ema, model = {"w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)}
    torch.save({"train": {"ema": ema, "model": model}, "args": Marker(tmp_path / "m")}, src)
    out = convert_pickle(src, tmp_path / "ema.safetensors", trust_pickle=True, entry="train.ema")
    assert list(load_file(str(out))) == ["w"] and torch.equal(load_file(str(out))["w"], ema["w"])
    with pytest.raises(UserError, match=r"no entry 'train\.emma' \(at 'emma': \['ema', 'model'\]\)"):
        convert_pickle(src, tmp_path / "x.safetensors", trust_pickle=True, entry="train.emma")
