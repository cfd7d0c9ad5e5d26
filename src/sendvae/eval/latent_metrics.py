"""The other latent metrics the Send-VAE paper compares its attribute probe against (SPEC.md section 3).

The paper (arXiv 2601.05823, Figures 1-2) reports that three existing latent-space measures do *not*
track gFID as well as attribute-level linear probing. Each is implemented here from its source's
definition:

* :func:`class_probe_accuracy` -- **semantic gap / linear probing** (e.g. ImageNet classes): the
  test accuracy of a multinomial logistic regression on the flattened (or spatially mean-pooled)
  latent, features standardised with train statistics, L2 chosen on a validation split.
* :func:`kde_uniformity` -- **uniformity** as in VA-VAE (Yao et al., "Reconstruction vs. Generation:
  Taming Optimization Dilemma with Vision Foundation Model Aligned Latent Diffusion Models",
  arXiv 2501.01423, and its released analysis script, LightningDiT ``tools/latent_vis.py``): one latent
  token per image at a random position (a C-vector, standardised per channel), embedded in 2-D with
  t-SNE (perplexity 30), a Gaussian kernel density estimate (Scott's rule, full covariance) of the
  embedding evaluated **at the embedded points**, and the **Gini coefficient** of those densities
  (lower = more uniform) with their normalised entropy (higher = more uniform). Options: PCA instead
  of t-SNE (deterministic, fast), and the density on a regular grid over the bounding box
  (``density_at="grid"``), where empty regions count as non-uniform (at the samples, equally sized
  well-separated clusters look uniform).
* :func:`gmm_discrimination` -- **discrimination** as in MAETok (Chen et al., "Masked Autoencoders
  Are Effective Tokenizers for Diffusion Models", arXiv 2502.03444, section 2): Gaussian mixtures
  with K components are fitted (EM, diagonal covariances, written here in torch) to the latent
  tokens; the held-out negative log-likelihood per dimension as a function of K is reported. A
  latent that a GMM fits with fewer modes (lower NLL at small K) is more "discriminative" in
  MAETok's sense; ``modes`` is the smallest K in the grid whose NLL is within ``tolerance`` of the
  whole NLL drop from K = 1 to the best K (and at least ``min_gain`` nats/dim of the best).

:func:`latent_metric_summary` computes all three for one probe row (used by ``sendvae probe
--latent-metrics``), so ``sendvae correlate`` can set them against gFID next to the attribute F1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sendvae.errors import UserError
from sendvae.eval.probe_solver import PCA, Standardizer, carve_validation, fit_with_lbfgs

# ----------------------------------------------------------------------------------------------
# Class linear-probe accuracy
# ----------------------------------------------------------------------------------------------


def pool_latents(latents: Tensor, pool: str = "flatten") -> Tensor:
    """[N, C, h, w] -> [N, C*h*w] (``flatten``) or [N, C] (``mean`` over positions)."""
    if pool == "flatten":
        return latents.flatten(1)
    if pool == "mean":
        return latents.flatten(2).mean(2) if latents.dim() > 2 else latents
    raise UserError(f"pool must be 'flatten' or 'mean', got {pool!r}")


def class_probe_accuracy(
    train_x: Tensor,
    train_labels: Tensor,
    test_x: Tensor,
    test_labels: Tensor,
    *,
    l2_grid: Sequence[float] = (1e-2, 1e-3, 1e-4, 1e-5, 0.0),  # chosen by validation cross-entropy
    val_fraction: float = 0.1,  # carved from train (seeded)
    max_iter: int = 300,  # L-BFGS iterations per L2 value
    seed: int = 0,
    device: str | torch.device | None = None,
    standardize: bool = True,  # z-score with train statistics (False: features already on a common scale)
) -> dict[str, float]:
    """Top-1 test accuracy of a multinomial logistic regression on features [N, D] (any integer labels).

    Objective: ``mean_i CE(W x_i + b, y_i) + (l2 / 2) |W|^2`` on standardised features, full-batch
    L-BFGS with early stopping on the validation cross-entropy.
    """
    if train_x.dim() != 2 or test_x.dim() != 2:
        raise UserError("class_probe_accuracy expects flattened or pooled features [N, D] (see pool_latents)")
    classes = torch.unique(torch.cat([train_labels, test_labels]))
    if len(classes) < 2:
        raise UserError("class_probe_accuracy needs at least two classes")
    remap = {int(c): i for i, c in enumerate(classes)}
    to_index = lambda t: torch.tensor([remap[int(v)] for v in t], dtype=torch.long)  # noqa: E731
    y_all, y_test = to_index(train_labels), to_index(test_labels)
    tr, va = carve_validation(len(train_x), val_fraction, seed)
    device = torch.device(device) if device is not None else train_x.device
    if standardize:
        standardizer = Standardizer.fit(train_x[tr])
    else:
        standardizer = Standardizer(torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1]))
    xt, xv, xs = (standardizer.copy_to(x, device) for x in (train_x[tr], train_x[va], test_x))
    yt, yv = y_all[tr].to(device), y_all[va].to(device)
    w = torch.zeros(xt.shape[1], len(classes), device=device, requires_grad=True)
    b = torch.zeros(len(classes), device=device, requires_grad=True)

    def val_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(xv @ w + b, yv))

    best: tuple[float, float, Tensor, Tensor] | None = None
    for l2 in sorted(set(float(v) for v in l2_grid), reverse=True):

        def objective(l2: float = l2) -> Tensor:
            return F.cross_entropy(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()

        loss = float(fit_with_lbfgs([w, b], objective, val_loss, max_iter=max_iter)[0])
        if best is None or loss < best[0]:
            best = (loss, l2, w.detach().clone(), b.detach().clone())
    assert best is not None
    _, l2, w_best, b_best = best
    with torch.no_grad():
        accuracy = float(((xs @ w_best + b_best).argmax(1).cpu() == y_test).float().mean())
    return {"accuracy": accuracy, "l2": l2, "num_classes": float(len(classes)), "chance": 1.0 / len(classes)}


# ----------------------------------------------------------------------------------------------
# Uniformity (VA-VAE): Gini coefficient of a KDE density
# ----------------------------------------------------------------------------------------------


def gini_coefficient(values: Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n - 1) / n when one holds everything.

    ``G = sum_i (2 i - n - 1) v_(i) / (n sum_i v_i)`` with ``v_(i)`` sorted ascending, i = 1..n
    (equal to the mean absolute difference over all pairs divided by twice the mean).
    """
    v = values.double().flatten().sort().values
    if bool((v < 0).any()):
        raise ValueError("the Gini coefficient needs non-negative values")
    n, total = v.numel(), float(v.sum())
    if n == 0 or total <= 0:
        return math.nan
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * v).sum() / (n * total))


def embed_2d(points: Tensor, projection: str = "tsne", seed: int = 0, perplexity: float = 30.0) -> Tensor:
    """Standardise [N, D] points and embed them in 2-D: ``tsne`` (scikit-learn, PCA-initialised, as VA-VAE),
    ``pca`` or ``none`` (points already 2-D). t-SNE's perplexity is capped at (N - 1) / 3 for small N."""
    x = Standardizer.fit(points)(points.float())
    if projection == "none":
        if x.shape[1] != 2:
            raise UserError(f"projection 'none' needs 2-D points, got {x.shape[1]}-D")
        return x
    if projection == "pca":
        return PCA.fit(x, 2, seed)(x)
    if projection == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(perplexity, (x.shape[0] - 1) / 3)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        emb = tsne.fit_transform(x.double().numpy())
        return torch.from_numpy(emb).float()
    raise UserError(f"projection must be 'tsne', 'pca' or 'none', got {projection!r}")


def kde_density_at_points(points: Tensor) -> Tensor:
    """Gaussian KDE of 2-D points (Scott's rule, full covariance: ``scipy.stats.gaussian_kde``) at the points."""
    from scipy.stats import gaussian_kde

    p = points.double().numpy().T
    return torch.from_numpy(gaussian_kde(p)(p))


def kde_density_grid(points: Tensor, grid_size: int = 64, bandwidth: float | None = None) -> Tensor:
    """A Gaussian KDE of 2-D points evaluated on a ``grid_size``^2 grid spanning their bounding box.

    Bandwidth per axis: Scott's rule ``sigma_axis * n^(-1/6)`` unless ``bandwidth`` (in units of each
    axis' standard deviation) is given. Returns the density values [grid_size, grid_size].
    """
    p = points.double()
    n = p.shape[0]
    sigma = p.std(0, unbiased=True).clamp_min(1e-12)
    h = sigma * (bandwidth if bandwidth is not None else n ** (-1.0 / 6.0))
    lo, hi = p.min(0).values, p.max(0).values
    axes = [torch.linspace(float(lo[d]), float(hi[d]), grid_size, dtype=torch.float64) for d in range(2)]
    gx, gy = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    density = torch.zeros(grid.shape[0], dtype=torch.float64)
    norm = 1.0 / (n * 2 * math.pi * float(h[0] * h[1]))
    for i in range(0, n, 1024):
        d = (grid[:, None, :] - p[None, i:i + 1024, :]) / h
        density += torch.exp(-0.5 * (d * d).sum(-1)).sum(1)
    return (density * norm).reshape(grid_size, grid_size)


def kde_uniformity(
    points: Tensor,
    *,
    projection: str = "tsne",  # how [N, D] latents reach 2-D: tsne (VA-VAE) | pca | none
    density_at: str = "samples",  # KDE evaluated at the embedded samples (VA-VAE) | on a grid
    grid_size: int = 64,  # density_at="grid": grid_size^2 points over the bounding box
    bandwidth: float | None = None,  # density_at="grid": KDE bandwidth in std units (None: Scott's rule)
    max_points: int = 10_000,  # a seeded subset (VA-VAE samples 10,000 latents)
    seed: int = 0,
) -> dict[str, float]:
    """VA-VAE's uniformity statistics of latents [N, D]: Gini coefficient and normalised entropy of a KDE density."""
    if points.dim() != 2 or points.shape[0] < 4:
        raise UserError(f"kde_uniformity needs at least 4 points [N, D], got {tuple(points.shape)}")
    if density_at not in ("samples", "grid"):
        raise UserError(f"density_at must be 'samples' or 'grid', got {density_at!r}")
    if points.shape[0] > max_points:
        keep = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        points = points[keep]
    embedded = embed_2d(points, projection, seed)
    if density_at == "samples":
        density = kde_density_at_points(embedded)
    else:
        density = kde_density_grid(embedded, grid_size, bandwidth).flatten()
    prob = density / density.sum()
    nonzero = prob[prob > 0]
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(prob.numel())
    return {"gini": gini_coefficient(density), "normalized_entropy": entropy}


def one_token_per_image(tokens: Tensor, num_images: int, seed: int = 0) -> Tensor:
    """From image-major tokens [N * T, C], the token at one seeded random position per image: [N, C]."""
    if num_images < 1 or tokens.shape[0] % num_images:
        raise UserError(f"{tokens.shape[0]} tokens do not split into {num_images} images")
    per_image = tokens.reshape(num_images, -1, tokens.shape[-1])
    pick = torch.randint(per_image.shape[1], (num_images,), generator=torch.Generator().manual_seed(seed))
    return per_image[torch.arange(num_images), pick]


# ----------------------------------------------------------------------------------------------
# Discrimination (MAETok): GMM fits with K components, in torch
# ----------------------------------------------------------------------------------------------


@dataclass
class GaussianMixture:
    """A diagonal-covariance Gaussian mixture."""

    weights: Tensor  # [K]
    means: Tensor  # [K, D]
    variances: Tensor  # [K, D]

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x | mu_k, diag(var_k)) -> [N, K]."""
        x = x.to(self.means.dtype)
        inv = 1.0 / self.variances
        maha = (x * x) @ inv.T - 2 * x @ (self.means * inv).T + (self.means**2 * inv).sum(1)
        log_det = self.variances.log().sum(1)
        d = x.shape[1]
        return self.weights.log() - 0.5 * (maha + log_det + d * math.log(2 * math.pi))

    def log_likelihood(self, x: Tensor) -> Tensor:
        """log p(x) per point -> [N]."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)


def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full_like(dist, 1.0 / len(dist))
        idx = torch.multinomial(probs.float().cpu(), 1, generator=gen).item()
        centres.append(x[idx])
        dist = torch.minimum(dist, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def fit_gmm(
    x: Tensor,
    k: int,
    *,
    max_iter: int = 200,  # EM iterations
    tol: float = 1e-3,  # stop when the mean log-likelihood per token gains less than this (scikit-learn's default)
    reg: float = 1e-6,  # added to every variance (as scikit-learn's reg_covar)
    seed: int = 0,  # k-means++ initialisation
) -> GaussianMixture:
    """Maximum-likelihood diagonal GMM by EM, initialised with k-means++ centres and the global variance."""
    if k < 1 or k > len(x):
        raise UserError(f"a GMM with {k} components needs between 1 and {len(x)} components")
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    means = _kmeans_plus_plus(x.cpu(), k, gen).to(x.device)
    variances = x.var(0, unbiased=False).clamp_min(reg).expand(k, -1).clone() + reg
    gmm = GaussianMixture(torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device), means, variances)
    previous = -math.inf
    for _ in range(max_iter):
        log_prob = gmm.component_log_prob(x)
        log_norm = torch.logsumexp(log_prob, 1, keepdim=True)
        current = float(log_norm.mean())
        resp = (log_prob - log_norm).exp()  # E-step: responsibilities [N, K]
        nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
        means = resp.T @ x / nk[:, None]  # M-step
        variances = (resp.T @ (x * x) / nk[:, None] - means**2).clamp_min(0) + reg
        gmm = GaussianMixture(nk / nk.sum(), means, variances)
        if current - previous < tol:
            break
        previous = current
    return gmm


def gmm_discrimination(
    tokens: Tensor,
    *,
    k_grid: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),  # numbers of GMM components tried
    holdout: float = 0.2,  # part of the tokens kept out of the fit and scored
    max_points: int = 10000,  # a seeded subset of tokens, for speed
    tolerance: float = 0.05,  # "modes": the smallest K within this fraction of the NLL drop ...
    min_gain: float = 0.02,  # ... or within this many nats per dimension of the best NLL
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """MAETok's GMM analysis of latent tokens [M, C]: held-out NLL per dimension for each K, and the modes needed.

    Tokens are standardised per channel with the fitting set's statistics, so NLLs of different
    latents are comparable (an affine rescaling only shifts the NLL by a constant).
    """
    if tokens.dim() != 2 or tokens.shape[0] < 10:
        raise UserError(f"gmm_discrimination needs latent tokens [M >= 10, C], got {tuple(tokens.shape)}")
    gen = torch.Generator().manual_seed(seed)
    if tokens.shape[0] > max_points:
        tokens = tokens[torch.randperm(tokens.shape[0], generator=gen)[:max_points]]
    fit_rows, held_rows = carve_validation(tokens.shape[0], holdout, seed)
    standardizer = Standardizer.fit(tokens[fit_rows])
    device = torch.device(device) if device is not None else tokens.device
    x_fit = standardizer(tokens[fit_rows].float()).double().to(device)
    x_held = standardizer(tokens[held_rows].float()).double().to(device)
    d = tokens.shape[1]
    ks = sorted({int(k) for k in k_grid if 1 <= int(k) <= len(x_fit)})
    if not ks:
        raise UserError(f"k_grid {list(k_grid)} has no value between 1 and {len(x_fit)}")
    nll = []
    for k in ks:
        gmm = fit_gmm(x_fit, k, seed=seed)
        nll.append(float(-gmm.log_likelihood(x_held).mean()) / d)
    best = min(nll)
    drop = nll[0] - best
    modes = next(k for k, v in zip(ks, nll) if v <= best + max(tolerance * drop, min_gain))
    return {"k": ks, "nll_per_dim": nll, "modes": modes, "nll_drop": drop}


# ----------------------------------------------------------------------------------------------
# All three for one probe row
# ----------------------------------------------------------------------------------------------


def latent_metric_summary(
    train_x: Tensor,
    train_labels: Tensor,
    test_x: Tensor,
    test_labels: Tensor,
    test_tokens: Tensor,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    k_grid: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),  # GMM components tried
    l2_grid: Sequence[float] = (1e-2, 1e-3, 1e-4, 1e-5, 0.0),  # class probe L2 grid
    max_iter: int = 300,  # class probe L-BFGS iterations per L2 value
    standardize: bool = True,  # class probe: z-score the features (False for standardised PCA projections)
) -> dict[str, float]:
    """For one encoder: uniformity (Gini, entropy) of one random latent token per test image (VA-VAE),
    GMM NLL per K and the modes of the latent tokens, and class-probe accuracy when the labels take at
    least two values."""
    out: dict[str, float] = {}
    uniformity = kde_uniformity(one_token_per_image(test_tokens, test_x.shape[0], seed), seed=seed)
    out["uniformity_gini"] = uniformity["gini"]
    out["uniformity_entropy"] = uniformity["normalized_entropy"]
    gmm = gmm_discrimination(test_tokens, k_grid=k_grid, seed=seed, device=device)
    for k, v in zip(gmm["k"], gmm["nll_per_dim"]):
        out[f"gmm_nll_k{k}"] = v
    out["gmm_modes"] = float(gmm["modes"])
    if len(torch.unique(torch.cat([train_labels, test_labels]))) >= 2:
        out["class_probe_accuracy"] = class_probe_accuracy(
            train_x, train_labels, test_x, test_labels, l2_grid=l2_grid, max_iter=max_iter, seed=seed, device=device,
            standardize=standardize,
        )["accuracy"]
    return out
