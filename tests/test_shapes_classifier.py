"""The demo's independent evaluation CNN learns the shapes factors and measures class consistency."""

from __future__ import annotations

import pytest
import torch

from sendvae.data.shapes import FACTOR_SIZES, ShapesDataset
from sendvae.eval.feature_metrics import FeatureStats
from sendvae.eval.shapes_classifier import (
    class_consistency, factor_accuracy, random_blur, reconstruction_ceiling, sample_metrics, train_shapes_classifier,
)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = ShapesDataset(n, resolution=16, seed=seed).batch(range(n))
    return batch["image"], batch["factors"]


def test_classifier_learns_easy_factors_far_above_chance():
    images, factors = _data(1024, seed=0)
    test_images, test_factors = _data(256, seed=1)
    model = train_shapes_classifier(images, factors, list(FACTOR_SIZES), steps=60, batch_size=64, progress=False)
    accuracy = factor_accuracy(model, test_images, test_factors)
    names = ["shape", "object_hue", "background", "size", "rotation", "x", "y", "texture"]
    assert accuracy[names.index("background")] > 0.9  # chance 0.25
    assert accuracy[names.index("object_hue")] > 0.6  # chance 0.125
    # class consistency is the shape accuracy against requested labels
    consistency = class_consistency(model, test_images, test_factors[:, 0])
    assert abs(consistency - accuracy[0].item()) < 1e-6
    features = model.embed(test_images[:8])
    assert features.shape == (8, 256) and features.dtype == torch.float64


def test_random_blur_keeps_shape_and_mean_colour():
    images, _ = _data(16, seed=0)
    blurred = random_blur(images, torch.Generator().manual_seed(0), max_sigma=1.2)
    assert blurred.shape == images.shape and blurred.dtype == torch.uint8
    changed = (blurred != images).flatten(1).any(1)
    assert 0 < changed.sum() < 16  # about half are left sharp
    # a blur preserves the mean colour up to edge effects and rounding
    assert (blurred.float().mean((2, 3)) - images.float().mean((2, 3))).abs().max() < 6


def test_reconstruction_ceiling_is_the_sample_metrics_of_the_reconstructions():
    images, factors = _data(512, seed=0)
    test_images, test_factors = _data(128, seed=1)
    model = train_shapes_classifier(images, factors, list(FACTOR_SIZES), steps=30, batch_size=64, progress=False,
                                    width=16)
    real = FeatureStats.of(model.embed(test_images).numpy())
    labels = test_factors[:, 0]
    perfect = reconstruction_ceiling(model, lambda x: x, test_images, labels, real, batch_size=50)
    assert perfect["class_consistency"] == pytest.approx(class_consistency(model, test_images, labels))
    assert perfect["fd"] == pytest.approx(0.0, abs=1e-3)  # the same images as the reference (sqrtm round-off)
    grey = reconstruction_ceiling(model, lambda x: torch.full_like(x, 128), test_images, labels, real)
    assert grey["fd"] > 1.0 and grey == sample_metrics(model, torch.full_like(test_images, 128), labels, real)
