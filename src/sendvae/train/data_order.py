"""The data side of the training loop: seeds and the order of the images (DESIGN.md section 2, "Seeds").

Every random draw of a step is seeded from ``(seed, rank, images_seen)`` (:func:`seed_for`) and the
images come from an infinite, rank-sharded sampler whose position is the number of images seen
(:class:`InfiniteSampler`), so a resumed run repeats the uninterrupted one exactly without saving
any RNG state (as in EDM2). :func:`micro_batches` is the loader the loop reads.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from sendvae.errors import UserError


def seed_for(*values: int) -> int:
    """A 63-bit seed mixed from integers (e.g. ``(seed, rank, images_seen)``), stable across platforms."""
    words = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class InfiniteSampler(torch.utils.data.Sampler):
    """Dataset indices forever, in a fresh permutation per epoch, shared out between processes.

    The global stream is ``perm_e[p % n]`` for positions ``p = 0, 1, 2, ...`` with ``e = p // n`` and
    ``perm_e`` a permutation drawn from ``(seed, e)``. Rank ``r`` of ``world`` takes positions
    ``start + r, start + r + world, ...``: with ``start`` = images seen, a resumed run continues
    exactly where it stopped, whatever the number of processes.
    """

    def __init__(self, size: int, *, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0) -> None:
        if size < 1:
            raise UserError("the training dataset is empty")
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self):
        position = self.start + self.rank
        epoch, order = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.permutation(epoch)
            yield int(order[position % self.size])
            position += self.world


def _ignore_signals_in_worker(_worker_id: int) -> None:
    """Data workers leave SIGINT / SIGTERM to the training process, which checkpoints and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, possibly in dicts, lists and tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def micro_batches(dataset: torch.utils.data.Dataset, micro: int, *, rank: int, world: int, seed: int, start: int,
                  num_workers: int, collate_fn: Callable | None, device: torch.device) -> Iterator[Any]:
    """This process's micro-batches of ``micro`` images, forever, from data position ``start`` on."""
    torch.manual_seed(seed_for(seed, rank, start, 1))  # the loader's worker seeds
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=micro, drop_last=True, num_workers=num_workers, collate_fn=collate_fn,
        sampler=InfiniteSampler(len(dataset), rank=rank, world=world, seed=seed, start=start),
        pin_memory=device.type == "cuda", worker_init_fn=_ignore_signals_in_worker if num_workers else None,
        persistent_workers=False)
    return iter(loader)
