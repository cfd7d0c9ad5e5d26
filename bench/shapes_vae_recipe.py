"""Experiment: how fast a base VAE recipe learns to draw shapes (the table in docs/demo_full.md, "The base VAE recipe").

Trains ``tiny-f4c4`` from random init on the full shapes data (batch ``--batch``, L1 plus ``--kl`` times the KL,
grad clip 1.0, AdamW with a linear warm-up of ``--warmup`` steps) and every ``--every`` steps prints the
reconstruction ceiling on ``shapes-gen`` test images: the class accuracy and FD of the VAE's reconstructions
(posterior means) in the feature space of a demo's generation classifier, plus the mean posterior log-variance.
At the end it prints the per-channel posterior standard deviation beside the spread of the posterior means.

Needs a finished ``sendvae demo`` folder (its ``gen-classifier/`` and ``data/gen-test/``). Not part of
``make bench`` (minutes per run). The rows of the docs table:

    A  --lr 5e-4                                   (the old preset: posterior samples, log-variance init 0)
    B  --lr 2e-3 --warmup 50
    C  --mode --lr 5e-4                            (posterior means: a plain autoencoder)
    D  --mode --lr 1e-3 --warmup 50
    E  --logvar-init -8 --lr 1e-3 --warmup 50
    F  --logvar-init -8 --lr 1e-3 --warmup 50 --grad 1

Run: ``.venv/bin/python bench/shapes_vae_recipe.py --demo demo_out --lr 1e-3 --warmup 50 --mode``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sendvae.data.shapes import render_batch
from sendvae.data.store import ImageStore
from sendvae.demo.evaluation import load_classifier, real_stats
from sendvae.eval.reconstruction import vae_reconstructor
from sendvae.eval.shapes_classifier import reconstruction_ceiling
from sendvae.hardware import describe_cpu
from sendvae.models.vae import build_vae
from sendvae.pixels import to_model


def image_gradient_l1(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical pixel differences of two image batches."""
    dx = (x_hat[..., 1:] - x_hat[..., :-1]) - (x[..., 1:] - x[..., :-1])
    dy = (x_hat[..., 1:, :] - x_hat[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished sendvae demo folder")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--mode", action="store_true", help="decode the posterior mean instead of a sample")
    parser.add_argument("--logvar-init", type=float, default=0.0)
    parser.add_argument("--kl", type=float, default=1e-6)
    parser.add_argument("--grad", type=float, default=0.0, help="weight of an L1 term on image gradients")
    parser.add_argument("--test", type=int, default=500, help="shapes-gen test images of the ceiling")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = describe_cpu()
    print(f"CPU: {cpu['cpu_model']} ({cpu['cpu_capability']}, native bf16: {cpu['cpu_native_bf16']}), "
          f"{args.threads} thread(s), fp32")

    classifier, real = load_classifier(args.demo / "gen-classifier"), real_stats(args.demo / "gen-classifier")
    test = ImageStore(args.demo / "data" / "gen-test")
    images, labels = test.images(0, args.test), torch.from_numpy(test.labels[:args.test])
    vae = build_vae("tiny-f4c4", 32, logvar_init=args.logvar_init)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch, _ = render_batch(np.arange((step - 1) * args.batch, step * args.batch), 32, 0)
        x = to_model(torch.from_numpy(batch).permute(0, 3, 1, 2))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        posterior = vae.encode(x)
        x_hat = vae.decode(posterior.mean if args.mode else posterior.sample())
        loss = (x_hat - x).abs().mean() + args.kl * posterior.kl().mean()
        if args.grad:
            loss = loss + args.grad * image_gradient_l1(x_hat, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            vae.eval()
            ceiling = reconstruction_ceiling(classifier, vae_reconstructor(vae), images, labels, real)
            vae.train()
            print(f"step {step}: {time.time() - start:.0f} s, ceiling class accuracy {ceiling['class_consistency']:.3f}, "
                  f"FD {ceiling['fd']:.1f}, mean log-variance {posterior.logvar.mean().item():.2f}", flush=True)
    with torch.no_grad():
        posterior = vae.eval().encode(to_model(images))
    print("posterior std per channel", [round(v, 3) for v in posterior.std.mean(dim=(0, 2, 3)).tolist()],
          "spread of the means", [round(v, 3) for v in posterior.mean.std(dim=(0, 2, 3)).tolist()])


if __name__ == "__main__":
    main()
