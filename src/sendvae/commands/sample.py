"""``sendvae sample``: draw samples from a trained SiT and write the ADM-format npz."""

from __future__ import annotations

import argparse
from typing import Any

from sendvae.commands._common import add_command

DESCRIPTION = """\
Draw N class-conditional samples from a trained SiT (the EMA weights of RUN/sit, or a released
SiT / REPA / REPA-E checkpoint file with --vae), decode them with the VAE and write them as
ADM's evaluation batch: OUT.npz with arr_0 = uint8 [N, H, W, 3] and arr_1 = int64 labels, plus
OUT.json with every setting. The evaluator (`sendvae evaluate`, or ADM's own) reads OUT.npz.

Samplers (t = 1 is noise): sde = Euler-Maruyama with diffusion 2t from t = 1 to 0.04 and a last
deterministic step (the paper's protocol, 250 steps); euler / heun = ODE. --cfg applies
classifier-free guidance to all latent channels, only on steps starting at t in --interval
(guidance off costs no extra forward pass). Labels are class-balanced (N / classes each) or
random. Sample i depends only on (--seed, i): not on --batch-size or the number of processes.

Runs on many GPUs with torchrun (ranks take every W-th chunk of --chunk-size samples). Finished
chunks are kept in OUT.npz.parts/ until the end: rerun the same command to resume an
interrupted job; it refuses to mix chunks drawn with other settings.

Inputs:  --sit RUN (train-sit run or its sit/ folder) or a checkpoint file (+ --vae)
Output:  OUT.npz (arr_0, arr_1), OUT.json, PNGs <index:06d>.png with --png-dir

Examples:
  sendvae sample --sit runs/sit --num-samples 2000 --sampler euler --steps 40 --out samples.npz
  torchrun --nproc_per_node 8 -m sendvae.cli sample --sit runs/sit-xl --num-samples 50000 \\
      --sampler sde --steps 250 --cfg 2.5 --interval 0,0.75 --labels balanced --batch-size 256 \\
      --out samples/sendvae-cfg2.5.npz
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "sample", "draw samples from a trained SiT into an ADM npz", DESCRIPTION)
    parser.add_argument("--sit", required=True, help="train-sit run folder (RUN or RUN/sit) or a SiT checkpoint file")
    parser.add_argument("--vae", default=None, help="VAE (default: the run's); required with a checkpoint file")
    parser.add_argument("--num-samples", type=int, required=True, help="number of images N")
    parser.add_argument("--out", required=True, help="samples file, ending in .npz")
    parser.add_argument("--sampler", choices=("sde", "euler", "heun"), default="sde", help="default: sde")
    parser.add_argument(
        "--steps", type=int, default=250, help="model evaluations per sample without guidance (default 250)"
    )
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale; 1 = off (default); the paper uses 2.5")
    parser.add_argument("--interval", default="0,1", help="guidance interval LOW,HIGH in t (t = 1 noise); default 0,1")
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced", help="default: balanced")
    parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward batch per process")
    parser.add_argument("--chunk-size", type=int, default=1000, help="samples per resumable chunk file")
    parser.add_argument("--png-dir", default=None, help="also write each sample as DIR/<index:06d>.png")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float64"),
        default="float32",
        help="SiT weights dtype (the sampler state stays float64)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT.npz.parts/ after assembling OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.config import from_dict
    from sendvae.sampling import SamplingConfig, sample_from_run

    config = from_dict(
        SamplingConfig,
        {
            "sampler": args.sampler,
            "steps": args.steps,
            "cfg_scale": args.cfg,
            "guidance_interval": args.interval,
            "labels": args.labels,
            "seed": args.seed,
        },
    )
    out = sample_from_run(
        args.sit,
        args.out,
        config,
        args.num_samples,
        vae=args.vae,
        batch_size=args.batch_size,
        png_dir=args.png_dir,
        device=args.device,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        keep_parts=args.keep_parts,
    )
    if out is not None:
        print(f"samples: {out}")
    return 0
