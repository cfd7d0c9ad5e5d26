"""Metrics between feature sets, as ADM's evaluator computes them: FD, Inception Score, precision / recall, KID.

Used by the generation metrics (:mod:`sendvae.eval.generation`), the reconstruction metrics and the
demo's classifier space alike. :class:`FeatureStats` is a Gaussian fitted to features (float64, unbiased
covariance), :class:`RunningStats` accumulates one batch by batch; :func:`frechet_distance`,
:func:`inception_score`, :func:`precision_recall` (Kynkaanniemi et al. 2019) and
:func:`kernel_inception_distance` (Binkowski et al. 2018) follow the conventions listed in
:mod:`sendvae.eval.generation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sendvae.errors import UserError

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3


@dataclass
class FeatureStats:
    """A Gaussian fitted to features: mean and unbiased covariance, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


class RunningStats:
    """Mean and unbiased covariance accumulated batch by batch in float64.

    Sums are taken about the first image's features (a shift that does not depend on the batch size),
    which keeps the subtraction ``sum(x x^T) - n mu mu^T`` from cancelling digits when the mean is large.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = x[0].copy()
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def result(self) -> FeatureStats:
        if self.n < 2 or self.shift is None:
            raise UserError(f"statistics need at least 2 images, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return FeatureStats(mean + self.shift, sigma)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` in float64.

    ADM (after TTUR) takes ``scipy.linalg.sqrtm`` of the non-symmetric product ``S_a S_b``. Only the
    trace of that root enters, and ``S_a S_b`` has the eigenvalues of the symmetric PSD matrix
    ``S_a^(1/2) S_b S_a^(1/2)``, so ``tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``:
    the same number (tested against sqrtm), from two symmetric eigendecompositions, which stay exact
    for singular covariances (fewer images than dimensions) and take seconds instead of a minute at d = 2048.
    """
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UserError(
            f"feature statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    eigenvalues, vectors = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
    middle = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``, softmax in float64."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, block: int = 4096) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point, computed in row x column blocks."""
    n = len(features)
    if n <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} points, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0 : r0 + block]
        best = torch.full((len(rows), k), math.inf, dtype=features.dtype, device=features.device)
        row_index = torch.arange(r0, r0 + len(rows), device=features.device)
        for c0 in range(0, n, block):
            d = _squared_distances(rows, features[c0 : c0 + block])
            col_index = torch.arange(c0, c0 + d.shape[1], device=features.device)
            d.masked_fill_(row_index[:, None] == col_index[None, :], math.inf)  # a point is not its own neighbour
            nearest = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            best = torch.cat([best, nearest], dim=1).topk(k, dim=1, largest=False).values
        radii[r0 : r0 + len(rows)] = best[:, k - 1]
    return radii


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point, whether it lies within ``radii[j]`` (squared) of some centre j."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for r0 in range(0, len(points), block):
        rows = points[r0 : r0 + block]
        for c0 in range(0, len(centres), block):
            d = _squared_distances(rows, centres[c0 : c0 + block])
            inside[r0 : r0 + len(rows)] |= (d <= radii[None, c0 : c0 + block]).any(dim=1)
    return inside


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = PR_NEIGHBOURS,
    device: torch.device | str = "cpu",
    block: int = 4096,
) -> tuple[float, float]:
    """Improved precision and recall with k-nearest-neighbour manifolds (float64, blocked)."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)
    ref_radii, gen_radii = manifold_radii(ref, k, block), manifold_radii(gen, k, block)
    precision = _inside_manifold(gen, ref, ref_radii, block).double().mean().item()
    recall = _inside_manifold(ref, gen, gen_radii, block).double().mean().item()
    return precision, recall


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std over random subsets of the unbiased MMD^2 with kernel ``(x.y / d + 1)^3``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
