"""Damaged checkpoints, failed checkpoint writes (disk full) and non-finite batches or gradients.

- A damaged newest checkpoint (truncated, a flipped byte, a missing file, a broken state.json) is
  caught by its checksums: resume warns naming the damaged and the used checkpoint, continues from
  the previous one and still ends bitwise equal to an uninterrupted run.
- A write error while saving (``OSError(ENOSPC)`` injected into the writers in this process, and a
  real one in a child process whose file size limit drops under the checkpoint's size) leaves the
  previous checkpoint intact and ``latest`` pointing at it, and stops the run.
- NaN / Inf in a batch, or in the gradients with a finite loss: the update is skipped (weights and
  optimiser state unchanged), counted in the summary and metrics; too many in a row stop the run
  with one line naming ``train.max_nonfinite`` and the last checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sendvae.data.latents import LatentDataset
from sendvae.train.checkpoint import list_checkpoints, load_checkpoint, load_latest
from sendvae.train.data_order import InfiniteSampler
from sendvae.train.sit import SiTStage
from sendvae.train.vae import VAEStage

from ._cli import SIT_PUBLISHED, VAE_PUBLISHED, Reference, run_cli, run_cli_ok, sit_args, vae_args
from ._compare import assert_same_tensors, assert_same_training_run
from ._run import Outcome, run, sendvae_argv

CKPT = "ckpt-{:012d}".format


def copy_run(reference: Path, dest: Path, drop_after: int | None = None) -> Path:
    """A copy of a finished run; ``drop_after`` removes the checkpoints past that many images."""
    shutil.copytree(reference, dest)
    if drop_after is not None:
        for checkpoint in list_checkpoints(dest / "checkpoints"):
            if load_checkpoint(checkpoint).images_seen > drop_after:
                shutil.rmtree(checkpoint)
        (dest / "checkpoints" / "latest").write_text(CKPT(drop_after) + "\n")
    return dest


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": lambda ckpt, stage: _truncate(ckpt / f"model.{stage}.safetensors"),
    "flipped-byte-in-optimizer": lambda ckpt, stage: _flip_a_byte(ckpt / f"optim.{stage}.pt"),
    "missing-ema-file": lambda ckpt, stage: (ckpt / f"ema.{stage}.safetensors").unlink(),
    "broken-state-json": lambda ckpt, stage: (ckpt / "state.json").write_text('{"format": "sendvae-chec'),
}


# ----------------------------------------------------------------------------------------------
# A damaged newest checkpoint


@pytest.mark.parametrize("damage, stage", [
    ("truncated-weights", "vae"), ("flipped-byte-in-optimizer", "vae"),
    ("missing-ema-file", "sit"), ("broken-state-json", "sit"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage: str, stage: str, vae_reference: Reference,
                                                                  sit_reference: Reference,
                                                                  cache_reference: Reference, tmp_path: Path,
                                                                  caplog) -> None:
    """The run's newest checkpoint is damaged after it was written: resume uses the one before it."""
    reference = vae_reference if stage == "vae" else sit_reference
    run_dir = copy_run(reference.path, tmp_path / "run")
    newest, previous = list_checkpoints(run_dir / "checkpoints")[-2:][::-1]
    DAMAGE[damage](newest, stage)
    args = vae_args(run_dir) if stage == "vae" else sit_args(run_dir, cache_reference.path)
    with caplog.at_level(logging.INFO):
        run_cli_ok(args)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(newest) in warnings[0] and f"resuming from {previous} instead" in warnings[0]
    assert "resuming from " + str(previous) in caplog.text  # the loop's own line: it did resume from there
    assert_same_training_run(reference.path, run_dir, VAE_PUBLISHED if stage == "vae" else SIT_PUBLISHED)


def test_every_checkpoint_damaged_is_one_clear_error(sit_reference: Reference, cache_reference: Reference,
                                                     tmp_path: Path, capsys) -> None:
    run_dir = copy_run(sit_reference.path, tmp_path / "run")
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        _truncate(checkpoint / "model.sit.safetensors")
    code, _ = run_cli(sit_args(run_dir, cache_reference.path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sendvae train-sit: error: no valid checkpoint under ")
    assert "all are damaged" in err[-1] and "checksum mismatch" in err[-1]
    assert "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------------------------
# Disk full while saving (simulated in this process)


def _disk_full_on_call(call: int, original, partial: bool = True):
    """A writer that fails like a full disk on its ``call``-th use, after writing half a file."""
    calls = [0]

    def writer(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            if partial:  # what a full disk leaves: the start of the file
                original(obj, path, *args, **kwargs)
                _truncate(Path(getattr(path, "name", path)))  # torch.save gets an open file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)

    return writer


@pytest.mark.parametrize("writer, call", [("save_file", 4), ("torch.save", 2)],
                         ids=["tensor-file", "optimizer-file"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_stops(writer: str, call: int,
                                                                       sit_reference: Reference,
                                                                       cache_reference: Reference, tmp_path: Path,
                                                                       monkeypatch, capsys) -> None:
    """The second checkpoint (32 images) fails half-way: one line; ckpt 16 stays whole and `latest`; rerun finishes."""
    import sendvae.train.checkpoint as checkpoint_module

    if writer == "save_file":  # 2 tensor files per checkpoint: the 4th write is the 2nd file of the 2nd one
        monkeypatch.setattr(checkpoint_module, "save_file", _disk_full_on_call(call, checkpoint_module.save_file))
    else:  # 1 optimizer file per checkpoint
        monkeypatch.setattr(torch, "save", _disk_full_on_call(call, torch.save))
    run_dir = tmp_path / "run"
    args = sit_args(run_dir, cache_reference.path)
    code, _ = run_cli(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    checkpoints = run_dir / "checkpoints"
    assert code == 2 and last.startswith(f"sendvae train-sit: error: cannot write checkpoint {checkpoints / CKPT(32)} ")
    assert "No space left on device" in last and f"previous checkpoint {checkpoints / CKPT(16)} intact" in last
    assert [p.name for p in list_checkpoints(checkpoints)] == [CKPT(16)]
    assert (checkpoints / "latest").read_text().strip() == CKPT(16)
    assert load_checkpoint(checkpoints / CKPT(16)).images_seen == 16  # verifies every checksum
    assert not (run_dir / ".lock").exists(), "the stopped run kept its lock"
    monkeypatch.undo()
    run_cli_ok(args)  # space is back: the same command resumes from ckpt 16 and finishes
    assert_same_training_run(sit_reference.path, run_dir, SIT_PUBLISHED)


def test_disk_full_while_saving_removes_the_partial_checkpoint(cache_reference: Reference, tmp_path: Path,
                                                              monkeypatch) -> None:
    import sendvae.train.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "save_file", _disk_full_on_call(4, checkpoint_module.save_file))
    run_dir = tmp_path / "run"
    code, _ = run_cli(sit_args(run_dir, cache_reference.path))
    assert code == 2 and [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [CKPT(16)]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_disk_full_while_publishing_the_vae_keeps_the_previous_one(vae_reference: Reference, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """RUN/vae is replaced as a whole: a failed export leaves the one published at the previous checkpoint."""
    from safetensors.torch import load_file

    import sendvae.models.vae_formats as vae_module

    original = vae_module.save_vae
    calls = [0]

    def save_vae_on_a_full_disk(vae, folder):
        calls[0] += 1
        if calls[0] == 2:  # the export after the second checkpoint
            def fail(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")
            monkeypatch.setattr("safetensors.torch.save_file", fail)
        return original(vae, folder)

    monkeypatch.setattr("sendvae.train.vae.save_vae", save_vae_on_a_full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="No space left on device"):
        run_cli(vae_args(run_dir))
    published = load_file(str(run_dir / "vae" / "model.safetensors"))
    ema_16 = load_checkpoint(run_dir / "checkpoints" / CKPT(16)).tensors("ema.vae")
    assert_same_tensors({f"autoencoder.{k}": v for k, v in published.items()},
                        {k: v for k, v in ema_16.items() if k.startswith("autoencoder.")}, "RUN/vae")
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".vae.")], "temporary export folders left"
    assert load_latest(run_dir / "checkpoints").images_seen == 32  # the checkpoint itself was written


# ----------------------------------------------------------------------------------------------
# A real write error in a child process (file size limit), with the real writers

_FILE_SIZE_LIMIT = """
import resource
import sendvae.train.loop as loop
_calls = [0]
_original = loop.save_checkpoint
def _limited(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2:  # from the second checkpoint on, no file may grow past {limit} bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    return _original(*args, **kwargs)
loop.save_checkpoint = _limited
"""


def _size_limits(reference: Path) -> dict[str, int]:
    ckpt = list_checkpoints(reference / "checkpoints")[-1]
    tensors, optimizer = (ckpt / "model.sit.safetensors").stat().st_size, (ckpt / "optim.sit.pt").stat().st_size
    assert tensors < optimizer
    return {"tensor-file": tensors // 2, "optimizer-file": (tensors + optimizer) // 2}


@dataclass
class WriteFailure:
    """A train-sit child whose second checkpoint hit the file size limit: how it ended and a copy of its run."""

    outcome: Outcome
    run_dir: Path


@pytest.fixture(scope="module", params=["tensor-file", "optimizer-file"])
def write_failure(request, sit_reference: Reference, cache_reference: Reference, tmp_path_factory) -> WriteFailure:
    limit = _size_limits(sit_reference.path)[request.param]
    tmp = tmp_path_factory.mktemp(f"write-failure-{request.param}")
    run_dir = tmp / "run"
    outcome = run(sendvae_argv(sit_args(run_dir, cache_reference.path), _FILE_SIZE_LIMIT.format(limit=limit)),
                  tmp / "logs")
    return WriteFailure(outcome, run_dir)


@pytest.mark.slow
def test_real_write_error_keeps_the_previous_checkpoint_and_resume_is_exact(write_failure: WriteFailure,
                                                                           sit_reference: Reference,
                                                                           cache_reference: Reference,
                                                                           tmp_path: Path) -> None:
    """safetensors / torch.save hit EFBIG mid-file (as with ENOSPC): ckpt 16 stays whole and the rerun is exact."""
    outcome = write_failure.outcome
    assert outcome.returncode not in (0, -9), outcome.describe()
    run_dir = Path(shutil.copytree(write_failure.run_dir, tmp_path / "run", symlinks=True))
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [CKPT(16)]
    assert load_latest(run_dir / "checkpoints").images_seen == 16
    run_cli_ok(sit_args(run_dir, cache_reference.path))
    assert_same_training_run(sit_reference.path, run_dir, SIT_PUBLISHED)


@pytest.mark.slow
def test_real_write_error_is_one_line_naming_the_checkpoint_and_the_cause(write_failure: WriteFailure) -> None:
    outcome = write_failure.outcome
    last = outcome.stderr.strip().splitlines()[-1]
    assert outcome.returncode == 2 and "Traceback" not in outcome.stderr, outcome.describe()
    assert last.startswith("sendvae train-sit: error: ") and CKPT(32) in last and "File too large" in last


# ----------------------------------------------------------------------------------------------
# NaN / Inf in a batch or in the gradients


def _steps_holding(index: int, size: int, seed: int, batch: int, total: int) -> list[int]:
    """Steps (0-based) whose batch holds dataset item ``index`` (the loop's sampler, one process)."""
    order = iter(InfiniteSampler(size, seed=seed))
    stream = [next(order) for _ in range(total)]
    return sorted({p // batch for p, i in enumerate(stream) if i == index})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_value_in_a_batch_skips_and_counts_those_steps(bad: float, cache_reference: Reference,
                                                                  tmp_path: Path, monkeypatch, capsys) -> None:
    """One cached latent holds a non-finite value: every step whose batch holds it leaves the weights alone."""
    poisoned = 11
    original = LatentDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if i == poisoned:
            item["mean"] = item["mean"].clone()
            item["mean"][:, 0, 0, 0] = bad  # the image and its flip
        return item

    monkeypatch.setattr(LatentDataset, "__getitem__", getitem)
    run_dir = tmp_path / "run"
    code, out = run_cli(sit_args(run_dir, cache_reference.path, "train.keep_last=10"))
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    bad_steps = _steps_holding(poisoned, 48, seed=5, batch=16, total=96)
    assert len(bad_steps) == 2  # once per epoch of 48 latents
    assert summary["status"] == "finished" and summary["nonfinite_skipped"] == len(bad_steps)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records] == [sum(s < k for s in bad_steps) for k in range(1, 7)]
    ckpts = {c.images_seen: c for c in map(load_checkpoint, list_checkpoints(run_dir / "checkpoints"))}
    for step in range(6):
        before, after = ckpts.get(16 * step), ckpts[16 * (step + 1)]
        if before is None:
            continue
        same = all(torch.equal(v, after.tensors("model.sit")[k]) for k, v in before.tensors("model.sit").items())
        assert same == (step in bad_steps), f"step {step}: weights {'unchanged' if same else 'changed'}"
        if step in bad_steps:  # Adam's state did not advance either
            adam_before, adam_after = (c.torch_state("optim.sit")["state"][0] for c in (before, after))
            assert adam_before["step"] == adam_after["step"]
    final = ckpts[96].tensors("model.sit")
    assert all(torch.isfinite(v).all() for v in final.values())


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; backward returns ``value`` everywhere (a NaN/Inf gradient under a finite loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.full_like(grad, ctx.value), None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_with_finite_loss_skips_only_that_phase(bad: float, tmp_path: Path, monkeypatch,
                                                                     caplog) -> None:
    """Stage 1 at 24 images: the VAE phase's gradient is poisoned; VAE and mapper keep their weights, the
    discriminator phase still steps; the step is counted."""
    original = VAEStage.vae_loss
    losses: list[float] = []

    def vae_loss(self, batch, ctx):
        loss, logs = original(self, batch, ctx)
        if ctx.images_seen == 24:
            weight = ctx.module("vae").autoencoder.decoder.conv_out.weight
            loss = loss + 0.0 * _PoisonGradient.apply(weight, bad).sum()
            losses.append(float(loss.detach()))
        return loss, logs

    monkeypatch.setattr(VAEStage, "vae_loss", vae_loss)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sendvae.train.loop"):
        code, out = run_cli(vae_args(run_dir, "train.total_images=40", "train.checkpoint_every=8",
                                     "train.keep_last=10"))
    assert code == 0
    assert losses and all(np.isfinite(losses))  # the loss itself was finite
    assert json.loads(out.strip().splitlines()[-1])["nonfinite_skipped"] == 1
    assert "phase vae: non-finite loss or gradient at 24 images; update skipped" in caplog.text
    before, after = (load_checkpoint(run_dir / "checkpoints" / CKPT(n)) for n in (24, 32))
    for group in ("model.vae", "model.alignment"):
        assert_same_tensors(before.tensors(group), after.tensors(group), group)
    disc_before, disc_after = before.tensors("model.disc"), after.tensors("model.disc")
    assert any(not torch.equal(v, disc_after[k]) for k, v in disc_before.items() if k.endswith("weight"))


def test_too_many_nonfinite_steps_in_a_row_stop_with_one_line(cache_reference: Reference, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    original = SiTStage.loss

    def loss(self, batch, ctx):
        value, logs = original(self, batch, ctx)
        return (value * float("nan") if ctx.images_seen >= 32 else value), logs

    monkeypatch.setattr(SiTStage, "loss", loss)
    run_dir = tmp_path / "run"
    code, _ = run_cli(sit_args(run_dir, cache_reference.path, "train.max_nonfinite=3", "train.total_images=960"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == (
        "sendvae train-sit: error: training stopped: 3 steps in a row had a non-finite loss or gradient "
        f"(at 80 images, train.max_nonfinite=3); the last checkpoint is {run_dir / 'checkpoints' / CKPT(64)}; "
        "lower the learning rate, use train.precision=fp32 or check the data")
    # Checkpoints written during the skipped steps (after 32 and 48 images) hold the same weights.
    at_48, at_64 = (load_checkpoint(run_dir / "checkpoints" / CKPT(n)) for n in (48, 64))
    assert_same_tensors(at_48.tensors("model.sit"), at_64.tensors("model.sit"), "model.sit")
    assert at_48.state["nonfinite_consecutive"] == 1
    assert at_64.state["nonfinite_consecutive"] == 2 and not (run_dir / ".lock").exists()
