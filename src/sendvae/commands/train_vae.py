"""``sendvae train-vae``: stage 1, fine-tune a VAE with Send-VAE alignment (or a baseline) on images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sendvae.commands._common import add_command, add_config_arguments, config_from_args
from sendvae.errors import UserError

DESCRIPTION = """\
Fine-tune a VAE so that its noised latent, passed through a non-linear mapper, aligns with the
patch tokens of a frozen vision foundation model (Send-VAE, SPEC.md section 2). The same command
trains the baselines: alignment.kind=none (plain fine-tune), vf (VA-VAE's VF loss), sendvae
(alignment.noise, alignment.mapper_depth). L = lambda_align * L_align + L1/MSE + LPIPS + KL + GAN,
each weight in loss.*. DDP under torchrun, gradient accumulation, bf16, clipping, EMA,
checkpoints every train.checkpoint_every images; SIGTERM / Ctrl-C write a checkpoint and stop;
running the same command again resumes exactly where it stopped.

Inputs:  model.init (a VAE preset for a random start, or a sendvae / diffusers / LDM checkpoint),
         data.source (a store from `sendvae data prepare`, or shapes:N), teacher.name/weights
Output:  RUN/vae/ (the fine-tuned VAE with latent statistics; read it with `sendvae vae info`,
         `sendvae cache-latents`, `sendvae probe`), RUN/checkpoints/, RUN/metrics.jsonl,
         RUN/config.yaml, RUN/environment.json

Examples:
  sendvae train-vae --config configs/shapes/base.yaml --out runs/shapes-base
  sendvae train-vae --config configs/shapes/sendvae.yaml model.init=runs/shapes-base/vae --out runs/shapes-send
  torchrun --nproc_per_node 8 -m sendvae.cli train-vae \\
      --config configs/imagenet256/sendvae_vavae_f16c32.yaml --out runs/sendvae-vavae
"""


def register(subparsers: Any) -> None:
    from sendvae.train.vae_config import TrainVAEConfig

    parser = add_command(subparsers, "train-vae", "stage 1: fine-tune a VAE with Send-VAE alignment", DESCRIPTION)
    parser.add_argument("--out", required=True, help="run directory (created; one with checkpoints resumes)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in --out to resume from (error instead of starting anew)")
    add_config_arguments(parser, TrainVAEConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.train.checkpoint import list_checkpoints
    from sendvae.train.vae import TrainVAEConfig, train_vae

    cfg = config_from_args(TrainVAEConfig, args)
    if args.resume and not list_checkpoints(Path(args.out) / "checkpoints"):
        raise UserError(f"--resume: {args.out} has no checkpoint to resume from (drop --resume to start a new run)")
    summary = train_vae(cfg, args.out)
    if os.environ.get("RANK", "0") == "0":  # one summary line per run, also under torchrun
        print(json.dumps({k: v for k, v in summary.items() if k != "logs"}, default=str))
    return 0
