"""A per-image cache of a frozen teacher's tokens for stage 1, filled lazily and shared between runs.

An aligned fine-tune runs the frozen teacher on every batch; runs that see the same images (the
demo's ``vf`` and ``sendvae`` fine-tunes share one data order, ``--full`` repeats them per seed)
recompute the same tokens. ``teacher.cache=FOLDER`` keeps them instead: the first run to meet an
image computes its tokens and stores them, every later look-up reads them.

Layout: ``FOLDER/<key>/`` per (teacher, its weights, grid, resize, precision, dataset) with
``meta.json`` (what the key stands for), ``tokens.npy`` (float16 ``[N, T, D]``, memory-mapped) and
``filled.npy`` (uint8 ``[N]``, 1 once row i is written). Tokens are stored in float16 and every
look-up returns the float16-rounded values, also for rows computed just now, so a run's numbers do
not depend on which rows were already cached (exact resume holds). Rows are written before their
flag, so processes sharing the folder (DDP ranks, runs one after another) never read a half row; two
processes computing the same row write the same values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sendvae.errors import UserError

CACHE_FORMAT = "sendvae-teacher-tokens/1"


def dataset_identity(dataset: Any, spec: str) -> dict[str, Any]:
    """What identifies the images behind dataset indices: the spec, size, resolution, the store's
    content hash when it has one, and a digest of three rendered images (catches a changed renderer)."""
    n = len(dataset)
    digest = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        digest.update(dataset[i]["image"].numpy().tobytes())
    manifest = getattr(dataset, "manifest", None) or {}
    return {"data": str(spec), "size": n, "resolution": getattr(dataset, "resolution", None),
            "content_hash": manifest.get("content_hash", ""), "sample_digest": digest.hexdigest()[:16]}


class TokenCache:
    """Teacher tokens ``[T, D]`` per dataset index, in ``folder/<key>/`` (module docstring)."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any], size: int, tokens: int, dim: int) -> None:
        self.meta = {"format": CACHE_FORMAT, **key, "shape": [int(size), int(tokens), int(dim)]}
        name = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = Path(folder) / name
        self.size, self.shape = int(size), (int(size), int(tokens), int(dim))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._create_once()
            self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r+")
            self.filled = np.load(self.path / "filled.npy", mmap_mode="r+")
        except OSError as exc:
            raise UserError(f"teacher.cache: cannot use {self.path}: {exc.strerror or exc}") from None
        if self.tokens.shape != self.shape or self.filled.shape != (self.size,):
            raise UserError(f"teacher.cache: {self.path} holds arrays of shape {self.tokens.shape} / "
                            f"{self.filled.shape}, expected {self.shape}; delete the folder to rebuild it")

    def _create_once(self) -> None:
        """Write the empty arrays and meta.json under temporary names, then rename (first process wins)."""
        if (self.path / "meta.json").is_file():
            return
        suffix = f".tmp-{os.getpid()}"
        np.lib.format.open_memmap(self.path / f"tokens.npy{suffix}", "w+", np.float16, self.shape).flush()
        np.lib.format.open_memmap(self.path / f"filled.npy{suffix}", "w+", np.uint8, (self.size,)).flush()
        for name in ("tokens.npy", "filled.npy"):
            if not (self.path / name).exists():
                os.replace(self.path / f"{name}{suffix}", self.path / name)
            else:
                (self.path / f"{name}{suffix}").unlink()
        (self.path / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))

    def fetch(self, index: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Tokens ``[B, T, D]`` (float32 of the float16 values) for dataset ``index`` ``[B]``.

        ``compute(rows)`` gets the batch positions (int64 ``[M]``) of the images not cached yet and
        returns their tokens ``[M, T, D]``; they are stored before they are returned.
        """
        idx = index.detach().cpu().numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise UserError(f"teacher.cache: index {int(idx.max())} outside the {self.size} cached images")
        missing = np.flatnonzero(self.filled[idx] == 0)
        if missing.size:
            fresh = compute(torch.from_numpy(missing)).detach().to(torch.float16).cpu().numpy()
            self.tokens[idx[missing]] = fresh
            self.tokens.flush()
            self.filled[idx[missing]] = 1
            self.filled.flush()
        return torch.from_numpy(np.ascontiguousarray(self.tokens[idx])).float().to(index.device)

    def filled_count(self) -> int:
        return int(self.filled.sum())
