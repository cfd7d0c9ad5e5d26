"""SIGKILL at random and at chosen points of every long command, then the same command again.

For ``train-vae``, ``train-sit``, ``cache-latents``, ``sample`` and ``data prepare``: the command
runs in a child process that is killed (SIGKILL to its process group: no handler runs, no file is
closed) after a delay drawn uniformly over the duration of its work, for two seeds. What the kill
leaves must be valid or visibly unfinished, and running the same command again must end with
exactly what an uninterrupted run writes: bitwise-equal weights, optimiser states, EMA and metrics
for training (CPU, fp32), identical arrays for the cache, the samples and the store.

Chosen points (hooks in the child) put the kill where a random delay rarely lands: inside a
checkpoint write, between a checkpoint and the ``latest`` pointer, while publishing the final
model, and between writing the samples file and its settings file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sendvae.data.latents import open_cache
from sendvae.data.store import ImageStore, read_manifest
from sendvae.errors import UserError
from sendvae.train.checkpoint import list_checkpoints, load_checkpoint, load_latest

from ._cli import (
    SIT_PUBLISHED,
    VAE_PUBLISHED,
    Reference,
    cache_args,
    prepare_args,
    run_cli,
    run_cli_ok,
    sample_args,
    sit_args,
    vae_args,
)
from ._compare import assert_same_cache, assert_same_samples, assert_same_store, assert_same_training_run
from ._run import kill_at_random_point, run_and_kill, sendvae_argv

SEEDS = (0, 1)


def _remover(path: Path):
    return lambda: shutil.rmtree(path, ignore_errors=True)


def assert_only_whole_checkpoints(run: Path) -> None:
    """Every checkpoint folder a killed run left verifies (a half-written one stays a hidden .tmp folder)."""
    found = list_checkpoints(run / "checkpoints")
    for checkpoint in found:
        load_checkpoint(checkpoint)  # raises CheckpointError on a missing file or a checksum mismatch
    hidden = [p.name for p in (run / "checkpoints").glob(".tmp-*")] if (run / "checkpoints").is_dir() else []
    print(f"the kill left checkpoints {[p.name for p in found]}, unfinished {hidden}")


# ----------------------------------------------------------------------------------------------
# SIGKILL after a random delay


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_train_vae_killed_at_random_resumes_to_the_uninterrupted_result(vae_reference: Reference, tmp_path: Path,
                                                                        seed: int) -> None:
    run = tmp_path / "run"
    args = vae_args(run)
    kill_at_random_point(sendvae_argv(args), lambda: (run / "config.yaml").exists(), vae_reference.seconds, seed,
                         tmp_path / "logs", _remover(run))
    assert_only_whole_checkpoints(run)
    run_cli_ok(args)
    assert_same_training_run(vae_reference.path, run, VAE_PUBLISHED)
    assert not (run / ".lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_train_sit_killed_at_random_resumes_to_the_uninterrupted_result(sit_reference: Reference,
                                                                        cache_reference: Reference, tmp_path: Path,
                                                                        seed: int) -> None:
    run = tmp_path / "run"
    args = sit_args(run, cache_reference.path)
    kill_at_random_point(sendvae_argv(args), lambda: (run / "config.yaml").exists(), sit_reference.seconds, seed,
                         tmp_path / "logs", _remover(run))
    assert_only_whole_checkpoints(run)
    run_cli_ok(args)
    assert_same_training_run(sit_reference.path, run, SIT_PUBLISHED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_cache_latents_killed_at_random_resumes_to_the_same_cache(cache_reference: Reference, stage2_vae: Path,
                                                                  tmp_path: Path, seed: int) -> None:
    out = tmp_path / "cache"
    args = cache_args(out, stage2_vae)
    kill_at_random_point(sendvae_argv(args), lambda: (out / "plan.json").exists(), cache_reference.seconds, seed,
                         tmp_path / "logs", _remover(out))
    if not (out / "manifest.json").exists():
        with pytest.raises(UserError, match="not a complete latent cache.*interrupted"):
            open_cache(out)
    run_cli_ok(args)
    assert_same_cache(cache_reference.path, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sample_killed_at_random_resumes_to_the_same_samples(sample_reference: Reference, sit_reference: Reference,
                                                             tmp_path: Path, seed: int) -> None:
    out, png = tmp_path / "samples.npz", tmp_path / "png"
    args = sample_args(out, sit_reference.path, png)
    parts = Path(f"{out}.parts")
    kill_at_random_point(sendvae_argv(args), lambda: (parts / "settings.json").exists(), sample_reference.seconds,
                         seed, tmp_path / "logs", lambda: (out.unlink(missing_ok=True), _remover(parts)(),
                                                           _remover(png)()))
    if out.exists():  # killed after the npz was renamed into place: it is whole; --overwrite finishes the job
        run_cli_ok([*args, "--overwrite"])
    else:
        run_cli_ok(args)
    assert_same_samples(sample_reference.path, out)
    ref_png = sample_reference.path.parent / "png"
    assert sorted(p.name for p in png.iterdir()) == sorted(p.name for p in ref_png.iterdir())
    for path in png.iterdir():
        assert path.read_bytes() == (ref_png / path.name).read_bytes(), path


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_data_prepare_killed_at_random_resumes_to_the_same_store(store_reference: Reference, image_folder: Path,
                                                                 tmp_path: Path, seed: int) -> None:
    out = tmp_path / "store"
    args = prepare_args(image_folder, out)
    kill_at_random_point(sendvae_argv(args), lambda: (out / "plan.json").exists(), store_reference.seconds, seed,
                         tmp_path / "logs", _remover(out))
    if not (out / "manifest.json").exists():
        with pytest.raises(UserError, match="unfinished store"):
            read_manifest(out)
    run_cli_ok(args)
    assert_same_store(store_reference.path, out)
    assert ImageStore(out).verify() == json.loads((out / "manifest.json").read_text())["content_hash"]


# ----------------------------------------------------------------------------------------------
# SIGKILL at chosen points

# Checkpoints of the stage-1 reference run hold 4 tensor files each (model.vae, model.alignment,
# model.disc, ema.vae): the 6th write is the second file of the second checkpoint (16 -> 32 images).
_KILL_ON_CALL = """
import os, signal
import {module} as target
_calls = [0]
_original = target.{name}
def _dying(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(*args, **kwargs)
target.{name} = _dying
"""


def _kill_on_call(module: str, name: str, call: int) -> str:
    return _KILL_ON_CALL.format(module=module, name=name, call=call)


@pytest.mark.slow
@pytest.mark.parametrize("module, name, call, complete", [
    ("sendvae.train.checkpoint", "save_file", 6, ["ckpt-000000000016"]),  # inside the second checkpoint's files
    ("sendvae.train.checkpoint", "_write_latest", 2, ["ckpt-000000000016", "ckpt-000000000032"]),  # before `latest`
], ids=["inside-checkpoint-write", "before-latest-pointer"])
def test_train_vae_killed_while_checkpointing_resumes_exactly(vae_reference: Reference, tmp_path: Path, module: str,
                                                              name: str, call: int, complete: list[str]) -> None:
    run = tmp_path / "run"
    args = vae_args(run)
    outcome = run_and_kill(sendvae_argv(args, _kill_on_call(module, name, call)), lambda: False, 0.0,
                           tmp_path / "logs")
    assert outcome.returncode == -9, outcome.describe()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == complete
    assert_only_whole_checkpoints(run)
    assert load_latest(run / "checkpoints").path.name == "ckpt-000000000016"  # what `latest` names
    run_cli_ok(args)
    assert_same_training_run(vae_reference.path, run, VAE_PUBLISHED)
    assert not list((run / "checkpoints").glob(".tmp-*")), "the dead process's temporary checkpoint was not removed"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "sit"])
def test_killed_while_publishing_the_final_model_republishes_on_rerun(stage: str, vae_reference: Reference,
                                                                     sit_reference: Reference,
                                                                     cache_reference: Reference,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    if stage == "vae":  # exports after 16, 32, 48, 64 images: die as the last one starts
        args, reference, published = vae_args(run), vae_reference, VAE_PUBLISHED
        hook = _kill_on_call("sendvae.train.vae", "save_vae", 4)
    else:  # exports after 16, ..., 96 images: die as the last one starts
        args, reference, published = sit_args(run, cache_reference.path), sit_reference, SIT_PUBLISHED
        hook = _kill_on_call("sendvae.train.sit", "save_sit_folder", 6)
    outcome = run_and_kill(sendvae_argv(args, hook), lambda: False, 0.0, tmp_path / "logs")
    assert outcome.returncode == -9, outcome.describe()
    assert load_latest(run / "checkpoints").images_seen == load_latest(reference.path / "checkpoints").images_seen
    run_cli_ok(args)
    assert_same_training_run(reference.path, run, published)


_DIE_AFTER_NPZ = """
import os, signal
from sendvae import npz
_original = npz.NpzWriter.__exit__
def _dying(self, *args):
    _original(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)
npz.NpzWriter.__exit__ = _dying
"""


@pytest.mark.slow
def test_sample_killed_between_npz_and_settings_file_keeps_a_whole_npz(sample_reference: Reference,
                                                                      sit_reference: Reference, tmp_path: Path,
                                                                      capsys) -> None:
    """The npz is renamed into place whole; the rerun of the same command recognises its job and finishes it."""
    out = tmp_path / "samples.npz"
    args = sample_args(out, sit_reference.path)
    outcome = run_and_kill(sendvae_argv(args, _DIE_AFTER_NPZ), lambda: False, 0.0, tmp_path / "logs")
    assert outcome.returncode == -9, outcome.describe()
    assert out.exists() and not out.with_suffix(".json").exists() and Path(f"{out}.parts").is_dir()
    assert not list(tmp_path.glob(".tmp-*")), "a temporary npz was left next to the samples"
    run_cli_ok(args)
    assert_same_samples(sample_reference.path, out)
    code, _ = run_cli(args)  # a finished job is not redone
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"sendvae sample: error: {out} exists; delete it or pass --overwrite"
