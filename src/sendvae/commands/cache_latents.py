"""``sendvae cache-latents``: encode an image dataset (and its h-flips) into a latent cache for stage 2."""

from __future__ import annotations

import argparse
from typing import Any

from sendvae.commands._common import add_command

DESCRIPTION = """\
Encode every image of DATA and its horizontal flip with the frozen VAE into the posterior
(mean, std), written to OUT in safetensors shards plus manifest.json (VAE path and fingerprint,
dataset spec, count and hash, latent shape). train-sit refuses a cache made by another VAE.
The latent normalisation is not baked in: it travels with the VAE and is applied when training
reads the cache. With --teacher the teacher's patch tokens (the REPA targets) are cached too, for
both flips, so training does not run the teacher.

Inputs:  --vae CKPT (sendvae VAE folder, diffusers folder or LDM checkpoint), --data STORE
         (an image store folder or shapes:N)
Output:  OUT/manifest.json, OUT/shard-NNNNNN.safetensors
Runs on many GPUs with torchrun (each rank encodes every W-th shard); rerun the same command to
resume an interrupted cache.

Example:
  sendvae cache-latents --vae runs/vae/vae --data shapes:2000 --resolution 32 \\
      --teacher effnet-lite0 caches/shapes
  torchrun --nproc_per_node 8 -m sendvae.cli cache-latents --vae send-vae/ \\
      --data stores/imagenet256 --teacher dinov2-b --teacher-weights dinov2_vitb14_pretrain.pth \\
      --batch-size 128 --precision bf16 caches/imagenet256
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "cache-latents", "encode images (+ h-flips) to a latent cache", DESCRIPTION)
    parser.add_argument("out", help="output folder of the cache")
    parser.add_argument("--vae", required=True, help="VAE checkpoint: sendvae/diffusers folder or LDM checkpoint file")
    parser.add_argument("--data", required=True, help="image data: a store folder or shapes:N")
    parser.add_argument("--resolution", type=int, default=None, help="image size for generated data (shapes:N)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (per process)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard file")
    parser.add_argument("--teacher", default=None,
                        help="also cache this teacher's tokens (e.g. dinov2-b, effnet-lite0)")
    parser.add_argument("--teacher-weights", default=None, help="local weights of the teacher")
    parser.add_argument("--teacher-antialias", action="store_true",
                        help="resize the images for the teacher with antialiasing (default: plain bicubic, as REPA)")
    parser.add_argument("--teacher-grid", type=int, default=None,
                        help="teacher token grid = the SiT token grid (default: the latent grid; 16 for "
                             "SiT-XL/2 on f8 latents)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="encoder precision; auto = bf16 where the device computes it natively, else fp32")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage type of mean/std")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.data.latents import cache_latents

    manifest = cache_latents(
        args.vae, args.data, args.out, args.batch_size,
        resolution=args.resolution, shard_size=args.shard_size, teacher=args.teacher,
        teacher_weights=args.teacher_weights, teacher_grid=args.teacher_grid,
        teacher_antialias=args.teacher_antialias,
        precision=args.precision, dtype=args.dtype,
        device=args.device, num_workers=args.num_workers,
    )
    print(f"latent cache: {manifest}")
    return 0
