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
deterministic step (the paper's protocol, 250 steps); euler / heun = ODE. Guidance acts on all
latent channels, only on steps starting at t in --interval (off, it costs no extra forward pass):
v = v_bad + w (v_good - v_bad) with w = --cfg. --guidance cfg (default): v_bad is the SiT's own
unconditional velocity. --guidance autoguidance (Karras et al. 2024): v_bad is the velocity of a
weaker SiT of the same latent space for the same class, --guide-model PATH (a run, one of its
training checkpoints RUN/checkpoints/ckpt-*, or a checkpoint file). Scales below 1 are refused
(SiT / REPA would silently not guide there). Labels are class-balanced (N / classes each) or
random. Sample i depends only on (--seed, i): not on --batch-size or the number of processes.

Runs on many GPUs with torchrun (ranks take every W-th chunk of --chunk-size samples). Finished
chunks are kept in OUT.npz.parts/ until the end: rerun the same command to resume an
interrupted job; it refuses to mix chunks drawn with other settings.

Inputs:  --sit RUN (train-sit run or its sit/ folder), a training checkpoint RUN/checkpoints/ckpt-N,
         or a checkpoint file (+ --vae)
Output:  OUT.npz (arr_0 images, arr_1 labels, metadata: the settings, NFE, uint8 rule as JSON),
         OUT.json (the same metadata), OUT.png (a grid: one row per class; --grid 0 skips it),
         PNGs <index:06d>.png with --png-dir

Examples:
  sendvae sample --sit runs/sit --num-samples 2000 --sampler euler --steps 40 --out samples.npz
  torchrun --nproc_per_node 8 -m sendvae.cli sample --sit runs/sit-xl --num-samples 50000 \\
      --sampler sde --steps 250 --cfg 2.5 --interval 0,0.75 --labels balanced --batch-size 256 \\
      --out samples/sendvae-cfg2.5.npz
  sendvae sample --sit runs/sit-xl --guidance autoguidance --guide-model runs/sit-xl/checkpoints/ckpt-000002560000 \
      --cfg 1.8 --num-samples 50000 --out samples/autoguided.npz
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "sample", "draw samples from a trained SiT into an ADM npz", DESCRIPTION)
    parser.add_argument(
        "--sit", required=True, help="train-sit run folder (RUN or RUN/sit), a training checkpoint or a SiT file"
    )
    parser.add_argument("--vae", default=None, help="VAE (default: the run's); required with a checkpoint file")
    parser.add_argument("--num-samples", type=int, required=True, help="number of images N")
    parser.add_argument("--out", required=True, help="samples file, ending in .npz")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward batch per process")
    parser.add_argument("--chunk-size", type=int, default=1000, help="samples per resumable chunk file")
    parser.add_argument(
        "--grid",
        default="8x10",
        help="OUT.png: COLUMNSxROWS, one row per class (evenly spaced classes when there are more); 0 = none",
    )
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


def add_sampling_arguments(parser: Any, seed: bool = True) -> None:
    """The options of :class:`sendvae.sampling.SamplingConfig` (shared with ``evaluate --checkpoints``).

    ``seed=False`` leaves ``--seed`` to a caller that defines it with its own help.
    """
    parser.add_argument("--sampler", choices=("sde", "euler", "heun"), default="sde", help="default: sde")
    parser.add_argument(
        "--steps", type=int, default=250, help="model evaluations per sample without guidance (default 250)"
    )
    parser.add_argument(
        "--cfg",
        "--guidance-scale",
        dest="cfg",
        type=float,
        default=1.0,
        help="guidance scale w (cfg or autoguidance); 1 = off (default), below 1 refused; the paper's CFG: 2.5",
    )
    parser.add_argument("--interval", default="0,1", help="guidance interval LOW,HIGH in t (t = 1 noise); default 0,1")
    parser.add_argument(
        "--guidance", choices=("cfg", "autoguidance"), default="cfg", help="what --cfg guides with (default cfg)"
    )
    parser.add_argument(
        "--guide-model", default="", help="autoguidance: the weaker SiT (run, RUN/checkpoints/ckpt-N or file)"
    )
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced", help="default: balanced")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")


def sampling_config(args: argparse.Namespace) -> Any:
    """The :class:`sendvae.sampling.SamplingConfig` of the options added by :func:`add_sampling_arguments`."""
    from sendvae.config import from_dict
    from sendvae.sampling import SamplingConfig

    return from_dict(
        SamplingConfig,
        {
            "sampler": args.sampler,
            "steps": args.steps,
            "cfg_scale": args.cfg,
            "guidance_interval": args.interval,
            "guidance": args.guidance,
            "guide_model": args.guide_model,
            "labels": args.labels,
            "seed": args.seed,
        },
    )


def parse_grid(text: str) -> tuple[int, int] | None:
    """``--grid COLUMNSxROWS`` (e.g. ``8x10``) or ``0`` (no grid)."""
    from sendvae.errors import UserError

    if text.strip() == "0":
        return None
    columns, _, rows = text.lower().partition("x")
    try:
        size = int(columns), int(rows)
    except ValueError:
        raise UserError(f"--grid {text!r}: expected COLUMNSxROWS such as 8x10, or 0 for no grid") from None
    if min(size) < 1:
        raise UserError(f"--grid {text!r}: columns and rows must be positive (0 alone turns the grid off)")
    return size


def run(args: argparse.Namespace) -> int:
    from sendvae.generator import sample_from_run

    out = sample_from_run(
        args.sit,
        args.out,
        sampling_config(args),
        args.num_samples,
        vae=args.vae,
        batch_size=args.batch_size,
        png_dir=args.png_dir,
        grid=parse_grid(args.grid),
        device=args.device,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        keep_parts=args.keep_parts,
    )
    if out is not None:
        print(f"samples: {out}")
    return 0
