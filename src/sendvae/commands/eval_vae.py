"""``sendvae eval-vae``: reconstruction metrics of a VAE (rFID, PSNR, SSIM, LPIPS)."""

from __future__ import annotations

import argparse
from typing import Any

from sendvae.commands._common import add_command

DESCRIPTION = """\
Reconstruct the images of DATA with the VAE (encode, draw a posterior sample, decode, round to uint8)
and measure them against the originals: rFID (Inception pool_3 statistics of the reconstructions vs
the originals; the paper's protocol is the 50k ImageNet validation images at 256 px), PSNR (per
image, then the mean), SSIM (11x11 Gaussian window, sigma 1.5, on [0, 255], channel mean) and
LPIPS (VGG; when its weights are at hand). By default the decoded latent is a posterior sample with
noise seeded by (--seed, image index), as in LightningDiT's tokenizer evaluation (the source of VA-VAE's
rFID 0.28); --posterior mean decodes the posterior mean. The table and the JSON say which. Results do
not depend on --batch-size.

Inputs:  --vae CKPT (sendvae VAE folder, diffusers folder or LDM checkpoint), --data STORE
         (an image store folder or shapes:N), Inception weights (--inception or $SENDVAE_INCEPTION)
Output:  a printed table, and JSON with --json

Examples:
  sendvae eval-vae --vae runs/vae/vae --data shapes:500 --resolution 32 --lpips none
  sendvae eval-vae --vae send-vae/ --data stores/imagenet256-val --batch-size 64 \\
      --inception pt_inception-2015-12-05-6726825d.pth --json results/send-vae-recon.json
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "eval-vae", "rFID, PSNR, SSIM, LPIPS of a VAE's reconstructions", DESCRIPTION)
    parser.add_argument("--vae", required=True, help="VAE checkpoint: sendvae/diffusers folder or LDM checkpoint file")
    parser.add_argument("--data", required=True, help="image store folder or shapes:N")
    parser.add_argument("--num-images", type=int, default=None, help="the first N images only (default all)")
    parser.add_argument("--resolution", type=int, default=None, help="image size for shapes:N (default: the VAE's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inception", default=None, help="Inception weights file (default $SENDVAE_INCEPTION)")
    parser.add_argument(
        "--lpips",
        default=None,
        help="LPIPS/VGG16 weights file; 'none' skips LPIPS (default: torchvision's cache if present)",
    )
    parser.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                        help="decode a posterior sample (default; the published rFID protocol) or the mean")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (per image index)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.eval.reconstruction import evaluate_vae

    metrics = evaluate_vae(
        args.vae,
        args.data,
        num_images=args.num_images,
        resolution=args.resolution,
        batch_size=args.batch_size,
        inception=args.inception,
        lpips=args.lpips,
        device=args.device,
        posterior=args.posterior,
        seed=args.seed,
        num_workers=args.num_workers,
        json_out=args.json,
    )
    print(metrics.table())
    return 0
