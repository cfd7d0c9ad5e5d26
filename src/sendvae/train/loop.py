"""The one training loop both stages share (DESIGN.md sections 1-2; after EDM2's ``training_loop.py``).

A *stage* (stage 1: :class:`sendvae.train.vae.VAEStage`; stage 2: ``sendvae.train.sit.SiTStage``)
contributes its modules and its optimisation *phases*; :func:`train` does everything else:

- distributed data parallel over ``torchrun`` processes (gloo on CPU, NCCL on GPU), with an
  infinite, deterministic, rank-sharded sampler whose position is the number of images seen;
- gradient accumulation (``batch_size = world * micro_batch * accumulation``) that all-reduces
  gradients once per step, on the last micro-batch only;
- bf16 autocast with fp32 master weights (``precision``; ``auto`` decides once per run with
  :func:`sendvae.hardware.resolve_precision` and logs why), gradient clipping, EMA;
- a non-finite guard: a phase whose loss or gradients are not finite skips its update; after
  ``max_nonfinite`` such steps in a row training stops with :class:`NonFiniteError`;
- progress counted in images; exact resume (weights, EMA, optimisers, data position; every random
  draw is seeded from ``(seed, rank, images_seen)`` so no RNG state needs saving, as in EDM2);
- atomic checkpoints every ``checkpoint_every`` images keeping the last ``keep_last``
  (:mod:`sendvae.train.checkpoint`); SIGTERM / SIGINT write a checkpoint and return normally;
- ``metrics.jsonl`` (and TensorBoard when installed), a tqdm bar with images/s on rank 0;
- a run directory holding ``config.yaml``, ``environment.json`` (code version, torch, devices,
  world size), ``checkpoints/`` and a ``.lock`` that refuses a second live process.

One training *step* consumes ``batch_size`` images (all processes together). Within a step the
phases run in order (stage 1: ``vae`` then ``disc``; stage 2: ``sit``). Each phase runs its loss on
every micro-batch of the step, then clips and steps its own optimiser. Only the modules a phase
trains have ``requires_grad`` during that phase, so e.g. the generator loss of the ``vae`` phase
sends gradients through the discriminator into the decoder without touching the discriminator's
own gradients.

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
import json
import logging
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sendvae import __version__
from sendvae.config import ConfigError, save_config, to_dict
from sendvae.errors import UserError
from sendvae.hardware import PrecisionChoice, autocast, describe_cpu, resolve_precision
from sendvae.locking import PidLock
from sendvae.progress import bars_enabled
from sendvae import distributed as dist_utils
from sendvae.train.loop_config import LoopConfig
from sendvae.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)

log = logging.getLogger(__name__)

Logs = dict[str, "torch.Tensor | float"]
LossFn = Callable[[Any, "StepContext"], "tuple[torch.Tensor, Logs]"]


class NonFiniteError(UserError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


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



# ----------------------------------------------------------------------------------------------
# Seeds and data order


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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


# ----------------------------------------------------------------------------------------------
# EMA, phases under DDP, signals, the run directory


class EMA:
    """Exponential moving averages of some modules: ``ema <- decay * ema + (1 - decay) * weights``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.copies: dict[str, nn.Module] = {}
        for name, module in modules.items():
            copy = deepcopy(module).eval()
            copy.requires_grad_(False)
            self.copies[name] = copy

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], decay: float) -> None:
        for name, copy in self.copies.items():
            source = modules[name]
            for ema_param, param_ in zip(copy.parameters(), source.parameters(), strict=True):
                ema_param.lerp_(param_.detach(), 1.0 - decay)
            for ema_buffer, buffer in zip(copy.buffers(), source.buffers(), strict=True):
                ema_buffer.copy_(buffer)


class _Call:
    """One loss call's inputs, opaque to DDP's input-moving code."""

    __slots__ = ("batch", "ctx")

    def __init__(self, batch: Any, ctx: StepContext) -> None:
        self.batch, self.ctx = batch, ctx


class _PhaseRunner(nn.Module):
    """The modules one phase trains plus its loss, as one module DDP can wrap.

    Running the loss inside this module's ``forward`` lets the stage call any method of its
    modules (``vae.encode``, ``vae.decode``) while DDP still sees one forward and synchronises the
    gradients of every trained parameter in the backward pass.
    """

    def __init__(self, trained: dict[str, nn.Module], loss: LossFn) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(trained)
        self.loss = loss

    def forward(self, call: _Call) -> tuple[torch.Tensor, Logs]:
        return self.loss(call.batch, call.ctx)


class _StopRequest:
    """Turns the first SIGTERM / SIGINT into a request to checkpoint and stop; a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing this step, writing a checkpoint and stopping",
                    signal.Signals(signum).name)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class RunLock(PidLock):
    """``RUN/.lock`` holding the owner's pid and host; refuses a run directory a live process uses."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / ".lock", f"run directory {run_dir}")


def _git_version() -> dict[str, Any] | None:
    """The git commit (and whether the tree is dirty) of the source tree this package runs from."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment_info(world: int, device: torch.device, precision: PrecisionChoice | None = None) -> dict[str, Any]:
    """Code version and environment of this run (written to ``environment.json``), with the CPU flags and
    the precision decision."""
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if device.type == "cuda" else [platform.processor() or platform.machine()])
    return {
        "sendvae": __version__,
        "git": _git_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "devices": devices,
        "world_size": world,
        "threads": torch.get_num_threads(),
        **describe_cpu(),
        **({"precision": precision.precision, "precision_requested": precision.requested,
            "precision_reason": precision.reason} if precision is not None else {}),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _write_config(run_dir: Path, run_config: Any) -> None:
    """Write ``config.yaml``; on resume, warn about every key that differs from the previous run's."""
    path = run_dir / "config.yaml"
    new = to_dict(run_config)
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        before, after = _flatten(old), _flatten(new)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            log.warning("resuming with a changed config: %s",
                        ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed))
    save_config(run_config, path)


def _trim_metrics(path: Path, images_seen: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("images", 0) <= images_seen:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


class _Metrics:
    """Averages logged scalars over a window, across processes, and writes them (rank 0)."""

    def __init__(self, run_dir: Path, is_main: bool, device: torch.device) -> None:
        self.is_main, self.device = is_main, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.path = run_dir / "metrics.jsonl"
        self.board = None
        if is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        value = value.to(self.device)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def flush(self, record: dict[str, Any]) -> dict[str, Any]:
        names = sorted(self.sums)
        if names:
            means = torch.stack([self.sums[n] / self.counts[n] for n in names])
            world = dist_utils.all_reduce_sum(torch.ones((), device=self.device))
            means = dist_utils.all_reduce_sum(means) / world
            record.update({n: float(v) for n, v in zip(names, means.tolist(), strict=True)})
        self.sums.clear()
        self.counts.clear()
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in record.items():
                    if key != "images" and isinstance(value, (int, float)):
                        self.board.add_scalar(key, value, record["images"])
        return record

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


# ----------------------------------------------------------------------------------------------
# The loop


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """The global gradient norm; gradients are scaled down to ``clip`` when it is > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads]))


def _accumulation(cfg: LoopConfig, world: int) -> tuple[int, int]:
    """(micro-batch per process, micro-batches per step) from the global batch size."""
    micro = cfg.micro_batch or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not a multiple of world size {world} x "
            f"train.micro_batch={cfg.micro_batch or micro}"
        )
    return micro, cfg.batch_size // (world * micro)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def train(
    stage: Stage,
    dataset: torch.utils.data.Dataset,
    cfg: LoopConfig,
    run_dir: str | Path,
    *,
    run_config: Any = None,
    collate_fn: Callable | None = None,
) -> dict[str, Any]:
    """Train ``stage`` on ``dataset`` until ``cfg.total_images`` images have been seen.

    Resumes from the latest valid checkpoint in ``run_dir/checkpoints`` when there is one. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments; rank 0
    writes the run directory. ``run_config`` (a config dataclass) is written to ``config.yaml``
    (default: ``cfg``). Returns a summary dict: ``status`` ("finished" or "interrupted"),
    ``images_seen``, ``steps``, ``nonfinite_skipped``, ``checkpoint`` (path of the last one),
    ``seconds``, ``images_per_s`` and ``logs`` (the last logged metrics).
    """
    dinfo = dist_utils.init_distributed(cfg.device)
    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    stop = _StopRequest()
    try:
        error = None
        if dinfo.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
            except UserError as exc:
                error = str(exc)
        error = dist_utils.broadcast_object(error)
        if error:
            raise UserError(error)
        stop.install()
        return _run(stage, dataset, cfg, run_dir, run_config if run_config is not None else cfg,
                    collate_fn, dinfo, stop)
    finally:
        stop.restore()
        lock.release()
        dist_utils.shutdown(dinfo)


def _restore(checkpoint: Checkpoint, modules: dict[str, nn.Module], ema: EMA, phases: list[Phase],
             device: torch.device) -> None:
    """Load weights, EMA copies and optimiser states; a mismatch names the checkpoint and the module."""
    for name, module in modules.items():
        targets = [(f"model.{name}", module)]
        if name in ema.copies:
            group = f"ema.{name}"  # a run that switches EMA on starts its average from the weights
            targets.append((group if checkpoint.has(group) else f"model.{name}", ema.copies[name]))
        for group, target in targets:
            try:
                target.load_state_dict(checkpoint.tensors(group, device))
            except RuntimeError as exc:
                raise CheckpointError(f"{checkpoint.path}: {group} does not fit this run's module {name!r} "
                                      f"(was the model config changed?): {_mismatches(exc)}") from None
    for phase in phases:
        try:
            phase.optimizer.load_state_dict(checkpoint.torch_state(f"optim.{phase.name}"))
        except ValueError as exc:
            raise CheckpointError(
                f"{checkpoint.path}: optimiser state of phase {phase.name!r} does not fit: {exc}") from None


def _mismatches(exc: RuntimeError, shown: int = 3) -> str:
    """torch's load_state_dict report (one line per tensor) as one line: its first ``shown`` problems."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc).strip()]
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def _run(stage: Stage, dataset: torch.utils.data.Dataset, cfg: LoopConfig, run_dir: Path, run_config: Any,
         collate_fn: Callable | None, dinfo: dist_utils.DistInfo, stop: _StopRequest) -> dict[str, Any]:
    device, rank, world = dinfo.device, dinfo.rank, dinfo.world
    micro, accumulation = _accumulation(cfg, world)
    precision = resolve_precision(cfg.precision, device)
    if dinfo.is_main:
        log.info("%s", precision)
    ckpt_root = run_dir / "checkpoints"

    # Modules on the device; frozen helpers in eval mode without gradients.
    modules = stage.modules()
    for module in modules.values():
        module.to(device).train()
    frozen_getter = getattr(stage, "frozen_modules", None)
    frozen = dict(frozen_getter()) if frozen_getter else {}
    for module in frozen.values():
        module.to(device).eval().requires_grad_(False)
    trainable = {name: _trainable(module) for name, module in modules.items()}
    phases = stage.phases()
    for phase in phases:
        unknown = [name for name in phase.trains if name not in modules]
        if unknown:
            raise ValueError(f"phase {phase.name!r} trains {unknown}, which the stage's modules() lacks")
    ema_names = list(stage.ema_modules()) if cfg.ema else []
    ema = EMA({name: modules[name] for name in ema_names})

    # Resume: weights, EMA, optimisers and counters (the data position is images_seen).
    images_seen, step, nonfinite_run, nonfinite_total, seconds_before = 0, 0, 0, 0, 0.0
    resume_name = None
    if dinfo.is_main:
        found = load_latest(ckpt_root)
        resume_name = found.path.name if found is not None else None
    resume_name = dist_utils.broadcast_object(resume_name)
    if resume_name is not None:
        checkpoint = load_checkpoint(ckpt_root / resume_name, verify=False)  # rank 0 verified it
        _restore(checkpoint, modules, ema, phases, device)
        state = checkpoint.state
        if state.get("batch_size") != cfg.batch_size:
            log.warning("resuming a run trained with batch_size %s at batch_size %d: the data order stays exact, "
                        "the optimisation does not", state.get("batch_size"), cfg.batch_size)
        images_seen, step = state["images_seen"], state["step"]
        nonfinite_run, nonfinite_total = state["nonfinite_consecutive"], state["nonfinite_total"]
        seconds_before = state.get("seconds", 0.0)
        log.info("resuming from %s (%d images seen, step %d)", checkpoint.path, images_seen, step)

    if dinfo.is_main:
        _write_config(run_dir, run_config)
        (run_dir / "environment.json").write_text(json.dumps(environment_info(world, device, precision), indent=2))
        _trim_metrics(run_dir / "metrics.jsonl", images_seen)
    dist_utils.barrier()

    # One DDP wrapper per phase around the modules it trains.
    runners: dict[str, nn.Module] = {}
    for phase in phases:
        runner: nn.Module = _PhaseRunner({n: modules[n] for n in phase.trains}, phase.loss)
        if world > 1:
            runner = DistributedDataParallel(
                runner, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=phase.find_unused_parameters)
        runners[phase.name] = runner

    # Data: an infinite loader starting at the current position.
    torch.manual_seed(seed_for(cfg.seed, rank, images_seen, 1))  # the loader's worker seeds
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=micro, drop_last=True, num_workers=cfg.num_workers, collate_fn=collate_fn,
        sampler=InfiniteSampler(len(dataset), rank=rank, world=world, seed=cfg.seed, start=images_seen),
        pin_memory=device.type == "cuda", worker_init_fn=_ignore_signals_in_worker if cfg.num_workers else None,
        persistent_workers=False)
    batches = iter(loader)

    metrics = _Metrics(run_dir, dinfo.is_main, device)
    bar = tqdm(total=cfg.total_images, initial=images_seen, unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not bars_enabled(dinfo.is_main), desc="train")
    last_checkpoint = ckpt_root / resume_name if resume_name else None
    last_logs: dict[str, Any] = {}
    start_time, window_time, window_images = time.time(), time.time(), images_seen
    start_images = images_seen
    prepare = getattr(stage, "prepare_batch", None)
    status = "finished"

    def publish() -> None:  # rank 0: the stage writes its published model (RUN/vae, RUN/sit)
        export = getattr(stage, "export", None)
        if export is not None:
            export(run_dir, {n: ema.copies.get(n, m) for n, m in modules.items()})

    def save() -> None:
        nonlocal last_checkpoint
        if dinfo.is_main:
            last_checkpoint = save_checkpoint(
                ckpt_root, images_seen,
                tensors={**{f"model.{n}": m.state_dict() for n, m in modules.items()},
                         **{f"ema.{n}": c.state_dict() for n, c in ema.copies.items()}},
                torch_states={f"optim.{p.name}": p.optimizer.state_dict() for p in phases},
                state={"step": step, "nonfinite_consecutive": nonfinite_run, "nonfinite_total": nonfinite_total,
                       "seconds": seconds_before + time.time() - start_time, "world_size": world,
                       "batch_size": cfg.batch_size, "seed": cfg.seed},
                keep_last=cfg.keep_last)
            publish()
            log.info("checkpoint %s", last_checkpoint)
        else:
            last_checkpoint = ckpt_root / checkpoint_name(images_seen)
        dist_utils.barrier()

    try:
        while images_seen < cfg.total_images:
            stopping = stop.signum is not None
            if world > 1:  # a signal may reach only some processes: stop together
                stopping = dist_utils.all_reduce_sum(torch.tensor(float(stopping), device=device)).item() > 0
            if stopping:
                status = "interrupted"
                break

            # Seed everything from (seed, rank, images_seen): exact resume without saving RNG states.
            torch.manual_seed(seed_for(cfg.seed, rank, images_seen))
            generator = torch.Generator(device=device)
            generator.manual_seed(seed_for(cfg.seed, rank, images_seen, 2))
            ctx = StepContext(device=device, rank=rank, world=world, images_seen=images_seen, step=step,
                              generator=generator, precision=precision.precision, _modules={**frozen, **modules})
            micro_batches, scratches = [], []
            for index in range(accumulation):
                batch = _to_device(next(batches), device)
                ctx.micro_index, ctx.scratch = index, {}
                micro_batches.append(prepare(batch, ctx) if prepare is not None else batch)
                scratches.append(ctx.scratch)

            skipped = False
            for phase in phases:
                if images_seen < phase.start_images:
                    continue
                for name, params in trainable.items():  # only this phase's modules get gradients
                    for p in params:
                        p.requires_grad_(name in phase.trains)
                runner = runners[phase.name]
                loss_total = torch.zeros((), device=device)
                for index, batch in enumerate(micro_batches):
                    ctx.micro_index, ctx.scratch = index, scratches[index]
                    last = index == accumulation - 1
                    sync = contextlib.nullcontext() if last or world == 1 else runner.no_sync()
                    with sync:
                        with ctx.autocast():
                            loss, logs = runner(_Call(batch, ctx))
                        (loss.float() / accumulation).backward()
                    loss_total += loss.detach().float()
                    for key, value in logs.items():
                        metrics.add(f"{phase.name}/{key}", value)
                params = [p for name in phase.trains for p in trainable[name]]
                clip = cfg.grad_clip if phase.grad_clip is None else phase.grad_clip
                norm = _grad_norm(params, clip).to(device)
                bad = (~torch.isfinite(loss_total) | ~torch.isfinite(norm)).float()
                if dist_utils.all_reduce_sum(bad).item() > 0:
                    phase.optimizer.zero_grad(set_to_none=True)
                    skipped = True
                    log.warning("phase %s: non-finite loss or gradient at %d images; update skipped",
                                phase.name, images_seen)
                    continue
                phase.optimizer.step()
                phase.optimizer.zero_grad(set_to_none=True)
                metrics.add(f"{phase.name}/loss", loss_total / accumulation)
                metrics.add(f"{phase.name}/grad_norm", norm)
            for params in trainable.values():
                for p in params:
                    p.requires_grad_(True)

            if ema.copies:
                decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
                ema.update(modules, decay)
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            nonfinite_total += int(skipped)
            before, images_seen, step = images_seen, images_seen + cfg.batch_size, step + 1
            bar.update(cfg.batch_size)
            if nonfinite_run >= cfg.max_nonfinite:
                where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise NonFiniteError(
                    f"training stopped: {nonfinite_run} steps in a row had a non-finite loss or gradient "
                    f"(at {images_seen} images, train.max_nonfinite={cfg.max_nonfinite}){where}; lower the "
                    "learning rate, use train.precision=fp32 or check the data")

            if _crossed(before, images_seen, cfg.log_every) or images_seen >= cfg.total_images:
                now = time.time()
                rate = (images_seen - window_images) / max(now - window_time, 1e-9)
                last_logs = metrics.flush({"images": images_seen, "step": step, "images_per_s": rate,
                                           "nonfinite_skipped": nonfinite_total,
                                           "seconds": seconds_before + now - start_time})
                window_time, window_images = now, images_seen
                shown = {k.split("/")[0]: v for k, v in last_logs.items() if k.endswith("/loss")}
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            if _crossed(before, images_seen, cfg.checkpoint_every) and images_seen < cfg.total_images:
                save()
        if last_checkpoint is None or last_checkpoint.name != checkpoint_name(images_seen):
            save()
        elif images_seen == start_images and dinfo.is_main:
            publish()  # resumed at the end: a kill may have stopped the last export, so publish again
    finally:
        bar.close()
        metrics.close()
        del batches

    seconds = time.time() - start_time
    if status == "interrupted":
        log.info("stopped by signal at %d images; checkpoint %s (run again to resume)", images_seen, last_checkpoint)
    return {
        "status": status,
        "images_seen": images_seen,
        "steps": step,
        "nonfinite_skipped": nonfinite_total,
        "checkpoint": str(ckpt_root / checkpoint_name(images_seen)),
        "seconds": seconds,
        "images_per_s": (images_seen - start_images) / max(seconds, 1e-9),
        "logs": last_logs,
    }
