"""Benchmark: stage-1 training images/s through the real loop, fp32 against bf16, measured in one run.

Each setting is trained twice (``train.precision=fp32`` then ``bf16``) with ``sendvae.train.vae.train_vae``
into a temporary run directory, one metrics record per step; the rate is the median of the
per-step images/s after the first step (warm-up), so start-up and the final checkpoint are excluded.
The precision that ``precision: auto`` picks on this machine is marked:

- ``tiny``: the plain tiny VAE step (configs/shapes/base.yaml: tiny-f4c4 at 32 px, no alignment), batch 64;
- ``tiny-vf`` / ``tiny-send``: the aligned fine-tune steps of the demo (configs/shapes/vf.yaml,
  sendvae.yaml: EfficientNet-Lite0 teacher on every batch, VF adaptive weight / depth-1 mapper);
- ``f16c32``: the paper's f16c32 VAE at 256 px with everything the ImageNet recipe runs (DINOv2-B teacher,
  mapper of width 768, LPIPS, PatchGAN), all randomly initialised (``weights=random``), batch 1 by default:
  one step takes tens of seconds on a 2-core CPU.

Prints one line per setting and the bf16 / fp32 speed ratio (PILOT.md measured about 2-2.5x on these CPUs
for the tiny VAE at widths that are multiples of 32).
Run: ``.venv/bin/python bench/bench_train_vae.py [--only tiny|f16c32] [--steps 6] [--big-steps 3] [--big-batch 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

import torch

from sendvae.config import load_config
from sendvae.hardware import describe_cpu, resolve_precision
from sendvae.train.vae import TrainVAEConfig, train_vae

ROOT = Path(__file__).resolve().parents[1]


def settings(args: argparse.Namespace) -> dict[str, tuple[Path, list[str]]]:
    tiny = [f"train.batch_size={args.batch}", f"train.total_images={args.batch * args.steps}"]
    big = [
        "model.init=f16c32", "model.stats=", "data.source=shapes:64", "data.resolution=256",
        "teacher.weights=random", "loss.lpips_weights=random", "loss.disc_init=",
        f"train.batch_size={args.big_batch}", f"train.micro_batch={args.big_batch}",
        f"train.total_images={args.big_batch * args.big_steps}",
    ]
    return {
        "tiny": (ROOT / "configs/shapes/base.yaml", ["model.init=tiny-f4c4", *tiny]),
        "tiny-vf": (ROOT / "configs/shapes/vf.yaml", ["model.init=tiny-f4c4", *tiny]),
        "tiny-send": (ROOT / "configs/shapes/sendvae.yaml", ["model.init=tiny-f4c4", *tiny]),
        "f16c32": (ROOT / "configs/imagenet256/sendvae_vavae_f16c32.yaml", big),
    }


def images_per_second(preset: Path, overrides: list[str], precision: str) -> float:
    """Median per-step images/s of a short run (first step excluded)."""
    common = ["model.export_stats=false", "train.num_workers=0", "train.device=cpu", f"train.precision={precision}"]
    cfg = load_config(TrainVAEConfig, preset, [*overrides, *common])
    cfg.train.log_every = cfg.train.batch_size  # one record per step
    cfg.train.checkpoint_every = cfg.train.total_images
    with tempfile.TemporaryDirectory() as run:
        train_vae(cfg, run)
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records[1:]]
    if not rates:
        raise SystemExit("need at least 2 steps per setting to leave out the warm-up step")
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "tiny-vf", "tiny-send", "f16c32"], help="run one setting only")
    parser.add_argument("--steps", type=int, default=6, help="tiny: training steps per precision")
    parser.add_argument("--batch", type=int, default=64, help="tiny: batch size")
    parser.add_argument("--big-steps", type=int, default=3, help="f16c32: training steps per precision")
    parser.add_argument("--big-batch", type=int, default=1, help="f16c32: batch size")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    auto = resolve_precision("auto", "cpu")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {describe_cpu()['cpu_model']}; {auto}")
    for name, (preset, overrides) in settings(args).items():
        if args.only and name != args.only:
            continue
        fp32 = images_per_second(preset, overrides, "fp32")
        bf16 = images_per_second(preset, overrides, "bf16")
        marks = {p: "*" if p == auto.precision else " " for p in ("fp32", "bf16")}
        print(f"{name:9s} fp32{marks['fp32']} {fp32:#8.3g} img/s   bf16{marks['bf16']} {bf16:#8.3g} img/s   "
              f"bf16/fp32 {bf16 / fp32:.2f}x   (* = precision auto)", flush=True)


if __name__ == "__main__":
    main()
