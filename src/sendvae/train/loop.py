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

A stage plugs in through the contract of :mod:`sendvae.train.stage` (``Stage``, ``Phase``,
``StepContext``); the data order is :mod:`sendvae.train.data_order`, the run directory's files
:mod:`sendvae.train.run_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sendvae.config import ConfigError
from sendvae.errors import UserError
from sendvae.hardware import resolve_precision
from sendvae.progress import bars_enabled
from sendvae import distributed as dist_utils
from sendvae.train.data_order import micro_batches, seed_for, to_device
from sendvae.train.loop_config import LoopConfig
from sendvae.train.run_dir import Metrics, RunLock, environment_info, write_run_files
from sendvae.train.stage import LossFn, Logs, Phase, Stage, StepContext
from sendvae.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------------------------
# EMA, phases under DDP, signals


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


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


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


def _run(stage: Stage, dataset: torch.utils.data.Dataset, cfg: LoopConfig, run_dir: Path, run_config: Any,
         collate_fn: Callable | None, dinfo: dist_utils.DistInfo, stop: _StopRequest) -> dict[str, Any]:
    """The loop itself, inside the process group, run lock and signal handlers that :func:`train` set up:
    start (modules, resume, run files, DDP runners, data), then steps until ``total_images``, logging and
    checkpointing as it goes."""
    device, world = dinfo.device, dinfo.world
    micro, accumulation = _accumulation(cfg, world)
    precision = resolve_precision(cfg.precision, device)
    if dinfo.is_main:
        log.info("%s", precision)
    parts = _place(stage, cfg, device)
    progress, resumed_from = _resume(run_dir / "checkpoints", parts, cfg, dinfo)
    if dinfo.is_main:
        write_run_files(run_dir, run_config, environment_info(world, device, precision), progress.images_seen)
    dist_utils.barrier()
    runners = _phase_runners(parts, world, device)
    batches = micro_batches(dataset, micro, rank=dinfo.rank, world=world, seed=cfg.seed, start=progress.images_seen,
                            num_workers=cfg.num_workers, collate_fn=collate_fn, device=device)

    metrics = Metrics(run_dir, dinfo.is_main, device)
    bar = tqdm(total=cfg.total_images, initial=progress.images_seen, unit="img", unit_scale=True,
               dynamic_ncols=True, disable=not bars_enabled(dinfo.is_main), desc="train")
    clock = _Clock(progress)
    checkpoints = _Checkpointer(stage, run_dir, parts, cfg, dinfo, clock, resumed_from)
    prepare = getattr(stage, "prepare_batch", None)
    start_images, status, last_logs = progress.images_seen, "finished", {}
    try:
        while progress.images_seen < cfg.total_images:
            if _stop_requested(stop, world, device):
                status = "interrupted"
                break
            ctx = _step_context(cfg, dinfo, progress, precision.precision, parts)
            step_batches, scratches = _next_step_batches(batches, accumulation, ctx, prepare)
            skipped = _optimise(parts, runners, step_batches, scratches, ctx, cfg, metrics)
            if parts.ema.copies:
                parts.ema.update(parts.modules, _ema_decay(cfg, progress.step))
            before = progress.count_step(cfg.batch_size, skipped)
            bar.update(cfg.batch_size)
            _check_nonfinite(progress, cfg, checkpoints.last)
            if _crossed(before, progress.images_seen, cfg.log_every) or progress.images_seen >= cfg.total_images:
                last_logs = _log(metrics, progress, clock, bar)
            if _crossed(before, progress.images_seen, cfg.checkpoint_every) and progress.images_seen < cfg.total_images:
                checkpoints.save(progress)
        checkpoints.finish(progress, start_images)
    finally:
        bar.close()
        metrics.close()
        del batches

    seconds = time.time() - clock.start
    if status == "interrupted":
        log.info("stopped by signal at %d images; checkpoint %s (run again to resume)", progress.images_seen,
                 checkpoints.last)
    return {
        "status": status,
        "images_seen": progress.images_seen,
        "steps": progress.step,
        "nonfinite_skipped": progress.nonfinite_total,
        "checkpoint": str(checkpoints.root / checkpoint_name(progress.images_seen)),
        "seconds": seconds,
        "images_per_s": (progress.images_seen - start_images) / max(seconds, 1e-9),
        "logs": last_logs,
    }


# ----------------------------------------------------------------------------------------------
# State of a run
# ----------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    """The stage's modules on the device: trained and frozen ones, each module's trainable parameters,
    the phases and the EMA copies."""

    modules: dict[str, nn.Module]
    frozen: dict[str, nn.Module]
    trainable: dict[str, list[nn.Parameter]]
    phases: list[Phase]
    ema: EMA


@dataclass
class _Progress:
    """The counters a checkpoint stores; ``images_seen`` is also the data position."""

    images_seen: int = 0
    step: int = 0
    nonfinite_run: int = 0  # steps in a row that skipped an update
    nonfinite_total: int = 0
    seconds_before: float = 0.0  # training time of the runs this one resumes

    def count_step(self, batch_size: int, skipped: bool) -> int:
        """Advance by one step of ``batch_size`` images; returns the images seen before it."""
        self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        self.nonfinite_total += int(skipped)
        before = self.images_seen
        self.images_seen, self.step = self.images_seen + batch_size, self.step + 1
        return before


class _Clock:
    """This run's wall-clock time (plus the resumed runs' time) and the logging window's images/s."""

    def __init__(self, progress: _Progress) -> None:
        self.start = self.window_start = time.time()
        self.seconds_before = progress.seconds_before
        self.window_images = progress.images_seen

    def seconds(self, now: float | None = None) -> float:
        """Training time of the whole run so far, resumed runs included."""
        return self.seconds_before + (time.time() if now is None else now) - self.start

    def close_window(self, images_seen: int) -> tuple[float, float]:
        """(images/s since the last window closed, the run's seconds); starts the next window."""
        now = time.time()
        rate = (images_seen - self.window_images) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, images_seen
        return rate, self.seconds(now)


# ----------------------------------------------------------------------------------------------
# Start: modules, resume, DDP runners
# ----------------------------------------------------------------------------------------------


def _place(stage: Stage, cfg: LoopConfig, device: torch.device) -> _Parts:
    """Modules on the device in train mode, frozen helpers in eval mode without gradients, phases checked."""
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
    return _Parts(modules, frozen, trainable, phases, EMA({name: modules[name] for name in ema_names}))


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _accumulation(cfg: LoopConfig, world: int) -> tuple[int, int]:
    """(micro-batch per process, micro-batches per step) from the global batch size."""
    micro = cfg.micro_batch or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not a multiple of world size {world} x "
            f"train.micro_batch={cfg.micro_batch or micro}"
        )
    return micro, cfg.batch_size // (world * micro)


def _resume(ckpt_root: Path, parts: _Parts, cfg: LoopConfig, dinfo: dist_utils.DistInfo
            ) -> tuple[_Progress, Path | None]:
    """Restore weights, EMA, optimisers and counters from the latest valid checkpoint (rank 0 picks and
    verifies it); returns the counters and the checkpoint's path, or fresh counters and None."""
    resume_name = None
    if dinfo.is_main:
        found = load_latest(ckpt_root)
        resume_name = found.path.name if found is not None else None
    resume_name = dist_utils.broadcast_object(resume_name)
    if resume_name is None:
        return _Progress(), None
    checkpoint = load_checkpoint(ckpt_root / resume_name, verify=False)  # rank 0 verified it
    _restore(checkpoint, parts.modules, parts.ema, parts.phases, dinfo.device)
    state = checkpoint.state
    if state.get("batch_size") != cfg.batch_size:
        log.warning("resuming a run trained with batch_size %s at batch_size %d: the data order stays exact, "
                    "the optimisation does not", state.get("batch_size"), cfg.batch_size)
    progress = _Progress(state["images_seen"], state["step"], state["nonfinite_consecutive"],
                         state["nonfinite_total"], state.get("seconds", 0.0))
    log.info("resuming from %s (%d images seen, step %d)", checkpoint.path, progress.images_seen, progress.step)
    return progress, ckpt_root / resume_name


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


def _phase_runners(parts: _Parts, world: int, device: torch.device) -> dict[str, nn.Module]:
    """One module per phase around the modules it trains, in a DDP wrapper when there are several processes."""
    runners: dict[str, nn.Module] = {}
    for phase in parts.phases:
        runner: nn.Module = _PhaseRunner({n: parts.modules[n] for n in phase.trains}, phase.loss)
        if world > 1:
            runner = DistributedDataParallel(
                runner, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=phase.find_unused_parameters)
        runners[phase.name] = runner
    return runners


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def _stop_requested(stop: _StopRequest, world: int, device: torch.device) -> bool:
    """True when a signal asked to stop; a signal may reach only some processes, so they agree first."""
    stopping = stop.signum is not None
    if world > 1:
        stopping = dist_utils.all_reduce_sum(torch.tensor(float(stopping), device=device)).item() > 0
    return stopping


def _step_context(cfg: LoopConfig, dinfo: dist_utils.DistInfo, progress: _Progress, precision: str,
                  parts: _Parts) -> StepContext:
    """The step's context, everything seeded from (seed, rank, images_seen): exact resume without RNG states."""
    torch.manual_seed(seed_for(cfg.seed, dinfo.rank, progress.images_seen))
    generator = torch.Generator(device=dinfo.device)
    generator.manual_seed(seed_for(cfg.seed, dinfo.rank, progress.images_seen, 2))
    return StepContext(device=dinfo.device, rank=dinfo.rank, world=dinfo.world, images_seen=progress.images_seen,
                       step=progress.step, generator=generator, precision=precision,
                       _modules={**parts.frozen, **parts.modules})


def _next_step_batches(batches: Iterator[Any], accumulation: int, ctx: StepContext,
                       prepare: Callable[[Any, StepContext], Any] | None) -> tuple[list[Any], list[dict[str, Any]]]:
    """The step's micro-batches on the device, each through the stage's ``prepare_batch``, and their scratch dicts."""
    micro_batches, scratches = [], []
    for index in range(accumulation):
        batch = to_device(next(batches), ctx.device)
        ctx.micro_index, ctx.scratch = index, {}
        micro_batches.append(prepare(batch, ctx) if prepare is not None else batch)
        scratches.append(ctx.scratch)
    return micro_batches, scratches


def _optimise(parts: _Parts, runners: dict[str, nn.Module], micro_batches: list[Any],
              scratches: list[dict[str, Any]], ctx: StepContext, cfg: LoopConfig, metrics: Metrics) -> bool:
    """One step: every phase that has started, in order, updates the modules it trains (only they get
    gradients during the phase). Returns True when some phase skipped its update."""
    skipped = False
    for phase in parts.phases:
        if ctx.images_seen < phase.start_images:
            continue
        for name, params in parts.trainable.items():
            for p in params:
                p.requires_grad_(name in phase.trains)
        params = [p for name in phase.trains for p in parts.trainable[name]]
        if not _update_phase(phase, runners[phase.name], params, micro_batches, scratches, ctx, cfg, metrics):
            skipped = True
    for params in parts.trainable.values():
        for p in params:
            p.requires_grad_(True)
    return skipped


def _update_phase(phase: Phase, runner: nn.Module, params: list[nn.Parameter], micro_batches: list[Any],
                  scratches: list[dict[str, Any]], ctx: StepContext, cfg: LoopConfig, metrics: Metrics) -> bool:
    """Accumulate ``phase``'s gradients over the micro-batches (DDP synchronises on the last one only),
    clip and step its optimiser. A non-finite loss or gradient norm on any process drops the gradients
    instead; returns whether the update was made."""
    accumulation = len(micro_batches)
    loss_total = torch.zeros((), device=ctx.device)
    for index, batch in enumerate(micro_batches):
        ctx.micro_index, ctx.scratch = index, scratches[index]
        last = index == accumulation - 1
        sync = contextlib.nullcontext() if last or ctx.world == 1 else runner.no_sync()
        with sync:
            with ctx.autocast():
                loss, logs = runner(_Call(batch, ctx))
            (loss.float() / accumulation).backward()
        loss_total += loss.detach().float()
        for key, value in logs.items():
            metrics.add(f"{phase.name}/{key}", value)
    clip = cfg.grad_clip if phase.grad_clip is None else phase.grad_clip
    norm = _grad_norm(params, clip).to(ctx.device)
    bad = (~torch.isfinite(loss_total) | ~torch.isfinite(norm)).float()
    if dist_utils.all_reduce_sum(bad).item() > 0:
        phase.optimizer.zero_grad(set_to_none=True)
        log.warning("phase %s: non-finite loss or gradient at %d images; update skipped", phase.name, ctx.images_seen)
        return False
    phase.optimizer.step()
    phase.optimizer.zero_grad(set_to_none=True)
    metrics.add(f"{phase.name}/loss", loss_total / accumulation)
    metrics.add(f"{phase.name}/grad_norm", norm)
    return True


def _grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """The global gradient norm; gradients are scaled down to ``clip`` when it is > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads]))


def _ema_decay(cfg: LoopConfig, step: int) -> float:
    """The EMA decay of optimiser step ``step``: ``ema_decay``, ramped up from 0.1 with ``ema_warmup``."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def _check_nonfinite(progress: _Progress, cfg: LoopConfig, last_checkpoint: Path | None) -> None:
    """Stop with :class:`NonFiniteError` after ``max_nonfinite`` skipped updates in a row."""
    if progress.nonfinite_run >= cfg.max_nonfinite:
        where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
        raise NonFiniteError(
            f"training stopped: {progress.nonfinite_run} steps in a row had a non-finite loss or gradient "
            f"(at {progress.images_seen} images, train.max_nonfinite={cfg.max_nonfinite}){where}; lower the "
            "learning rate, use train.precision=fp32 or check the data")


# ----------------------------------------------------------------------------------------------
# Logging and checkpoints
# ----------------------------------------------------------------------------------------------


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _log(metrics: Metrics, progress: _Progress, clock: _Clock, bar: tqdm) -> dict[str, Any]:
    """Close the logging window: write the averaged metrics and show the phases' losses on the bar."""
    rate, seconds = clock.close_window(progress.images_seen)
    logs = metrics.flush({"images": progress.images_seen, "step": progress.step, "images_per_s": rate,
                          "nonfinite_skipped": progress.nonfinite_total, "seconds": seconds})
    shown = {k.split("/")[0]: v for k, v in logs.items() if k.endswith("/loss")}
    bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
    return logs


class _Checkpointer:
    """Writes checkpoints (rank 0, then every process waits) and, after each, the stage's published model."""

    def __init__(self, stage: Stage, run_dir: Path, parts: _Parts, cfg: LoopConfig, dinfo: dist_utils.DistInfo,
                 clock: _Clock, last: Path | None) -> None:
        self.stage, self.run_dir, self.parts, self.cfg, self.dinfo, self.clock = stage, run_dir, parts, cfg, dinfo, clock
        self.root = run_dir / "checkpoints"
        self.last = last  # the newest checkpoint of this run, if any

    def publish(self) -> None:
        """Rank 0: the stage writes its published model (RUN/vae, RUN/sit) from the EMA copies where there are."""
        export = getattr(self.stage, "export", None)
        if export is not None:
            export(self.run_dir, {n: self.parts.ema.copies.get(n, m) for n, m in self.parts.modules.items()})

    def save(self, progress: _Progress) -> None:
        """A checkpoint at ``progress`` (weights, EMA copies, optimisers, counters), then the published model."""
        parts, cfg = self.parts, self.cfg
        if self.dinfo.is_main:
            self.last = save_checkpoint(
                self.root, progress.images_seen,
                tensors={**{f"model.{n}": m.state_dict() for n, m in parts.modules.items()},
                         **{f"ema.{n}": c.state_dict() for n, c in parts.ema.copies.items()}},
                torch_states={f"optim.{p.name}": p.optimizer.state_dict() for p in parts.phases},
                state={"step": progress.step, "nonfinite_consecutive": progress.nonfinite_run,
                       "nonfinite_total": progress.nonfinite_total, "seconds": self.clock.seconds(),
                       "world_size": self.dinfo.world, "batch_size": cfg.batch_size, "seed": cfg.seed},
                keep_last=cfg.keep_last)
            self.publish()
            log.info("checkpoint %s", self.last)
        else:
            self.last = self.root / checkpoint_name(progress.images_seen)
        dist_utils.barrier()

    def finish(self, progress: _Progress, start_images: int) -> None:
        """The final checkpoint, unless this position has one; a run resumed at its end publishes again
        (a kill may have stopped the last export)."""
        if self.last is None or self.last.name != checkpoint_name(progress.images_seen):
            self.save(progress)
        elif progress.images_seen == start_images and self.dinfo.is_main:
            self.publish()
