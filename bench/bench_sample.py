"""Benchmark: sampling images/s on CPU for a small SiT, ODE and SDE, with and without guidance.

Times :func:`sendvae.sampling.generate_latents` (latents only, no decoding) for a random SiT of a
small preset and prints images/s per setting, the ratio of guided to unguided speed (guidance on
every step doubles the batch: expect about 0.5; with REPA-E's interval [0, 0.75] about 0.57) and of
SDE to ODE (the same number of evaluations: expect about 1; the per-sample noise draws cost the rest).
Settings run in interleaved rounds and the fastest round counts, which tames a busy machine.
Run: ``.venv/bin/python bench/bench_sample.py [--preset SiT-M/1] [--latent 4x8x8] [--steps 10] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sendvae.models.sit import build_sit
from sendvae.sampling import SamplingConfig, evaluations_per_sample, generate_latents


def timed_run(
    model: torch.nn.Module,
    config: SamplingConfig,
    shape: tuple[int, int, int],
    batch: int,
    start: int,
    dtype: torch.dtype,
) -> float:
    """Seconds to sample one batch of latents (indices ``start .. start + batch``)."""
    labels = torch.arange(batch) % 10
    begin = time.perf_counter()
    generate_latents(model, range(start, start + batch), labels, shape, config, null_label=10, dtype=dtype)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="SiT-M/1", help="SiT preset (tiny CPU presets: SiT-T/1, SiT-M/1)")
    parser.add_argument("--latent", default="4x8x8", help="latent C x H x W")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="SiT weights in bfloat16")
    args = parser.parse_args()
    c, h, w = (int(v) for v in args.latent.split("x"))
    torch.manual_seed(0)
    model = build_sit(args.preset, input_size=h, in_channels=c, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # a non-zero output layer, as after training
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model.to(dtype)
    print(
        f"sampling {args.preset} on {c}x{h}x{w} latents, batch {args.batch}, {args.steps} steps, {dtype}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible"
    )
    settings = [
        SamplingConfig(sampler=sampler, steps=args.steps, cfg_scale=cfg, guidance_interval=interval)
        for sampler in ("euler", "heun", "sde")
        for cfg, interval in ((1.0, (0.0, 1.0)), (2.5, (0.0, 1.0)), (2.5, (0.0, 0.75)))
    ]
    best = [float("inf")] * len(settings)
    for round_ in range(args.repeats + 1):  # interleaved rounds, the first one a warm-up; the fastest run counts
        for k, config in enumerate(settings):
            seconds = timed_run(model, config, (c, h, w), args.batch, round_ * args.batch, dtype)
            if round_ > 0:
                best[k] = min(best[k], seconds)
    rates = {}
    for config, seconds in zip(settings, best, strict=True):
        rate = args.batch / seconds
        rates[config.sampler, config.cfg_scale, config.guidance_interval] = rate
        print(
            f"  {config.sampler:5s} cfg {config.cfg_scale:3.1f} interval {list(config.guidance_interval)!s:12s} "
            f"{evaluations_per_sample(config):4d} passes/sample  {rate:8.1f} img/s"
        )
    full, none = (2.5, (0.0, 1.0)), (1.0, (0.0, 1.0))
    for sampler in ("euler", "heun", "sde"):
        print(
            f"{sampler}: guided / unguided speed {rates[(sampler, *full)] / rates[(sampler, *none)]:.2f} "
            f"(interval [0, 0.75]: {rates[(sampler, 2.5, (0.0, 0.75))] / rates[(sampler, *none)]:.2f})"
        )
    print(f"sde / euler speed (no guidance): {rates[('sde', *none)] / rates[('euler', *none)]:.2f}")


if __name__ == "__main__":
    main()
