"""Checkpoints from strangers: a pickle payload must never run, whichever loader meets it.

The payload's unpickling would create a marker file (``open(marker, "w")``); each file is first
checked to be live (unpickling it unsafely does create the marker), then handed to every loader
that reads weights from a path: the VAE (LDM checkpoint, diffusers folder, sendvae folder, latent
statistics), the discriminator, the teachers, the SiT (checkpoint file and run folder), the
Inception weights, the training resume (optimiser and tensor files of a checkpoint whose
checksums were forged to match), the image store's arrays, the evaluator's reference npz and the
YAML configs. Each must refuse the file and the marker must never appear. There is no opt-in
that loads a pickle; the VAE loader's error explains how to convert a trusted one instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from sendvae.errors import UserError
from sendvae.train.checkpoint import list_checkpoints

from ._cli import Reference, run_cli, sample_args, sit_args, vae_args
from ._files import MarkerPayload, payload_is_live, pickled_checkpoint, pickled_npy


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a loader executed the pickle payload"


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Unsafe loading really runs each crafted payload (so the tests below can fail)."""
    marker = tmp_path / "ran"
    assert payload_is_live(pickled_checkpoint(tmp_path / "evil.pt", marker), marker)
    np.load(pickled_npy(tmp_path / "evil.npy", marker), allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(_yaml_payload(marker))
    assert marker.exists()


def _yaml_payload(marker: Path) -> str:
    return f"optim: !!python/object/apply:io.open [{str(marker)!r}, w]\n"


def _forge_checksum(checkpoint: Path, filename: str) -> None:
    """Update state.json so that a replaced file passes verification (an attacker controls the folder)."""
    state = json.loads((checkpoint / "state.json").read_text())
    state["files"][filename] = hashlib.sha256((checkpoint / filename).read_bytes()).hexdigest()
    (checkpoint / "state.json").write_text(json.dumps(state))


# ----------------------------------------------------------------------------------------------
# Library loaders: refused with a UserError naming the file


def _vae_checkpoint(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.vae_formats import load_vae

    path = pickled_checkpoint(tmp / "vavae-f16d32.ckpt", marker)
    return lambda: load_vae(path)


def _diffusers_folder(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import load_vae

    vae = build_vae("tiny-f4c4", resolution=16)
    vae.autoencoder.save_pretrained(str(tmp / "sd-vae"), safe_serialization=True)
    (tmp / "sd-vae" / "diffusion_pytorch_model.safetensors").unlink()
    pickled_checkpoint(tmp / "sd-vae" / "diffusion_pytorch_model.bin", marker, wrap=None)
    return lambda: load_vae(tmp / "sd-vae")


def _sendvae_folder(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import load_vae, save_vae

    folder = save_vae(build_vae("tiny-f4c4", resolution=16), tmp / "vae")
    pickled_checkpoint(folder / "model.safetensors", marker)  # a pickle under a safetensors name
    return lambda: load_vae(folder)


def _latent_stats(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.vae_formats import load_latent_stats

    path = pickled_checkpoint(tmp / "vavae-latents-stats.pt", marker)
    return lambda: load_latent_stats(path)


def _discriminator(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.discriminator import load_discriminator

    path = pickled_checkpoint(tmp / "repae-disc.pt", marker, wrap="discriminator")
    return lambda: load_discriminator(path)


def _effnet_teacher(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.teachers import build_teacher

    path = pickled_checkpoint(tmp / "effnet.pth", marker)
    return lambda: build_teacher("effnet-lite0", weights=path, grid=4)


def _dinov2_teacher_folder(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.teachers import build_teacher

    pickled_checkpoint(tmp / "dinov2" / "pytorch_model.bin", marker)
    return lambda: build_teacher("dinov2-s", weights=tmp / "dinov2", grid=2)


def _sit_checkpoint(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.models.sit_formats import load_sit

    path = pickled_checkpoint(tmp / "last.pt", marker, wrap="ema")
    return lambda: load_sit(path)


def _inception(tmp: Path, marker: Path) -> Callable[[], object]:
    from sendvae.eval.inception import read_inception_state

    path = pickled_checkpoint(tmp / "pt_inception-2015-12-05-6726825d.pth", marker)
    return lambda: read_inception_state(path)


def _store_labels(tmp: Path, marker: Path, store: Path) -> Callable[[], object]:
    from sendvae.data.store import ImageStore

    copy = Path(shutil.copytree(store, tmp / "store"))
    pickled_npy(copy / "shards" / "labels_00000.npy", marker)
    return lambda: ImageStore(copy)


def _store_images(tmp: Path, marker: Path, store: Path) -> Callable[[], object]:
    from sendvae.data.store import ImageStore

    copy = Path(shutil.copytree(store, tmp / "store"))
    pickled_npy(copy / "shards" / "images_00001.npy", marker)
    return lambda: ImageStore(copy)


LOADERS = {
    "vae-ldm-checkpoint": (_vae_checkpoint, "vavae-f16d32.ckpt"),
    "vae-diffusers-bin": (_diffusers_folder, "diffusion_pytorch_model.bin"),
    "vae-sendvae-folder": (_sendvae_folder, "model.safetensors"),
    "vae-latent-stats": (_latent_stats, "vavae-latents-stats.pt"),
    "discriminator": (_discriminator, "repae-disc.pt"),
    "teacher-effnet-file": (_effnet_teacher, "effnet.pth"),
    "teacher-dinov2-folder": (_dinov2_teacher_folder, "pytorch_model.bin"),
    "sit-checkpoint": (_sit_checkpoint, "last.pt"),
    "inception-weights": (_inception, "pt_inception-2015-12-05-6726825d.pth"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loader_refuses_a_pickle_payload_naming_the_file(loader: str, tmp_path: Path, marker: Path) -> None:
    build, filename = LOADERS[loader]
    load = build(tmp_path, marker)
    with pytest.raises(UserError) as info:
        load()
    assert filename in str(info.value)


def test_weights_only_holds_even_when_the_environment_asks_torch_otherwise(tmp_path: Path, marker: Path,
                                                                          monkeypatch) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes torch.load calls that do not pass weights_only."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for build in (_vae_checkpoint, _discriminator, _sit_checkpoint):
        with pytest.raises(UserError):
            build(tmp_path, marker)()


def test_vae_refusal_explains_the_only_way_to_use_a_trusted_legacy_file(tmp_path: Path, marker: Path) -> None:
    """Loaders never unpickle; the error names the one explicit opt-in, `sendvae convert-pickle --trust-pickle`."""
    with pytest.raises(UserError) as info:
        _vae_checkpoint(tmp_path, marker)()
    message = str(info.value)
    assert "sendvae never unpickles code" in message and "weights_only=False" not in message
    assert (f"sendvae convert-pickle {tmp_path / 'vavae-f16d32.ckpt'} {tmp_path / 'vavae-f16d32.safetensors'} "
            "--trust-pickle") in message


@pytest.mark.parametrize("which", ["labels", "images"])
def test_store_refuses_an_array_holding_a_pickle(which: str, store_reference: Reference, tmp_path: Path,
                                                 marker: Path) -> None:
    load = (_store_labels if which == "labels" else _store_images)(tmp_path, marker, store_reference.path)
    with pytest.raises(UserError, match=rf"store file .*{which}_0000\d\.npy is unreadable"):
        load()


def test_yaml_config_with_a_python_tag_is_refused(tmp_path: Path, marker: Path, capsys) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(_yaml_payload(marker))
    code, _ = run_cli(["train-vae", "--out", tmp_path / "run", "--config", config])
    assert code == 2 and f"config file {config} is not valid YAML" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The command line: exit 2, the file named, no traceback, no payload


CLI_CASES = {
    "vae-info": lambda tmp, m, refs: ["vae", "info", pickled_checkpoint(tmp / "vae.ckpt", m)],
    "train-vae-disc-init": lambda tmp, m, refs: vae_args(tmp / "run", "loss.gan_weight=0.1",
                                                         f"loss.disc_init={pickled_checkpoint(tmp / 'd.pt', m)}"),
    "train-vae-teacher-weights": lambda tmp, m, refs: vae_args(
        tmp / "run", f"teacher.weights={pickled_checkpoint(tmp / 'effnet.pth', m)}"),
    "train-vae-init": lambda tmp, m, refs: vae_args(tmp / "run", f"model.init={pickled_checkpoint(tmp / 'v.pt', m)}"),
    "sample-sit-file": lambda tmp, m, refs: [*sample_args(tmp / "s.npz", pickled_checkpoint(tmp / "sit.pt", m, "ema")),
                                             "--vae", refs["vae"]],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_command_refuses_a_pickle_payload(case: str, tmp_path: Path, marker: Path, stage2_vae: Path,
                                          capsys) -> None:
    args = [str(a) for a in CLI_CASES[case](tmp_path, marker, {"vae": stage2_vae})]
    code, _ = run_cli(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path) in err.split(": error: ", 1)[1]


# ----------------------------------------------------------------------------------------------
# Training resume from a checkpoint folder someone else wrote


def _tampered_sit_run(reference: Path, tmp: Path, filename: str, marker: Path, forge: bool) -> tuple[Path, Path]:
    run = Path(shutil.copytree(reference, tmp / "run"))
    newest = list_checkpoints(run / "checkpoints")[-1]
    pickled_checkpoint(newest / filename, marker)
    if forge:
        _forge_checksum(newest, filename)
    return run, newest


@pytest.mark.parametrize("filename", ["optim.sit.pt", "model.sit.safetensors"])
def test_resume_with_a_forged_checksum_never_runs_the_payload(filename: str, sit_reference: Reference,
                                                              cache_reference: Reference, tmp_path: Path,
                                                              marker: Path) -> None:
    run, _ = _tampered_sit_run(sit_reference.path, tmp_path, filename, marker, forge=True)
    code, _ = run_cli(sit_args(run, cache_reference.path, "train.total_images=112"))
    assert code == 2  # refused (the marker fixture checks that the payload never ran)


@pytest.mark.parametrize("filename", ["optim.sit.pt", "model.sit.safetensors"])
def test_resume_with_a_forged_checksum_is_one_clear_error(filename: str, sit_reference: Reference,
                                                          cache_reference: Reference, tmp_path: Path, marker: Path,
                                                          capsys) -> None:
    run, newest = _tampered_sit_run(sit_reference.path, tmp_path, filename, marker, forge=True)
    code, _ = run_cli(sit_args(run, cache_reference.path, "train.total_images=112"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and str(newest / filename) in err[-1]


def test_resume_with_a_replaced_file_falls_back_by_checksum(sit_reference: Reference, cache_reference: Reference,
                                                            tmp_path: Path, marker: Path, caplog) -> None:
    """Without forged checksums the replaced file is just damage: the previous checkpoint is used."""
    run, newest = _tampered_sit_run(sit_reference.path, tmp_path, "optim.sit.pt", marker, forge=False)
    code, _ = run_cli(sit_args(run, cache_reference.path, "train.total_images=112"))
    assert code == 0 and f"checkpoint {newest} is damaged" in caplog.text and "checksum mismatch" in caplog.text


@pytest.mark.parametrize("target", ["sit-run-folder", "reference-npz"])
def test_other_published_files_are_refused_with_a_user_error(target: str, sit_reference: Reference, tmp_path: Path,
                                                             marker: Path) -> None:
    if target == "sit-run-folder":
        from sendvae.models.sit_formats import load_sit_run

        run = Path(shutil.copytree(sit_reference.path, tmp_path / "run"))
        pickled_checkpoint(run / "sit" / "ema.safetensors", marker)
        load, name = (lambda: load_sit_run(run)), "ema.safetensors"
    else:
        from sendvae.eval.generation import read_reference_stats

        payload = np.empty(1, dtype=object)
        payload[0] = MarkerPayload(marker)
        np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=payload, mu=payload, sigma=payload)
        load, name = (lambda: read_reference_stats(tmp_path / "VIRTUAL_imagenet256_labeled.npz")), "VIRTUAL"
    with pytest.raises(UserError, match=name):
        load()
