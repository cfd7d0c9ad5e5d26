"""The contract between the training loop and a stage: :class:`Stage`, :class:`Phase`, :class:`StepContext`.

A *stage* (stage 1: :class:`sendvae.train.vae.VAEStage`; stage 2: ``sendvae.train.sit.SiTStage``)
contributes its modules and its optimisation *phases*; :func:`sendvae.train.loop.train` does
everything else (what one step does with the phases: :mod:`sendvae.train.loop`).

Writing a stage::

    class ToyStage:
        def __init__(self):
            self.net = nn.Linear(4, 1)
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)

        def modules(self):            # everything whose state goes into the checkpoint
            return {"net": self.net}

        def ema_modules(self):         # modules that get an EMA copy
            return ["net"]

        def phases(self):
            return [Phase("fit", self.opt, ("net",), self.loss)]

        def loss(self, batch, ctx):    # one micro-batch -> (scalar loss, logs)
            pred = ctx.module("net")(batch["x"])
            loss = (pred.float() - batch["y"]).square().mean()
            return loss, {"mse": loss.detach()}

    summary = train(ToyStage(), dataset, LoopConfig(total_images=1024, batch_size=32), "runs/toy")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sendvae.hardware import autocast

Logs = dict[str, "torch.Tensor | float"]
LossFn = Callable[[Any, "StepContext"], "tuple[torch.Tensor, Logs]"]


@dataclass
class Phase:
    """One optimisation phase of a step: an optimiser, the modules it trains and its loss.

    ``loss(micro_batch, ctx)`` returns a scalar loss (a mean over the micro-batch, fp32) and a dict
    of detached scalars to log; the loop averages the logs over micro-batches, processes and the
    logging window, and prefixes them with ``"{name}/"``. The phase runs only once
    ``images_seen >= start_images`` (e.g. the discriminator after ``gan_start``).
    """

    name: str  # Prefix of its logs and name of its optimiser state in checkpoints.
    optimizer: torch.optim.Optimizer  # Steps the parameters of the modules in `trains`.
    trains: tuple[str, ...]  # Names (keys of Stage.modules()) of the modules this phase trains.
    loss: LossFn  # (micro_batch, ctx) -> (scalar loss, logs).
    start_images: int = 0  # Skip this phase until this many images have been seen.
    grad_clip: float | None = None  # Clip norm for this phase; None = LoopConfig.grad_clip.
    find_unused_parameters: bool = False  # DDP: set when some trained parameters may get no gradient.


@runtime_checkable
class Stage(Protocol):
    """What a training stage gives the loop.

    Required: ``modules()``, ``phases()``, ``ema_modules()``. Optional methods, used when present:

    - ``frozen_modules() -> dict[str, nn.Module]``: modules moved to the device and kept in eval
      mode with no gradients, not checkpointed (teachers, LPIPS).
    - ``prepare_batch(batch, ctx) -> Any``: turn a collated micro-batch (already on the device) into
      what the phases' losses take; called once per micro-batch per step.
    - ``export(run_dir, modules)``: called on rank 0 after each checkpoint and at the end with the
      modules to publish (the EMA copy where EMA is on, else the raw module), e.g. to write
      ``RUN/vae``.
    """

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state goes into the checkpoint (trained or not), by name."""
        ...

    def phases(self) -> list[Phase]:
        """The optimisation phases of one step, in the order they run. Called once at start."""
        ...

    def ema_modules(self) -> list[str]:
        """Names of the modules that get an EMA copy (ignored when ``LoopConfig.ema`` is off)."""
        ...


@dataclass
class StepContext:
    """What a phase's loss sees about the current step.

    ``generator`` is a torch.Generator on ``device`` seeded from ``(seed, rank, images_seen)`` at
    the start of every step (the global torch RNG is seeded the same way), so every random draw is
    reproducible and resume is exact. ``scratch`` is a dict private to the current micro-batch and
    shared by the phases of the step (stage 1 leaves its reconstruction there for the
    discriminator phase).
    """

    device: torch.device
    rank: int
    world: int
    images_seen: int  # Images seen by all processes before this step.
    step: int  # Optimiser steps done before this step.
    generator: torch.Generator
    precision: str  # "fp32" or "bf16" (resolved: never "auto").
    micro_index: int = 0  # Index of the current micro-batch within the step.
    scratch: dict[str, Any] = field(default_factory=dict)
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def module(self, name: str) -> nn.Module:
        """The module ``name`` of the stage (from ``modules()`` or ``frozen_modules()``), on the device.

        Inside a phase that trains it, calls to it (any method, not only ``forward``) take part in
        that phase's DDP gradient synchronisation: the loop runs the whole loss inside one
        DistributedDataParallel wrapper around the phase's trained modules."""
        try:
            return self._modules[name]
        except KeyError:
            raise KeyError(f"no module {name!r}; the stage has {sorted(self._modules)}") from None

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when ``precision == "bf16"`` and ``enabled``; use
        ``ctx.autocast(False)`` around a part that must run in fp32 (losses already run inside
        the autocast region, so cast their inputs with ``.float()``)."""
        return autocast(self.precision if enabled else "fp32", self.device)
