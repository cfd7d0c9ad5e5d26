"""The other latent metrics on data where the answer is known: Gini, KDE uniformity, GMM discrimination,
class-probe accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sendvae.errors import UserError
from sendvae.eval.latent_metrics import (
    class_probe_accuracy,
    fit_gmm,
    gini_coefficient,
    gmm_discrimination,
    kde_density_grid,
    kde_uniformity,
    latent_metric_summary,
    one_token_per_image,
    pool_latents,
)
from sendvae.eval.probe_features import Features
from sendvae.eval.probe_solver import Standardizer


def test_gini_known_values_and_pairwise_definition():
    assert gini_coefficient(torch.ones(5)) == pytest.approx(0.0)
    assert gini_coefficient(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    v = torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairwise = float((v[:, None] - v[None, :]).abs().mean() / (2 * v.mean()))
    assert gini_coefficient(v) == pytest.approx(pairwise, rel=1e-9)
    uniform = torch.rand(200_000, generator=torch.Generator().manual_seed(1))
    assert gini_coefficient(uniform) == pytest.approx(1 / 3, abs=0.005)  # Gini of U(0, 1) is 1/3
    with pytest.raises(ValueError):
        gini_coefficient(torch.tensor([1.0, -1.0]))


def test_kde_grid_matches_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    gen = torch.Generator().manual_seed(2)
    half = torch.randn(200, 2, generator=gen) * torch.tensor([1.0, 3.0])
    points = torch.cat([half, half * torch.tensor([1.0, -1.0])]).double()  # exactly diagonal covariance
    density = kde_density_grid(points, grid_size=9)
    lo, hi = points.min(0).values.tolist(), points.max(0).values.tolist()
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 9), np.linspace(lo[1], hi[1], 9), indexing="ij")
    expected = gaussian_kde(points.numpy().T, bw_method="scott")(np.stack([gx.ravel(), gy.ravel()]))
    np.testing.assert_allclose(density.flatten().numpy(), expected, rtol=1e-8)


def test_grid_density_finds_uniform_samples_more_uniform_than_tight_clusters():
    gen = torch.Generator().manual_seed(3)
    uniform = torch.rand(2000, 2, generator=gen)
    centres = torch.tensor([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0], [6.0, 5.0]])
    clusters = centres[torch.randint(4, (2000,), generator=gen)] + 0.1 * torch.randn(2000, 2, generator=gen)
    grid = dict(density_at="grid", grid_size=32)
    u = kde_uniformity(uniform, projection="none", **grid)
    c = kde_uniformity(clusters, projection="none", **grid)
    assert u["gini"] < 0.25 < 0.6 < c["gini"]
    assert u["normalized_entropy"] > c["normalized_entropy"]
    # the same two sets placed on a random 2-D plane in 16-D: PCA finds the plane, the verdict holds
    plane = torch.linalg.qr(torch.randn(16, 2, generator=gen))[0].T  # [2, 16], orthonormal rows
    u16 = kde_uniformity(uniform @ plane, projection="pca", **grid)
    c16 = kde_uniformity(clusters @ plane, projection="pca", **grid)
    assert u16["gini"] + 0.2 < c16["gini"]  # (the bounding box of a tilted square holds empty corners)


def test_density_at_samples_has_the_known_gini_of_a_gaussian_and_a_uniform_square():
    """At the samples of a 2-D Gaussian the density exp(-r^2 / 2) is uniformly distributed (r^2 ~ chi2_2),
    so its Gini is 1/3; Scott's bandwidth h = n^(-1/6) widens the KDE to variance 1 + h^2, turning the
    values into U^a with a = 1 / (1 + h^2), whose Gini is a / (a + 2). A uniform square is nearly flat."""
    gen = torch.Generator().manual_seed(5)
    n = 3000
    a = 1 / (1 + n ** (-1 / 3))
    gaussian = kde_uniformity(torch.randn(n, 2, generator=gen), projection="none")
    assert gaussian["gini"] == pytest.approx(a / (a + 2), abs=0.01)
    square = kde_uniformity(torch.rand(n, 2, generator=gen), projection="none")
    assert square["gini"] < 0.15 < gaussian["gini"]
    assert square["normalized_entropy"] > gaussian["normalized_entropy"]


def test_default_uniformity_is_vavae_tsne_then_kde_at_the_points():
    """The default protocol against an independent computation: scikit-learn t-SNE of the z-scored
    points (the package's z-scores), scipy's gaussian_kde evaluated at the embedding, Gini and normalised entropy in numpy."""
    from scipy.stats import gaussian_kde
    from sklearn.manifold import TSNE

    gen = torch.Generator().manual_seed(6)
    points = torch.cat([torch.randn(150, 8, generator=gen), torch.randn(50, 8, generator=gen) * 0.2 + 3.0])
    ours = kde_uniformity(points, seed=3)
    # t-SNE is chaotic in its input (a 1e-7 change moves the embedding), so both start from the same z-scores
    x = Standardizer.fit(points)(points).double().numpy()
    emb = TSNE(n_components=2, perplexity=30.0, init="pca", random_state=3).fit_transform(x)
    density = np.sort(gaussian_kde(emb.T)(emb.T))
    i = np.arange(1, len(density) + 1)
    gini = np.sum((2 * i - len(density) - 1) * density) / (len(density) * density.sum())
    p = density / density.sum()
    entropy = -np.sum(p * np.log(p)) / np.log(len(p))
    assert ours["gini"] == pytest.approx(gini, rel=1e-3, abs=1e-4)
    assert ours["normalized_entropy"] == pytest.approx(entropy, rel=1e-4)


def test_one_token_per_image_picks_a_seeded_position_of_each_image():
    tokens = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(5 * 4, 3)  # 5 images x 4 positions x 3 channels
    picked = one_token_per_image(tokens, 5, seed=1)
    assert picked.shape == (5, 3)
    for image, row in enumerate(picked):
        position = int(row[0]) // 3 - 4 * image
        assert 0 <= position < 4 and torch.equal(row, tokens[4 * image + position])
    assert torch.equal(picked, one_token_per_image(tokens, 5, seed=1))
    with pytest.raises(UserError, match="do not split into 3 images"):
        one_token_per_image(tokens, 3)


def test_gmm_em_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(3, 5, generator=gen) * 6
    spread = torch.rand(5, generator=gen)
    x = centres[torch.randint(3, (900,), generator=gen)] + torch.randn(900, 5, generator=gen) * spread
    ours = fit_gmm(x, 3, tol=1e-9, max_iter=500)
    ref = GaussianMixture(3, covariance_type="diag", tol=1e-9, max_iter=500, reg_covar=1e-6, random_state=0)
    ref.fit(x.double().numpy())
    assert float(ours.log_likelihood(x).mean()) == pytest.approx(ref.score(x.double().numpy()), abs=1e-4)
    # the means match up to the component order
    ours_sorted = ours.means[ours.means[:, 0].argsort()].numpy()
    ref_sorted = ref.means_[ref.means_[:, 0].argsort()]
    np.testing.assert_allclose(ours_sorted, ref_sorted, atol=1e-3)


def _mixture(separation: float, seed: int, n: int = 1500, d: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=gen)
    centres = centres / centres.norm(dim=1, keepdim=True) * separation
    return centres[torch.randint(4, (n,), generator=gen)] + torch.randn(n, d, generator=gen)


def test_gmm_discrimination_counts_well_separated_modes():
    separated = gmm_discrimination(_mixture(20.0, 5), k_grid=(1, 2, 4, 8))
    overlapping = gmm_discrimination(_mixture(0.3, 5), k_grid=(1, 2, 4, 8))
    assert separated["modes"] == 4
    assert overlapping["modes"] == 1
    nll_sep = dict(zip(separated["k"], separated["nll_per_dim"]))
    nll_ovl = dict(zip(overlapping["k"], overlapping["nll_per_dim"]))
    assert nll_sep[4] < nll_ovl[4] - 0.3  # a 4-mode GMM explains the separated latent far better
    assert nll_sep[1] - nll_sep[4] > 0.5 > nll_ovl[1] - nll_ovl[4]
    with pytest.raises(UserError, match="tokens"):
        gmm_discrimination(torch.randn(5, 3))


def test_class_probe_accuracy_informative_vs_random():
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(5, (1200,), generator=gen)
    latents = torch.randn(1200, 4, 3, 3, generator=gen)
    latents[:, 0, 0, 0] += 3 * labels.float()  # class readable from one latent coordinate
    flat = pool_latents(latents, "flatten")
    good = class_probe_accuracy(flat[:900], labels[:900], flat[900:], labels[900:], l2_grid=(1e-3,))
    # Bayes accuracy: classes 3 apart on one coordinate with unit noise, 8 boundary sides among 5 classes
    bayes = 1 - (8 / 5) * 0.5 * math.erfc(1.5 / math.sqrt(2))
    assert abs(good["accuracy"] - bayes) < 0.04 and good["chance"] == pytest.approx(0.2)
    noise = torch.randn(1200, 36, generator=gen)
    bad = class_probe_accuracy(noise[:900], labels[:900], noise[900:], labels[900:], l2_grid=(1e-3,))
    assert abs(bad["accuracy"] - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 300)
    assert pool_latents(latents, "mean").shape == (1200, 4)
    with pytest.raises(UserError, match="pool"):
        pool_latents(latents, "max")


def test_summary_reports_every_metric():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 4 * 2 * 2, generator=gen)
    labels = torch.randint(3, (200,), generator=gen)
    test = Features(x[150:], None, labels[150:], torch.arange(50), (4, 2, 2))
    out = latent_metric_summary(x[:150], labels[:150], test.x, test.labels, test.tokens(), k_grid=(1, 2),
                                l2_grid=(1e-3,))
    assert set(out) == {"uniformity_gini", "uniformity_entropy", "gmm_nll_k1", "gmm_nll_k2", "gmm_modes",
                        "class_probe_accuracy"}
    assert all(math.isfinite(v) for v in out.values())
