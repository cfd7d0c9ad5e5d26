"""Checkpoint folders: exact round trips without pickles, checksums, atomic writes, keep-last, fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from sendvae.train.checkpoint import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)


def adam_after_steps(model: nn.Module, steps: int = 3) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def save(root: Path, images: int, model: nn.Module, opt: torch.optim.Optimizer, **kw) -> Path:
    return save_checkpoint(root, images, tensors={"model.net": model.state_dict()},
                           torch_states={"optim.fit": opt.state_dict()}, state={"step": images // 8}, **kw)


def test_round_trip_is_exact_and_weights_only(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    opt = adam_after_steps(model)
    path = save(tmp_path, 24, model, opt)
    assert path.name == checkpoint_name(24) == "ckpt-000000000024"
    ckpt = load_checkpoint(path)
    assert ckpt.images_seen == 24 and ckpt.state["step"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.tensors("model.net")[key], value)
    # The optimiser file is plain data: torch.load(weights_only=True) reads it, and it restores Adam exactly.
    plain = torch.load(path / "optim.fit.pt", weights_only=True)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(plain)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    files = json.loads((path / "state.json").read_text())["files"]
    assert set(files) == {"model.net.safetensors", "optim.fit.pt"} and all(len(h) == 64 for h in files.values())


def test_checksum_mismatch_and_missing_file_are_named(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    path = save(tmp_path, 8, model, adam_after_steps(model, 1))
    data = bytearray((path / "optim.fit.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "optim.fit.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optim\.fit\.pt: checksum mismatch"):
        load_checkpoint(path)
    (path / "model.net.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.net\.safetensors is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_checkpoint(tmp_path / "nowhere")


def test_keep_last_latest_pointer_and_leftover_temporary_folders(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    opt = adam_after_steps(model, 1)
    stale = tmp_path / ".tmp-ckpt-000000000999-1"  # a crash mid-write by another process
    replaced = tmp_path / ".old-ckpt-000000000998-1"  # a crash while re-saving a checkpoint
    for leftover in (stale, replaced):
        leftover.mkdir()
        (leftover / "state.json").write_text("{}")
    for images in (8, 16, 24, 32):
        save(tmp_path, images, model, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000000024", "ckpt-000000000032"]
    assert not stale.exists() and not replaced.exists()
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000000000032"
    assert load_latest(tmp_path).images_seen == 32
    assert load_latest(tmp_path / "empty") is None


def test_latest_falls_back_to_the_previous_valid_checkpoint(tmp_path: Path, caplog) -> None:
    model = nn.Linear(4, 3)
    opt = adam_after_steps(model, 1)
    save(tmp_path, 8, model, opt)
    newest = save(tmp_path, 16, model, opt)
    (newest / "state.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        found = load_latest(tmp_path)
    assert found.images_seen == 8
    assert f"checkpoint {newest} is damaged" in caplog.text and "resuming from" in caplog.text
    assert str(tmp_path / "ckpt-000000000008") in caplog.text


def test_resaving_the_same_progress_never_exposes_a_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A resumed run re-saves a checkpoint that exists. A kill while the old copy is being deleted (simulated:
    the deletion removes state.json, then the process dies) must leave a whole checkpoint under the name."""
    from sendvae.train import checkpoint as ckpt

    model = nn.Linear(4, 3)
    opt = adam_after_steps(model, 1)
    first = save(tmp_path, 8, model, opt)

    def killed_while_deleting(path, ignore_errors=False):  # the first deletion of a real folder dies halfway
        if Path(path).exists():
            (Path(path) / "state.json").unlink()
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 8, model, opt)
    monkeypatch.undo()
    assert load_checkpoint(first).images_seen == 8  # the name holds a whole checkpoint
    save(tmp_path, 16, model, opt, keep_last=2)  # the next save clears what the killed one left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_resave_puts_the_older_copy_back(tmp_path: Path, monkeypatch) -> None:
    from sendvae.train import checkpoint as ckpt

    model = nn.Linear(4, 3)
    opt = adam_after_steps(model, 1)
    first = save(tmp_path, 8, model, opt)
    real_replace = ckpt.os.replace

    def disk_error_on_the_new_copy(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", disk_error_on_the_new_copy)
    with pytest.raises(CheckpointError, match="No space left"):
        save(tmp_path, 8, model, opt)
    assert load_checkpoint(first).images_seen == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
