"""``sendvae probe``: linear probes of attributes on VAE latents (the paper's disentanglement measure)."""

from __future__ import annotations

import argparse
from typing import Any

from sendvae.commands._common import add_command, add_config_arguments, config_from_args

DESCRIPTION = """\
Measure semantic disentanglement (SPEC.md section 3): encode each attribute dataset with each VAE,
flatten the latent (no pooling), fit a multi-label logistic-regression probe on standardised
features (per attribute: L2 and early stopping on the validation log-loss, threshold chosen on
validation to maximise F1) and score it on the test split. Without a val split, 10% of train is
carved (seeded).

Inputs:
  --vae [NAME=]PATH      a VAE: sendvae folder, diffusers AutoencoderKL folder or LDM checkpoint
                         (repeat for several; NAME labels the row, default the folder/file name)
  --data SPEC            celeba:ROOT | awa2:ROOT | deepfashion:ROOT | csv:FILE | shapes:N (repeatable)
  --reference REF        extra rows: pixels | teacher:NAME[@WEIGHTS] | random-vae:PRESET
                         (wide references are reduced to the top reference_pca_dim principal
                         directions of their standardised features; a random-init VAE is a
                         reference, not a floor)
  --mean / --sample      posterior mean (default) or one posterior sample seeded per image
Outputs (in --out):
  probe_results.json     per dataset and row: micro/macro F1, per-attribute F1, top-3/top-5 recall,
                         per-factor accuracy (shapes), chosen L2, sizes (input to `sendvae correlate`)
  probe_results.md       one table per dataset (also printed)
  feature_cache/         flattened features per (VAE fingerprint, dataset, split, mean/sample)

Example:
  sendvae probe --data shapes:2000 --reference pixels --reference random-vae:tiny-f4c4 \\
      --out runs/probe_refs resolution=32
  sendvae probe --vae base=runs/base/vae --vae send=runs/send/vae --data shapes:4000 \\
      --out runs/probe resolution=32 latent_metrics=true
  sendvae probe --vae vavae=ckpt/vavae.pt --data celeba:/data/celeba --data awa2:/data/AwA2 \\
      --out runs/probe_paper
"""


def register(subparsers: Any) -> None:
    from sendvae.eval.probe_config import ProbeConfig

    parser = add_command(subparsers, "probe", "linear attribute probes on VAE latents (F1, top-k recall)", DESCRIPTION)
    parser.add_argument("--vae", action="append", default=[], metavar="[NAME=]PATH", help="a VAE to probe (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="SPEC", required=True,
                        help="attribute dataset spec (repeatable)")
    parser.add_argument("--reference", action="append", default=[], metavar="REF",
                        help="reference row: pixels, teacher:NAME[@WEIGHTS], random-vae:PRESET (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--mean", dest="use_mean", action="store_true", default=None,
                      help="probe the posterior mean (default)")
    mode.add_argument("--sample", dest="use_mean", action="store_false",
                      help="probe one posterior sample per image (noise seeded by (seed, index))")
    parser.add_argument("--out", required=True, help="output folder")
    add_config_arguments(parser, ProbeConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.eval.probe import probe_markdown, run_probe
    from sendvae.eval.probe_config import ProbeConfig

    cfg = config_from_args(ProbeConfig, args)
    if args.use_mean is not None:
        cfg.use_mean = args.use_mean
    results = run_probe(args.vae, args.data, args.out, cfg, references=args.reference)
    print(probe_markdown(results))
    print(f"results: {args.out}/probe_results.json, {args.out}/probe_results.md")
    return 0
