"""Atomic, pickle-free training checkpoints (DESIGN.md section 2, "Checkpoints").

A checkpoint is a folder ``RUN/checkpoints/ckpt-<images seen, 12 digits>/`` holding

- ``<group>.safetensors``: one file per group of tensors (``model.vae``, ``ema.vae``, ...);
- ``<key>.pt``: optimiser states, written with ``torch.save`` and containing only tensors, numbers,
  strings, lists and dicts, so ``torch.load(weights_only=True)`` reads them;
- ``state.json``: the loop's counters plus ``files``, the sha256 of every file above.

The folder is written under a temporary name, flushed to disk and then renamed, so a crash leaves
either a complete checkpoint or a ``.tmp-*`` folder that is ignored and removed later. A text file
``latest`` names the newest complete checkpoint. Loading verifies every checksum; a damaged
checkpoint is skipped for the one before it with a warning naming both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sendvae.errors import UserError
from sendvae.pickles import unpickling_reason

log = logging.getLogger(__name__)

FORMAT = "sendvae-checkpoint-1"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"ckpt-(\d{12})")


class CheckpointError(UserError):
    """A checkpoint folder is missing, incomplete or fails its checksums (the message names it)."""


def checkpoint_name(images_seen: int) -> str:
    """The folder name of the checkpoint taken after ``images_seen`` images (sorts by progress)."""
    return f"ckpt-{images_seen:012d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some platforms) do not support fsync
        pass
    finally:
        os.close(fd)


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors that share memory)."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def save_checkpoint(
    root: str | Path,
    images_seen: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    torch_states: dict[str, Any],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint folder atomically, point ``latest`` at it and keep the newest ``keep_last``.

    ``tensors`` maps a group name to a flat state dict; ``torch_states`` maps a key to plain data
    (e.g. ``optimizer.state_dict()``); ``state`` is JSON-serialisable. Returns the folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(images_seen)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    replaced = root / f".old-{name}-{os.getpid()}"
    try:
        _write_folder(tmp, images_seen, tensors, torch_states, state)
        if final.exists():  # an older attempt at the same progress (e.g. a resumed run re-saving):
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)  # moved aside whole, so a kill never leaves a half-deleted `final`
        os.replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, file too large, I/O error
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)  # the older copy goes back under its name
        free = shutil.disk_usage(root).free / 2**30
        previous = _read_latest(root)
        kept = f"previous checkpoint {root / previous} intact" if previous else "no previous checkpoint"
        raise CheckpointError(f"cannot write checkpoint {final} ({exc}); {free:.1f} GiB free; {kept}") from exc
    _fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    _write_latest(root, name)
    if keep_last is not None:
        prune(root, keep_last)
    return final


def _write_folder(tmp: Path, images_seen: int, tensors: dict[str, dict[str, torch.Tensor]],
                  torch_states: dict[str, Any], state: dict[str, Any]) -> None:
    """Write every file of a checkpoint and its ``state.json`` (with their checksums) into ``tmp``, flushed."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, str] = {}
    for group, state_dict in tensors.items():
        filename = f"{group}.safetensors"
        save_file(_plain_tensors(state_dict), str(tmp / filename))
        files[filename] = sha256_file(tmp / filename)
    for key, value in torch_states.items():
        filename = f"{key}.pt"
        _torch_save(value, tmp / filename)
        files[filename] = sha256_file(tmp / filename)
    body = {"format": FORMAT, "images_seen": images_seen, "files": files, **state}
    (tmp / STATE_FILE).write_text(json.dumps(body, indent=2, sort_keys=True))
    for path in tmp.iterdir():
        _fsync(path)


class _WriteRecorder:
    """A file for ``torch.save`` that keeps the OSError of a failed write (torch reports only "unexpected pos")."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.name, self.error = handle, handle.name, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(value: Any, path: Path) -> None:
    """``torch.save`` to ``path``; a failed write raises the OSError behind it (disk full, file too large)."""
    with open(path, "wb") as handle:
        recorder = _WriteRecorder(handle)
        try:
            torch.save(value, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def _read_latest(root: Path) -> str | None:
    """The checkpoint name ``latest`` points at, or None."""
    try:
        return (root / LATEST_FILE).read_text().strip() or None
    except OSError:
        return None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, the temporary folders that killed processes left
    behind (this process's own may be in use) and every replaced copy (``save_checkpoint`` is done with it)."""
    root = Path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-ckpt-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)
    for replaced in root.glob(".old-ckpt-*"):
        shutil.rmtree(replaced, ignore_errors=True)


@dataclass
class Checkpoint:
    """A verified checkpoint folder: its JSON state and loaders for its files."""

    path: Path
    state: dict[str, Any]

    @property
    def images_seen(self) -> int:
        return int(self.state["images_seen"])

    def has(self, group_or_key: str) -> bool:
        files = self.state["files"]
        return f"{group_or_key}.safetensors" in files or f"{group_or_key}.pt" in files

    def tensors(self, group: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The state dict stored as ``<group>.safetensors``."""
        path = self.path / f"{group}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no tensor group {group!r} (has {sorted(self.state['files'])})")
        try:
            return load_file(str(path), device=str(device))
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None

    def torch_state(self, key: str) -> Any:
        """The plain data stored as ``<key>.pt``, read with ``torch.load(weights_only=True)``."""
        path = self.path / f"{key}.pt"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no state {key!r} (has {sorted(self.state['files'])})")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise CheckpointError(f"{path}: refused: not a file of plain tensors and numbers "
                                  f"({unpickling_reason(exc)}); sendvae never unpickles code") from None


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open the checkpoint folder ``path``, checking its format and (if ``verify``) every sha256."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint ({STATE_FILE} is missing)")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "files" not in state:
        raise CheckpointError(f"{state_path}: not a {FORMAT} state file")
    if verify:
        for filename, expected in state["files"].items():
            file = path / filename
            if not file.is_file():
                raise CheckpointError(f"{path}: {filename} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise CheckpointError(
                    f"{file}: checksum mismatch (sha256 {actual[:12]}..., expected {expected[:12]}...)")
    return Checkpoint(path, state)


def load_latest(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that passes verification, or None when there is none.

    The one named by ``latest`` is tried first, then the others newest first. Each damaged
    checkpoint that is skipped is reported with a warning naming it and the one used instead.
    """
    root = Path(root)
    candidates = list(reversed(list_checkpoints(root)))
    pointer = _read_latest(root)
    if pointer is not None:
        named = root / pointer
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    failures: list[tuple[Path, str]] = []
    for candidate in candidates:
        try:
            checkpoint = load_checkpoint(candidate)
        except CheckpointError as exc:
            failures.append((candidate, str(exc)))
            continue
        for bad, reason in failures:
            log.warning("checkpoint %s is damaged (%s); resuming from %s instead", bad, reason, candidate)
        return checkpoint
    if failures:
        names = ", ".join(str(bad) for bad, _ in failures)
        raise CheckpointError(
            f"no valid checkpoint under {root}: all are damaged ({names}); first error: {failures[0][1]}")
    return None
