"""The shared training loop's settings (``train.*`` of both stages), importable without torch.

Kept apart from :mod:`sendvae.train.loop` so that ``sendvae <command> --help`` can list every config key
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sendvae.config import param


@dataclass
class AdamWConfig:
    """AdamW with a constant learning rate: a stage's ``optim`` (REPA / REPA-E defaults)."""

    lr: float = param(1e-4, "AdamW learning rate (constant)", min=0.0)
    beta1: float = param(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = param(0.999, "AdamW beta2", min=0.0, max=1.0)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0.0)
    eps: float = param(1e-8, "AdamW epsilon", min=0.0)


@dataclass
class LoopConfig:
    """The knobs of the shared loop (stage configs hold one of these under ``train``)."""

    total_images: int = param(64_000, "train until this many images have been seen (all processes)", min=1)
    batch_size: int = param(64, "global batch: images per optimiser step, all processes together", min=1)
    micro_batch: int = param(0, "images per process per forward pass; 0 = batch_size / world (no accumulation)", min=0)
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", "auto = bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), "
                "else fp32; bf16 = autocast with fp32 master weights and fp32 losses")
    grad_clip: float = param(1.0, "clip the gradient norm of each phase to this; 0 = no clipping", min=0.0)
    ema: bool = param(True, "keep an exponential moving average of the stage's EMA modules")
    ema_decay: float = param(0.9999, "EMA decay per optimiser step", min=0.0, max=1.0)
    ema_warmup: bool = param(False, "use min(decay, (1 + n) / (10 + n)) at step n (short runs)")
    seed: int = param(0, "seed of the data order and of every random draw", min=0)
    log_every: int = param(6400, "write metrics every this many images", min=1)
    checkpoint_every: int = param(64_000, "write a checkpoint every this many images", min=1)
    keep_last: int = param(3, "keep this many most recent checkpoints", min=1)
    max_nonfinite: int = param(10, "stop after this many consecutive steps with a non-finite loss/gradient", min=1)
    num_workers: int = param(2, "data-loading worker processes per training process", min=0)
    device: Literal["auto", "cpu", "cuda"] = param("auto", "auto = cuda when available, else cpu")
