"""An independent shapes classifier: the feature space for the demo's generation metrics.

The demo cannot use the ImageNet Inception network at 32 px, and must not use the alignment teacher
(that would reward the aligned VAEs for resembling their teacher). So it trains a small CNN on the real
shapes images, with one head per factor (PILOT.md "Evaluation CNN"): its 256-d penultimate features
give a Frechet distance, and its shape head reads the class of a generated sample (class consistency).
Random Gaussian blur during training keeps the feature space from being dominated by sharpness
(PILOT.md pitfall 5).

:func:`sample_metrics` measures a set of images against the real test set in this space (Frechet
distance and class consistency); :func:`reconstruction_ceiling` applies it to a VAE's own
reconstructions of the test set: no sample decoded by that VAE can be expected to do better, so the
ceiling shows how much of a generation gap is the VAE's and how much the generator's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sendvae.eval.feature_metrics import FeatureStats, frechet_distance
from sendvae.hardware import autocast, resolve_precision
from sendvae.pixels import to_model
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesClassifier(nn.Module):
    """Six 3x3 conv layers (two per scale, stride 2 between), global pooling, a 256-d feature, factor heads."""

    def __init__(self, factor_sizes: list[int], width: int = 64, feature_dim: int = 256) -> None:
        super().__init__()
        self.factor_sizes = list(factor_sizes)
        self.body = nn.Sequential(
            _conv(3, width, 1), _conv(width, width, 1),
            _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
            _conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width, 1),
        )
        self.feature = nn.Sequential(nn.Linear(4 * width * 2, feature_dim), nn.SiLU())
        self.heads = nn.Linear(feature_dim, sum(self.factor_sizes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> penultimate features [B, feature_dim]."""
        h = self.body(to_model(images))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.feature(pooled)

    def factor_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One logit tensor [B, size] per factor, in ``factor_sizes`` order."""
        return list(self.heads(self.features(images)).split(self.factor_sizes, dim=1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Argmax factor indices [B, n_factors] for uint8 images."""
        self.eval()
        out = [torch.stack([l.argmax(1) for l in self.factor_logits(chunk)], dim=1)
               for chunk in images.split(batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features for many uint8 images, in float64 (for Frechet distances)."""
        self.eval()
        return torch.cat([self.features(chunk).double() for chunk in images.split(batch_size)])


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.2) -> torch.Tensor:
    """Blur each uint8 image with a Gaussian of sigma ~ U(0, max_sigma) (half of them left sharp)."""
    out = images.float()
    sigmas = torch.rand(images.shape[0], generator=generator) * max_sigma
    sigmas[torch.rand(images.shape[0], generator=generator) < 0.5] = 0.0
    radius = max(1, math.ceil(2 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    for i, sigma in enumerate(sigmas.tolist()):
        if sigma < 0.2:
            continue
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(out)
        img = out[i : i + 1]
        img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        out[i : i + 1] = img
    return out.round().clamp(0, 255).to(torch.uint8)


def train_shapes_classifier(
    images: torch.Tensor,
    factors: torch.Tensor,
    factor_sizes: list[int],
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    blur: bool = True,
    precision: str = "auto",
    progress: bool = True,
    width: int = 64,
) -> ShapesClassifier:
    """Train the classifier (``width`` channels at full resolution) on real uint8 images [N, 3, H, W] with factor
    indices [N, n_factors]."""
    precision = resolve_precision(precision, "cpu", "precision").precision
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ShapesClassifier(factor_sizes, width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(steps), desc="shapes classifier", disable=not (progress and bars_enabled()), leave=False)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch = random_blur(images[idx], generator) if blur else images[idx]
        with autocast(precision, "cpu"):
            logits = model.factor_logits(batch)
        loss = sum(F.cross_entropy(l.float(), factors[idx, j]) for j, l in enumerate(logits)) / len(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def factor_accuracy(model: ShapesClassifier, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-factor accuracy [n_factors] of the classifier on labelled images."""
    return (model.predict(images) == factors).float().mean(0)


def class_consistency(model: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor, factor: int = 0) -> float:
    """The share of images whose ``factor`` (default: shape) the classifier reads as the requested label."""
    return (model.predict(images)[:, factor] == labels).float().mean().item()


def sample_metrics(model: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor, real: FeatureStats,
                   batch_size: int = 512) -> dict[str, float]:
    """``{"class_consistency", "fd"}`` of uint8 images [N, 3, H, W] meant to show class ``labels`` [N]: the share
    the classifier reads as their class, and the Frechet distance of their features to ``real`` (the real
    test images' Gaussian in the same feature space)."""
    features = model.embed(images, batch_size).numpy()
    return {"class_consistency": class_consistency(model, images, labels),
            "fd": frechet_distance(FeatureStats.of(features), real)}


def reconstruction_ceiling(model: ShapesClassifier, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                           images: torch.Tensor, labels: torch.Tensor, real: FeatureStats,
                           batch_size: int = 250) -> dict[str, float]:
    """:func:`sample_metrics` of a VAE's reconstructions (``reconstruct``: uint8 -> uint8) of real test images with
    their true classes: the class accuracy and FD that samples decoded by the same VAE can at best reach."""
    with torch.inference_mode():
        recon = torch.cat([reconstruct(chunk) for chunk in images.split(batch_size)])
    return sample_metrics(model, recon, labels, real)
