"""PatchGAN discriminator: the LDM / taming key layout, loading pretrained weights, refusing bad files."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from sendvae.errors import UserError
from sendvae.models.discriminator import PatchDiscriminator, load_discriminator

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# taming-transformers NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3, use_actnorm=False)
TAMING_LAYOUT = {
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4), **{f"main.3.{k}": (128,) for k in BN},
    "main.5.weight": (256, 128, 4, 4), **{f"main.6.{k}": (256,) for k in BN},
    "main.8.weight": (512, 256, 4, 4), **{f"main.9.{k}": (512,) for k in BN},
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}  # fmt: skip


def test_key_layout_matches_ldm_nlayer_discriminator() -> None:
    state = PatchDiscriminator().state_dict()
    shapes = {k: tuple(v.shape) if v.dim() else () for k, v in state.items()}
    expected = {k: (() if k.endswith("num_batches_tracked") else v) for k, v in TAMING_LAYOUT.items()}
    assert shapes == expected


def test_patch_logits_shape() -> None:
    logits = PatchDiscriminator(ndf=8)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6


def discriminator_with_stats(**kwargs: object) -> PatchDiscriminator:
    disc = PatchDiscriminator(**kwargs).train()
    disc(torch.randn(4, disc.in_channels, 32, 32))  # fill BatchNorm running statistics / ActNorm init
    return disc.eval()


@pytest.mark.parametrize("layout", ["bare", "ldm-prefix", "repa-e-entry"])
def test_pretrained_weights_load_from_every_checkpoint_layout(tmp_path, layout: str) -> None:
    disc = discriminator_with_stats(ndf=16, n_layers=2)
    state = disc.state_dict()
    if layout == "bare":
        path = tmp_path / "disc.safetensors"
        save_file(state, str(path))
    elif layout == "ldm-prefix":
        path = tmp_path / "ldm.safetensors"
        ldm = {f"loss.discriminator.{k}": v for k, v in state.items()}
        save_file({**ldm, "encoder.conv_in.weight": torch.zeros(1)}, str(path))
    else:
        path = tmp_path / "repae.pt"
        torch.save({"discriminator": state, "vae": {"encoder.conv_in.weight": torch.zeros(1)}, "steps": 5}, path)
    loaded = load_discriminator(path)
    assert (loaded.in_channels, loaded.ndf, loaded.n_layers, loaded.norm) == (3, 16, 2, "batch")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), disc(x))


def test_actnorm_weights_are_recognised(tmp_path) -> None:
    disc = discriminator_with_stats(ndf=8, n_layers=3, norm="act")
    assert "main.3.loc" in disc.state_dict() and "main.2.bias" in disc.state_dict()
    save_file(disc.state_dict(), str(tmp_path / "act.safetensors"))
    loaded = load_discriminator(tmp_path / "act.safetensors")
    assert loaded.norm == "act"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), disc(x))


def test_keys_that_do_not_fit_are_listed(tmp_path) -> None:
    state = dict(PatchDiscriminator(ndf=8).state_dict())
    del state["main.6.running_mean"]
    state["main.6.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    expected = r"bad.safetensors.*missing \['main.6.running_mean'\], unexpected \['main.6.extra'\]"
    with pytest.raises(UserError, match=expected):
        load_discriminator(tmp_path / "bad.safetensors")


def test_missing_or_pickled_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="nope.pt does not exist"):
        load_discriminator(tmp_path / "nope.pt")
    pickled = {"discriminator": PatchDiscriminator(ndf=8).state_dict(), "args": argparse.Namespace(lr=1)}
    torch.save(pickled, tmp_path / "p.pt")  # as REPA-E checkpoints do
    with pytest.raises(UserError, match=r"p\.pt holds pickled .*sendvae convert-pickle .*p\.pt .*p\.safetensors "
                                        "--trust-pickle"):
        load_discriminator(tmp_path / "p.pt")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="no NLayerDiscriminator tensors"):
        load_discriminator(tmp_path / "other.safetensors")


def test_taming_initialisation() -> None:
    disc = PatchDiscriminator()
    conv = disc.main[8].weight
    bn = disc.main[9].weight
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.05)
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(disc.main[0].bias, torch.zeros(64))
