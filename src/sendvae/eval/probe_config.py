"""Settings of ``sendvae probe`` (SPEC.md section 3), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from sendvae.config import param

DEFAULT_L2_GRID: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 0.0)


@dataclass
class ProbeConfig:
    """Knobs of ``sendvae probe`` (inputs -- VAEs, datasets, references, output -- are flags)."""

    resolution: int = param(256, "image side the datasets are centre-cropped/resized to", min=8)
    use_mean: bool = param(True, "probe the posterior mean (true) or one posterior sample seeded per image (false)")
    batch_size: int = param(64, "images per encoder call", min=1)
    num_workers: int = param(0, "DataLoader workers for decoding images", min=0)
    device: str = param("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    cache_dir: str = param("", "feature cache folder (default OUT/feature_cache; 'none' disables it)")
    l2_grid: list[float] = param(list(DEFAULT_L2_GRID), "L2 weights tried; chosen per attribute on validation log-loss")
    max_iter: int = param(300, "L-BFGS iterations per L2 value", min=1)
    check_every: int = param(10, "L-BFGS iterations between early-stopping checks", min=1)
    patience: int = param(3, "early-stopping checks without improvement", min=1)
    val_fraction: float = param(0.1, "part of train carved as validation when the dataset has no val split",
                                min=0.01, max=0.9)
    max_train: int = param(0, "cap on probe-train images, a seeded subset (0 = all)", min=0)
    pca_dim: int = param(0, "PCA the VAE features to this many dims first (0 = no: the paper's setting)", min=0)
    reference_pca_dim: int = param(512, "PCA reference rows (pixels, teacher) wider than this (0 = never)", min=0)
    top_k: list[int] = param([3, 5], "k values for top-k recall (DeepFashion protocol)")
    recall_best: int = param(50, "top-k recall: per-attribute recall averaged over this many best attributes "
                             "(mmfashion's DeepFashion protocol: 50); 0 = all attributes with a positive", min=0)
    latent_metrics: bool = param(False, "also compute uniformity, GMM discrimination and class-probe accuracy per row")
    gmm_k_grid: list[int] = param([1, 2, 4, 8, 16, 32, 64], "GMM component counts for the discrimination metric")
    seed: int = param(0, "seed for the validation carve, subsets, posterior samples and random-init VAEs")
