"""``sendvae data``: preview the shapes dataset, prepare uint8 stores, describe datasets."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sendvae.commands._common import add_command
from sendvae.errors import UserError

DATA_HELP = """\
Data for every stage: the procedural shapes dataset, uint8 stores prepared from image folders,
attribute datasets for the probes. Examples:

  sendvae data preview shapes --out grid.png      a labelled PNG grid of the shapes dataset
  sendvae data prepare SRC OUT --resolution 256   image folder or shapes:N -> uint8 store
  sendvae data info SPEC                          what a store or an attribute dataset holds
"""

PREVIEW_HELP = """\
Write a PNG grid of a dataset with each image's labels under it.

input:  DATASET = shapes (the procedural dataset; --seed picks the dataset), shapes:N@SEED, or a
        store folder made by `sendvae data prepare`
output: --out PNG file; each shapes image is captioned with all 8 factors (shape, object hue,
        background, size, rotation, x, y, texture); store images with their index and class

example:
  sendvae data preview shapes --out report/shapes_preview.png --n 16 --resolution 64 --seed 0
"""

PREPARE_HELP = """\
Prepare a uint8 store: decode, ADM-centre-crop and shard a dataset once, so that training reads
memory-mapped arrays instead of decoding images.

input:  SRC = an image folder (ImageNet layout: one sub-folder per class, labels in sorted class
        order; or flat: every label 0), or shapes:N / shapes:N@SEED (the procedural dataset)
output: OUT/ with shards/images_*.npy (uint8 [n, H, W, 3]), labels, per-shard records and
        manifest.json (count, resolution, source, content hash, class names, skipped files)

Bad files (empty, undecodable, truncated, decompression bombs) are skipped and listed in the
report and the manifest; --strict stops at the first one instead, naming it. An interrupted run
continues where it stopped when the same command is run again.

examples:
  sendvae data prepare /data/imagenet/train stores/in256 --resolution 256 --workers 16
  sendvae data prepare shapes:20000 stores/shapes32 --resolution 32
"""

INFO_HELP = """\
Print what a dataset holds, as JSON.

input:  SPEC = a store folder (its manifest without the shard list), or an attribute dataset
        celeba:ROOT, awa2:ROOT, deepfashion:ROOT, csv:FILE, shapes:N[@SEED] (attribute count,
        split sizes, fraction of unknown labels)
output: JSON on stdout

examples:
  sendvae data info stores/in256
  sendvae data info celeba:/data/celeba
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "data", "datasets: preview shapes, prepare uint8 stores, describe", DATA_HELP)
    actions = parser.add_subparsers(dest="data_command", metavar="<action>")
    parser.set_defaults(func=lambda args: _usage(parser))

    preview = add_command(actions, "preview", "write a labelled PNG grid of a dataset", PREVIEW_HELP)
    preview.add_argument("dataset", help="shapes, shapes:N@SEED or a store folder")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    preview.add_argument("--resolution", type=int, default=64, help="shapes resolution in pixels, 16..256 (default 64)")
    preview.add_argument("--seed", type=int, default=0, help="shapes dataset seed (default 0)")
    preview.set_defaults(func=run_preview)

    prepare = add_command(actions, "prepare", "image folder or shapes:N -> sharded uint8 store", PREPARE_HELP)
    prepare.add_argument("src", help="image folder, or shapes:N[@SEED]")
    prepare.add_argument("out", help="store folder to create (or to finish after an interruption)")
    prepare.add_argument("--resolution", type=int, default=256, help="output side in pixels (default 256)")
    prepare.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    prepare.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                         help="decoding processes (default: min(8, CPUs); 0 = in this process)")
    prepare.add_argument("--shard-size", type=int, default=1024, help="source images per shard (default 1024)")
    prepare.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prepare.set_defaults(func=run_prepare)

    info = add_command(actions, "info", "describe a store or an attribute dataset (JSON)", INFO_HELP)
    info.add_argument("spec", help="store folder, celeba:ROOT, awa2:ROOT, deepfashion:ROOT, csv:FILE or shapes:N")
    info.add_argument("--resolution", type=int, default=64, help="resolution for attribute datasets (default 64)")
    info.set_defaults(func=run_info)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_preview(args: argparse.Namespace) -> int:
    from sendvae.data import shapes, store

    if args.dataset == "shapes":
        path = shapes.preview(args.out, args.n, args.resolution, args.seed)
    elif (spec := shapes.parse_spec(args.dataset)) is not None:
        path = shapes.preview(args.out, min(args.n, spec.n), args.resolution, spec.seed, variant=spec.variant)
    else:
        path = store.preview_store(args.dataset, args.out, args.n)
    print(f"wrote {path}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from sendvae.data.store import prepare_store

    manifest = prepare_store(
        args.src, args.out, args.resolution, strict=args.strict, workers=args.workers,
        shard_size=args.shard_size, progress=not args.no_progress,
    )
    print(report(manifest, Path(args.out)))
    return 0


def report(manifest: dict[str, Any], out: Path, limit: int = 50) -> str:
    """The run report: what was stored and every skipped file with its reason (first ``limit``)."""
    lines = [
        f"store {out}: {manifest['count']} images at {manifest['resolution']}x{manifest['resolution']} "
        f"from {manifest['source']}",
        f"classes: {manifest['num_classes']}; shards: {len(manifest['shards'])}; "
        f"content hash {manifest['content_hash']}",
    ]
    skipped = manifest["skipped"]
    lines.append(f"skipped files: {len(skipped)}")
    for entry in skipped[:limit]:
        lines.append(f"  {entry['path']}: {entry['reason']}")
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all listed in {out / 'manifest.json'})")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    from sendvae.data import attributes, store

    spec = args.spec
    kind = spec.partition(":")[0]
    if kind in ("celeba", "awa2", "deepfashion", "csv", "shapes"):
        summary = attributes.describe(attributes.open_attribute_dataset(spec, args.resolution))
    else:
        manifest = store.read_manifest(spec)
        if not Path(spec).is_dir():
            raise UserError(f"{spec} is not a store folder")
        summary = {k: v for k, v in manifest.items() if k not in ("shards", "plan")}
        summary["shards"] = len(manifest["shards"])
    print(json.dumps(summary, indent=1))
    return 0
