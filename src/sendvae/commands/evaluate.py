"""``sendvae evaluate``: ADM's generation metrics of a samples npz, or a reference batch for any image set."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sendvae.commands._common import add_command

DESCRIPTION = """\
Evaluate SAMPLES.npz (ADM format: arr_0 = uint8 [N, H, W, 3]) against a reference batch such as
ADM's VIRTUAL_imagenet256_labeled.npz, with the metrics of ADM's evaluator computed in PyTorch:
gFID (Inception pool_3), sFID (mixed_6/conv, first 7 channels), Inception Score (softmax, splits
of 5,000), precision and recall (k = 3 nearest-neighbour manifolds against the reference's
images), plus KID and, with --features, the Frechet distance in other feature spaces (mean-pooled
teacher tokens: effnet-lite0, dinov2-b:WEIGHTS, ...). Prints a table and writes JSON.

The Inception network is torch-fidelity's port of ADM's TensorFlow graph, with local weights
pt_inception-2015-12-05-6726825d.pth (--inception PATH or $SENDVAE_INCEPTION; nothing downloads).
Numbers are close to, not bit-identical with, ADM's TensorFlow evaluator: quote ADM's own for papers.

--make-ref SOURCE OUT.npz writes the reference format (arr_0 = up to --ref-images images, arr_1
labels, mu/sigma and mu_s/sigma_s over all images, mu_<name>/sigma_<name> for --features) for an
image store, shapes:N (with --resolution) or an npz, e.g. the ImageNet train set or val set.

Outputs: SAMPLES.metrics.json (or --json PATH); OUT.npz with --make-ref

Examples:
  sendvae evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
  sendvae evaluate --make-ref stores/shapes32 refs/shapes32.npz --features effnet-lite0
  sendvae evaluate samples.npz --ref refs/shapes32.npz --features effnet-lite0 --json results/shapes.json
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
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--no-kid", action="store_true", help="skip KID")
    parser.add_argument("--json", default=None, help="metrics file (default SAMPLES.metrics.json)")
    parser.add_argument("--resolution", type=int, default=None, help="--make-ref: image size of shapes:N")
    parser.add_argument(
        "--num-images", type=int, default=None, help="--make-ref: statistics over the first N images only"
    )
    parser.add_argument(
        "--ref-images", type=int, default=10_000, help="--make-ref: images kept in arr_0 (default 10,000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="--make-ref: which images are kept")
    parser.add_argument("--num-workers", type=int, default=0, help="--make-ref: data-loading processes for a store")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.errors import UserError
    from sendvae.eval.generation import evaluate_files, make_reference

    features = [f.strip() for f in args.features.split(",") if f.strip()]
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
        batch_size=args.batch_size,
        device=args.device,
        kid=not args.no_kid,
        num_samples=args.num_samples,
        json_out=args.json,
    )
    print(metrics.table())
    return 0
