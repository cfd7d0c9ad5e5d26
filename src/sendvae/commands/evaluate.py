"""``sendvae evaluate``: ADM's generation metrics of a samples npz, or a reference batch for any image set."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sendvae.commands._common import add_command
from sendvae.commands.sample import add_sampling_arguments

DESCRIPTION = """\
Evaluate SAMPLES.npz (ADM format: arr_0 = uint8 [N, H, W, 3]) against a reference batch such as
ADM's VIRTUAL_imagenet256_labeled.npz, with the metrics of ADM's evaluator computed in PyTorch:
gFID (Inception pool_3), sFID (mixed_6/conv, first 7 channels), Inception Score (softmax, splits
of 5,000), precision and recall (k = 3 nearest-neighbour manifolds against the reference's
images), plus KID and a Frechet distance outside Inception: FD_dinov2 (EDM2's protocol: DINOv2-L/14
CLS token at 224 px, bicubic, ImageNet mean/std) with --dinov2 WEIGHTS, else FD_effnet-lite0 (the
offline teacher, mean-pooled tokens); --features adds more spaces (mean-pooled teacher tokens:
dinov2-b:WEIGHTS, ...). Prints a table and writes JSON.

Every number comes with its protocol (the JSON's "protocol"): the reference file and its sha256,
where each reference statistic came from, each feature network (implementation, weights + sha256,
resize, normalisation), the uint8 rule, the number of samples, and what `sendvae sample` recorded
in SAMPLES.npz (sampler, steps, NFE, guidance, label sampling, seed). docs/evaluation.md compares
this PyTorch Inception with ADM's TensorFlow one.

The Inception network is torch-fidelity's port of ADM's TensorFlow graph, with local weights
pt_inception-2015-12-05-6726825d.pth (--inception PATH or $SENDVAE_INCEPTION; nothing downloads).
Numbers are close to, not bit-identical with, ADM's TensorFlow evaluator: quote ADM's own for papers.

--checkpoints RUN evaluates every checkpoint RUN/checkpoints/ckpt-* of a train-sit run: it draws
--num-samples samples from each (EMA weights, the sampling options of `sendvae sample`, the same
seeds for all) into --out-dir/ckpt-<images>.npz (+ .png, .metrics.json) and writes one row per
checkpoint, with its images seen, to --out-dir/series.csv and series.json. Rerun to resume or extend.

--make-ref SOURCE OUT.npz writes the reference format (arr_0 = up to --ref-images images, arr_1
labels, mu/sigma and mu_s/sigma_s over all images, mu_<name>/sigma_<name> for --features) for an
image store, shapes:N (with --resolution) or an npz, e.g. the ImageNet train set or val set.

Outputs: SAMPLES.metrics.json (or --json PATH); OUT.npz with --make-ref; --out-dir/series.{csv,json}
         and per-checkpoint samples and metrics with --checkpoints

Examples:
  sendvae evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
  sendvae evaluate --make-ref stores/shapes32 refs/shapes32.npz --features effnet-lite0
  sendvae evaluate samples.npz --ref refs/shapes32.npz --dinov2 weights/dinov2_vitl14_pretrain.pth
  sendvae evaluate --checkpoints runs/sit --ref refs/shapes32.npz --num-samples 600 --sampler euler \
      --steps 40 --out-dir results/sit-series
"""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "evaluate", "gFID / sFID / IS / precision / recall of samples (ADM suite)", DESCRIPTION
    )
    parser.add_argument("samples", nargs="?", help="samples .npz (arr_0 uint8 [N, H, W, 3]) or an image store")
    parser.add_argument("--ref", help="reference batch .npz (ADM format)")
    parser.add_argument(
        "--make-ref", nargs=2, metavar=("SOURCE", "OUT"), help="write a reference batch for SOURCE to OUT.npz"
    )
    parser.add_argument(
        "--inception", default=None, help="Inception weights file (default $SENDVAE_INCEPTION or the torch hub cache)"
    )
    parser.add_argument("--features", default="", help="comma-separated extra feature spaces: NAME or NAME:WEIGHTS")
    parser.add_argument(
        "--dinov2", default=None, help="DINOv2-L/14 weights (timm folder or Meta's .pth): FD_dinov2 as EDM2"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--num-samples", type=int, default=None, help="evaluate the first N samples only; --checkpoints: draw N"
    )
    parser.add_argument("--no-kid", action="store_true", help="skip KID")
    parser.add_argument("--json", default=None, help="metrics file (default SAMPLES.metrics.json)")
    parser.add_argument("--resolution", type=int, default=None, help="--make-ref: image size of shapes:N")
    parser.add_argument(
        "--num-images", type=int, default=None, help="--make-ref: statistics over the first N images only"
    )
    parser.add_argument(
        "--ref-images", type=int, default=10_000, help="--make-ref: images kept in arr_0 (default 10,000)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="--make-ref: which images are kept; --checkpoints: the sampling seed"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="--make-ref: data-loading processes for a store")
    series = parser.add_argument_group("a series of checkpoints (--checkpoints RUN)")
    series.add_argument("--checkpoints", metavar="RUN", help="evaluate every RUN/checkpoints/ckpt-* of a train-sit run")
    series.add_argument("--out-dir", help="--checkpoints: folder of the samples, metrics and series.csv/json")
    series.add_argument("--vae", default=None, help="--checkpoints: VAE to decode with (default: the run's)")
    series.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                        help="--checkpoints: SiT weights dtype")
    series.add_argument("--grid", default="8x10", help="--checkpoints: grid picture per checkpoint, COLUMNSxROWS or 0")
    add_sampling_arguments(series, seed=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.errors import UserError
    from sendvae.eval.generation import evaluate_files, make_reference

    features = [f.strip() for f in args.features.split(",") if f.strip()]
    if args.checkpoints:
        return run_series(args, features)
    if args.make_ref:
        if args.samples or args.ref:
            raise UserError("--make-ref SOURCE OUT is used alone (no SAMPLES, no --ref)")
        summary = make_reference(
            args.make_ref[0],
            args.make_ref[1],
            inception=args.inception,
            features=features,
            resolution=args.resolution,
            num_images=args.num_images,
            keep_images=args.ref_images,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.num_workers,
            dinov2=args.dinov2,
        )
        print(json.dumps(summary, indent=2))
        return 0
    if not args.samples or not args.ref:
        raise UserError("give SAMPLES.npz and --ref REF.npz (or --make-ref SOURCE OUT.npz)")
    metrics = evaluate_files(
        args.samples,
        args.ref,
        inception=args.inception,
        features=features,
        dinov2=args.dinov2,
        batch_size=args.batch_size,
        device=args.device,
        kid=not args.no_kid,
        num_samples=args.num_samples,
        json_out=args.json,
    )
    print(metrics.table())
    return 0


def run_series(args: argparse.Namespace, features: list[str]) -> int:
    """``--checkpoints RUN``: sample and evaluate every checkpoint; print the series as a table."""
    from sendvae.commands.sample import parse_grid, sampling_config
    from sendvae.errors import UserError
    from sendvae.eval.series import evaluate_checkpoints

    if args.samples or args.make_ref:
        raise UserError("--checkpoints RUN is used without SAMPLES and --make-ref")
    missing = [flag for flag, value in (("--ref", args.ref), ("--out-dir", args.out_dir),
                                        ("--num-samples", args.num_samples)) if not value]
    if missing:
        raise UserError(f"--checkpoints needs {', '.join(missing)}")
    rows = evaluate_checkpoints(
        args.checkpoints,
        args.ref,
        args.out_dir,
        sampling_config(args),
        args.num_samples,
        vae=args.vae,
        inception=args.inception,
        features=features,
        dinov2=args.dinov2,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        kid=not args.no_kid,
        grid=parse_grid(args.grid),
    )
    fd = [k for k in rows[0] if k.startswith("fd_")]
    print("\t".join(["checkpoint", "images_seen", "gFID", "sFID", "IS", *fd]))
    for row in rows:
        values = [row["fid"], row["sfid"], row["inception_score"], *(row[k] for k in fd)]
        print("\t".join([row["checkpoint"], str(row["images_seen"]), *(f"{v:.4g}" for v in values)]))
    return 0
