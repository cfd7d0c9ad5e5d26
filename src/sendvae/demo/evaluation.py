"""The demo's evaluation classifiers and the reconstruction step.

Two independent CNNs (:mod:`sendvae.eval.shapes_classifier`; never the alignment teacher) give the
feature spaces of the Frechet distances and read the shape of an image:

- ``classifier/`` is trained on the probe study's real train images (the full shapes distribution);
  the ``recon/`` step measures FD(recon, real) of every VAE on its test set in this space;
- ``gen-classifier/`` is trained on the generation study's real images (the ``gen_data`` variant,
  :data:`sendvae.data.shapes.VARIANTS`); samples, and the reconstruction ceiling of each VAE that gets
  a SiT, are measured in its space against its held-out test images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sendvae.demo.config import DemoConfig
from sendvae.demo.plan import slug

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"
ARCH_FILE = "classifier.json"
REAL_STATS_FILE = "real_stats.npz"
GEN_CLASSIFIER_WIDTH = 32  # the generation study's data is easy (large solid shapes): a quarter of the FLOPs


class ClassifierFeatures:
    """The evaluation CNN's 256-d penultimate features as a feature extractor (``{"pool": [B, 256]}``, float64).

    ``bf16`` runs the CNN under bf16 autocast (2-3x faster on CPUs with native bf16); real and generated images go
    through the same path, so the Frechet distances compare like with like."""

    name = "clf"

    def __init__(self, model: torch.nn.Module, bf16: bool = False) -> None:
        self.model, self.bf16 = model.eval(), bf16
        self.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return {"pool": self.model.embed(images)}


def load_classifier(folder: Path) -> Any:
    """The evaluation CNN saved by a classifier step in ``folder``."""
    from safetensors.torch import load_file

    from sendvae.data.shapes import FACTOR_SIZES
    from sendvae.eval.shapes_classifier import ShapesClassifier

    arch = folder / ARCH_FILE
    width = json.loads(arch.read_text())["width"] if arch.is_file() else 64
    model = ShapesClassifier(list(FACTOR_SIZES), width=width)
    model.load_state_dict(load_file(str(folder / CLASSIFIER_FILE)))
    return model.eval()


def real_stats(folder: Path) -> Any:
    """The Gaussian of the real test images' features saved by a classifier step in ``folder``."""
    from sendvae.eval.feature_metrics import FeatureStats

    with np.load(folder / REAL_STATS_FILE) as f:
        return FeatureStats(f["mu"], f["sigma"])


def train_classifier(cfg: DemoConfig, train_path: str, test_path: str, folder: Path, steps: int,
                     width: int = 64) -> dict[str, Any]:
    """Steps ``classifier`` and ``gen-classifier``: the CNN (``width`` channels at full resolution) on the real
    train images of one store; its test accuracy per factor, the test set's feature statistics, and FD between
    two halves of the test set (the floor)."""
    from safetensors.torch import save_file

    from sendvae.data.shapes import FACTOR_SIZES, FACTORS
    from sendvae.data.store import ImageStore
    from sendvae.eval.feature_metrics import FeatureStats, frechet_distance
    from sendvae.eval.shapes_classifier import factor_accuracy, train_shapes_classifier

    train, test = ImageStore(train_path), ImageStore(test_path)
    model = train_shapes_classifier(
        train.images(0, len(train)), torch.from_numpy(train.factors), list(FACTOR_SIZES), steps=steps,
        batch_size=cfg.classifier_batch, seed=cfg.seed, precision=cfg.precision, width=width)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / CLASSIFIER_FILE))
    (folder / ARCH_FILE).write_text(json.dumps({"width": width}))
    images = test.images(0, len(test))
    accuracy = factor_accuracy(model, images, torch.from_numpy(test.factors))
    features = ClassifierFeatures(model, cfg.precision == "bf16")(images)["pool"].numpy()
    real = FeatureStats.of(features)
    np.savez(folder / REAL_STATS_FILE, mu=real.mu, sigma=real.sigma)
    half = len(features) // 2  # the floor: two disjoint halves of the real test set
    floor = frechet_distance(FeatureStats.of(features[:half]), FeatureStats.of(features[half:2 * half]))
    return {"accuracy": {f: float(a) for f, a in zip(FACTORS, accuracy)}, "fd_real_halves": floor,
            "half_size": half, "steps": steps, "width": width}


def evaluate_reconstructions(cfg: DemoConfig, data: dict[str, Any], vaes: dict[str, str], folder: Path) -> dict[str, Any]:
    """Step ``recon``: PSNR, SSIM, LPIPS (if its weights exist) and FD(recon, real) in classifier space."""
    from sendvae.data.store import ImageStore
    from sendvae.eval.feature_metrics import frechet_distance
    from sendvae.eval.generation import ImageSource, summarize
    from sendvae.eval.reconstruction import evaluate_reconstruction, vae_reconstructor
    from sendvae.losses import PerceptualLoss, default_vgg16_path
    from sendvae.models.vae_formats import load_vae
    from sendvae.pixels import to_model, to_uint8

    extractor = ClassifierFeatures(load_classifier(folder.parent / "classifier"), cfg.precision == "bf16")
    real = real_stats(folder.parent / "classifier")
    perceptual = PerceptualLoss() if default_vgg16_path().is_file() else None
    if perceptual is None:
        log.info("LPIPS skipped: no VGG16 weights at %s", default_vgg16_path())
    test = ImageStore(data["test"])
    fd_images = test.images(0, min(cfg.fd_images or cfg.num_samples, len(test)))
    shown = fd_images[:8]
    results, grids = {}, {"real": shown.permute(0, 2, 3, 1).numpy()}
    for name, path in vaes.items():
        vae = load_vae(path).eval()
        source = ImageSource(data["test"], num_images=cfg.recon_images or None)
        metrics = evaluate_reconstruction(vae_reconstructor(vae), source, None, perceptual, batch_size=250)
        reconstruct = vae_reconstructor(vae)
        stats = summarize(((reconstruct(x), None) for x in fd_images.split(250)), [extractor], total=len(fd_images),
                          desc=f"{name} recon features")
        results[name] = {"psnr": metrics.psnr, "ssim": metrics.ssim, "lpips": metrics.lpips,
                         "fd_recon": frechet_distance(stats.stats["clf.pool"], real), "fd_images": len(fd_images)}
        with torch.inference_mode():
            grids[name] = to_uint8(vae.decode(vae.encode(to_model(shown)).mean)).permute(0, 2, 3, 1).numpy()
    np.savez(folder / "examples.npz", **{slug(k): v for k, v in grids.items()})
    return {"metrics": results, "examples": list(grids), "lpips": perceptual is not None}
