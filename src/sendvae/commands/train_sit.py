"""``sendvae train-sit``: train SiT + REPA on a latent cache (stage 2) with the shared training loop."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sendvae.commands._common import add_command, add_config_arguments, config_from_args

DESCRIPTION = """\
Train a class-conditional SiT (flow matching, linear path, velocity target, t = 1 noise) with the
REPA alignment loss on the latents of a frozen VAE (SPEC.md section 4). Teacher tokens come from
the cache (cache-latents --teacher, repa.source=cache) or from the teacher run on the images
(repa.source=online). AdamW, gradient clipping, EMA, bf16 autocast, checkpoints and exact resume
come from the shared training loop; run the same command again to resume.

Inputs:  data.cache (from `sendvae cache-latents`), the VAE it was made with (data.vae, checked
         by fingerprint; default: the path in the cache manifest)
Output:  RUN/sit/{config.json, ema.safetensors, model.safetensors} (read by `sendvae sample`),
         RUN/checkpoints/, RUN/metrics.jsonl, RUN/config.yaml

Example:
  sendvae train-sit --config configs/shapes/sit_tiny.yaml data.cache=caches/shapes --out runs/sit
  torchrun --nproc_per_node 8 -m sendvae.cli train-sit \\
      --config configs/imagenet256/sit_xl1_repa_sendvae.yaml data.cache=caches/imagenet256 --out runs/sit-xl1
"""


def register(subparsers: Any) -> None:
    from sendvae.train.sit_config import TrainSiTConfig

    parser = add_command(subparsers, "train-sit", "train SiT + REPA on a latent cache", DESCRIPTION)
    parser.add_argument("--out", required=True, help="run directory (created; an existing run resumes)")
    add_config_arguments(parser, TrainSiTConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.train.sit import TrainSiTConfig, train_sit

    cfg = config_from_args(TrainSiTConfig, args)
    summary = train_sit(cfg, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "logs"}, default=str))
    return 0
