"""GPU benchmark: stage-1 training of the f16c32 VAE at 256 px, batch 32, bf16, 50 steps, on one CUDA GPU.

Runs the real loop (``sendvae.train.loop.train`` with :class:`sendvae.train.vae.VAEStage`) on the paper
preset (configs/imagenet256/sendvae_vavae_f16c32.yaml): f16c32 VAE, DINOv2-B teacher (16x16 tokens at
224 px), depth-1 mapper of width 768, L1 + LPIPS + KL + PatchGAN, AdamW, grad clip 1, bf16 autocast.
Everything is randomly initialised (``weights=random``: no download, same cost as the real weights).
Images are 256 shapes rendered at 256 px once, kept in memory, so data loading is not measured.

Prints the GPU, images/s (median per-step rate after 5 warm-up steps), seconds per step and the peak
GPU memory allocated by PyTorch. Exits with a message when no CUDA device is present.
Run: ``python bench/gpu_train_vae.py [--steps 50] [--batch 32] [--fp32]`` (from the repository root;
``PYTHONPATH=src`` when the package is not installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/imagenet256/sendvae_vavae_f16c32.yaml"
WARMUP_STEPS = 5


class InMemoryImages(torch.utils.data.Dataset):
    """Pre-rendered image items (``{"image", "label", "index"}``) so the benchmark measures training only."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def run_benchmark(device: str, steps: int, batch: int, precision: str, resolution: int = 256,
                  num_images: int = 256) -> dict[str, float]:
    """Train ``steps`` steps and return images/s, seconds/step and peak memory (GiB, CUDA only)."""
    from sendvae.config import load_config
    from sendvae.data.shapes import ShapesDataset
    from sendvae.train.loop import train
    from sendvae.train.vae import TrainVAEConfig, build_vae_stage

    overrides = [
        "model.init=f16c32", "model.stats=", "model.export_stats=false", "teacher.weights=random",
        "loss.lpips_weights=random", "loss.disc_init=", f"data.source=shapes:{num_images}",
        f"data.resolution={resolution}", f"train.batch_size={batch}", f"train.micro_batch={batch}",
        f"train.total_images={batch * steps}", f"train.log_every={batch}", f"train.checkpoint_every={batch * steps}",
        f"train.precision={precision}", f"train.device={device}", "train.num_workers=2",
    ]
    cfg = load_config(TrainVAEConfig, PRESET, overrides)
    stage, _ = build_vae_stage(cfg)
    items = ShapesDataset(num_images, resolution).batch(range(num_images))
    data = InMemoryImages(items["image"], items["label"])
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        train(stage, data, cfg.train, run, run_config=cfg)
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    wall = time.perf_counter() - start
    rates = [r["images_per_s"] for r in records[WARMUP_STEPS:]] or [r["images_per_s"] for r in records[1:]]
    rate = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"images_per_s": rate, "seconds_per_step": batch / rate, "peak_memory_gib": peak, "wall_s": wall,
            "final_vae_loss": records[-1].get("vae/loss", float("nan"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fp32", action="store_true", help="train.precision=fp32 instead of bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_vae.py needs a CUDA GPU (torch.cuda.is_available() is False); for CPU numbers run "
              "bench/bench_train_vae.py", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING)
    precision = "fp32" if args.fp32 else "bf16"
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}: f16c32 at 256 px, batch {args.batch}, {precision}, {args.steps} steps, "
          "DINOv2-B teacher (random), mapper depth 1, LPIPS, PatchGAN", flush=True)
    result = run_benchmark("cuda", args.steps, args.batch, precision)
    print(f"images/s {result['images_per_s']:.1f}  s/step {result['seconds_per_step']:.3f}  "
          f"peak memory {result['peak_memory_gib']:.1f} GiB  wall {result['wall_s']:.0f} s  "
          f"final vae/loss {result['final_vae_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
