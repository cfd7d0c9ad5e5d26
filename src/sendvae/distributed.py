"""torch.distributed set-up for ``torchrun`` launches, and the small collective helpers every multi-process
command uses (training, latent caching, sampling).

A process launched by ``torchrun`` (or SLURM through ``torchrun``) finds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init_distributed`
reads them and joins the process group (NCCL on CUDA, gloo on CPU). A plain ``python`` launch is a
world of one and needs no process group at all, so every helper here also works without one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sendvae.errors import UserError
from sendvae.hardware import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # True when init_distributed created the process group (and should destroy it).

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_preference: str = "auto", setting: str = "train.device") -> DistInfo:
    """Join the process group described by the ``torchrun`` environment variables (if WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_preference, local_rank, setting)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, initialized_here=False)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here=False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun (see README)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    log.info("joined process group: rank %d of %d, backend %s, device %s", rank, world, backend, device)
    return DistInfo(rank, world, local_rank, device, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (no-op in a world of one)."""
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place; returns it (no-op in a world of one)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every process (small picklable control data only, never weights)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
