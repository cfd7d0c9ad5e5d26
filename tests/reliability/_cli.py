"""The tiny command lines of the reliability suite and a way to run them in this process.

Each ``*_args`` function gives the full ``sendvae`` argument list of one command on a tiny setting
(16-32 px, a few steps, CPU, fp32); the fixtures in ``conftest.py`` run each once uninterrupted,
and the fault tests run the same arguments with a fault.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from sendvae.cli import main

# Stage 1: Send-VAE alignment (mapper, noise, EfficientNet-Lite0 teacher) + PatchGAN starting after
# 16 images, EMA, 8 steps of 8 images, a checkpoint every 2 steps keeping 2: every piece of state
# the loop resumes (two optimisers, EMA, BatchNorm buffers, the GAN start) is exercised.
VAE_ARGS = [
    "data.source=shapes:64", "data.resolution=16", "model.init=tiny-f4c4", "model.stats_images=16",
    "alignment.kind=sendvae", "teacher.grid=4", "alignment.mapper_width=64", "alignment.mapper_heads=2",
    "alignment.mlp_hidden=128", "loss.gan_weight=0.1", "loss.gan_start=16", "loss.disc_channels=16",
    "loss.disc_layers=2", "optim.lr=1e-3", "train.batch_size=8", "train.total_images=64",
    "train.checkpoint_every=16", "train.keep_last=2", "train.log_every=8", "train.ema=true",
    "train.ema_decay=0.9", "train.seed=3", "train.num_workers=0", "train.device=cpu", "train.precision=fp32",
]
VAE_PUBLISHED = {"vae": ["model.safetensors", "latent_stats.json"]}

# Stage 2: SiT-T/1 + REPA (cached EfficientNet-Lite0 tokens), EMA, 6 steps of 16 latents.
SIT_ARGS = [
    "model.preset=SiT-T/1", "model.encoder_depth=2", "model.projector_dim=64", "repa.weight=0.5",
    "repa.source=cache", "optim.lr=3e-4", "train.batch_size=16", "train.total_images=96",
    "train.checkpoint_every=16", "train.keep_last=2", "train.log_every=16", "train.ema_decay=0.9",
    "train.ema_warmup=true", "train.seed=5", "train.num_workers=0", "train.device=cpu", "train.precision=fp32",
]
SIT_PUBLISHED = {"sit": ["ema.safetensors", "model.safetensors", "config.json"]}

CACHE_ARGS = ["--data", "shapes:48", "--resolution", "32", "--batch-size", "8", "--shard-size", "8",
              "--teacher", "effnet-lite0", "--device", "cpu", "--num-workers", "0"]
SAMPLE_ARGS = ["--num-samples", "24", "--sampler", "sde", "--steps", "8", "--cfg", "2.0", "--interval", "0,0.75",
               "--labels", "random", "--seed", "7", "--batch-size", "4", "--chunk-size", "4", "--device", "cpu"]
PREPARE_ARGS = ["--resolution", "16", "--shard-size", "12", "--workers", "2", "--no-progress"]


@dataclass
class Reference:
    """An uninterrupted run: where it wrote, its arguments and how long its work took."""

    path: Path
    args: list[str]
    seconds: float


def run_cli(args: list[str]) -> tuple[int, str]:
    """``sendvae ARGS`` in this process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def run_cli_ok(args: list[str]) -> str:
    code, out = run_cli(args)
    assert code == 0, f"sendvae {' '.join(map(str, args))} exited {code}"
    return out


def vae_args(out: Path, *extra: str) -> list[str]:
    return ["train-vae", "--out", str(out), *VAE_ARGS, *extra]


def sit_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train-sit", "--out", str(out), f"data.cache={cache}", *SIT_ARGS, *extra]


def cache_args(out: Path, vae: Path) -> list[str]:
    return ["cache-latents", str(out), "--vae", str(vae), *CACHE_ARGS]


def sample_args(out: Path, sit_run: Path, png_dir: Path | None = None) -> list[str]:
    return ["sample", "--sit", str(sit_run), "--out", str(out), *SAMPLE_ARGS,
            *(["--png-dir", str(png_dir)] if png_dir is not None else [])]


def prepare_args(src: Path, out: Path) -> list[str]:
    return ["data", "prepare", str(src), str(out), *PREPARE_ARGS]
