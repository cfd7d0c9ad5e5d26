"""Generation metrics against independent computations, the ADM file formats, and batch-size invariance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.fake_features import FakeInception
from scipy import linalg
from scipy.spatial.distance import cdist

from sendvae.errors import UserError
from sendvae.eval.feature_metrics import (
    FeatureStats,
    RunningStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    manifold_radii,
    precision_recall,
)
from sendvae.eval.generation import ImageSource, evaluate_samples, make_reference_batch, read_reference_stats
from sendvae.npz import NpzArray, NpzWriter, npz_keys
from sendvae.eval.inception import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    InceptionFeatures,
    find_inception_weights,
)

# ---------------------------------------------------------------------------------------------------
# Frechet distance and statistics
# ---------------------------------------------------------------------------------------------------


def _random_stats(rng: np.random.Generator, d: int, n: int) -> FeatureStats:
    mixing = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)
    return FeatureStats(x.mean(0), np.cov(x, rowvar=False))


def test_frechet_distance_matches_scipy_sqrtm_and_closed_forms():
    rng = np.random.default_rng(0)
    a, b = _random_stats(rng, 24, 500), _random_stats(rng, 24, 300)
    # ADM / TTUR formula with scipy's matrix square root of the product, float64
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(a.sigma)
    # diagonal Gaussians: |m1 - m2|^2 + sum (s1 - s2)^2
    s1, s2 = rng.uniform(0.5, 2, 10), rng.uniform(0.5, 2, 10)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    diagonal = frechet_distance(FeatureStats(m1, np.diag(s1**2)), FeatureStats(m2, np.diag(s2**2)))
    assert diagonal == pytest.approx(np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2), rel=1e-12)


def test_frechet_distance_with_singular_covariances():
    # fewer samples than dimensions (rank-deficient covariances, as in a small sFID run)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) + 0.5
    a, b = FeatureStats.of(x), FeatureStats.of(y)
    root_a = linalg.sqrtm(a.sigma).real  # independent route: tr sqrt(A^1/2 B A^1/2) by scipy's sqrtm
    expected = (
        np.sum((a.mu - b.mu) ** 2)
        + np.trace(a.sigma)
        + np.trace(b.sigma)
        - 2 * np.trace(linalg.sqrtm(root_a @ b.sigma @ root_a).real)
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_running_statistics_equal_numpy_for_any_split():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(37, 5)) * 3 + 100  # a large mean, where naive sums lose digits
    for sizes in ([37], [5, 10, 22], [1] * 37):
        stats = RunningStats()
        start = 0
        for size in sizes:
            stats.update(x[start : start + size])
            start += size
        result = stats.result()
        np.testing.assert_allclose(result.mu, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(result.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Inception Score, precision / recall, KID
# ---------------------------------------------------------------------------------------------------


def test_inception_score_known_values():
    assert inception_score(np.zeros((40, 1008))) == pytest.approx(1.0)
    # confident predictions of n distinct classes: IS = n
    n = 17
    one_hot = np.full((n, 1008), -50.0)
    one_hot[np.arange(n), np.arange(n)] = 50.0
    assert inception_score(one_hot) == pytest.approx(n, rel=1e-9)
    # splits: 10 samples of 2 classes then 10 of 5 classes, split size 10 -> mean(2, 5)
    two = np.full((10, 8), -50.0)
    two[np.arange(10), np.arange(10) % 2] = 50.0
    five = np.full((10, 8), -50.0)
    five[np.arange(10), np.arange(10) % 5] = 50.0
    assert inception_score(np.concatenate([two, five]), split_size=10) == pytest.approx(3.5, rel=1e-9)


def test_inception_score_matches_the_direct_formula():
    logits = np.random.default_rng(3).normal(size=(30, 12)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:12], p[12:24], p[24:]):
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)
        scores.append(np.exp(kl.mean()))
    assert inception_score(logits, split_size=12) == pytest.approx(np.mean(scores), rel=1e-10)


def _brute_force_precision_recall(ref: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    r_ref, r_gen = radii(ref), radii(gen)
    d = cdist(gen, ref)
    precision = np.mean([(d[i] <= r_ref).any() for i in range(len(gen))])
    recall = np.mean([(d[:, j] <= r_gen).any() for j in range(len(ref))])
    return float(precision), float(recall)


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(45, 6))
    gen = np.concatenate([rng.normal(size=(25, 6)) * 0.5, rng.normal(size=(12, 6)) + 4.0])  # 12 far away
    for k in (1, 3):
        expected = _brute_force_precision_recall(ref, gen, k)
        assert precision_recall(ref, gen, k=k, block=7) == pytest.approx(expected, abs=1e-12)
        assert precision_recall(ref, gen, k=k, block=1000) == pytest.approx(expected, abs=1e-12)
    precision, recall = precision_recall(ref, gen)
    assert precision < 25 / 37 + 1e-9 and recall < 1.0  # far samples are outside; a narrow set misses the tails
    # radii are the (squared) distance to the k-th nearest *other* point
    radii = manifold_radii(torch.tensor(ref), k=3, block=8).numpy()
    d = cdist(ref, ref) ** 2
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 2], rtol=1e-9)
    with pytest.raises(UserError, match="more than 3 points"):
        precision_recall(ref[:3], gen)


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 0.7

    def k(x: np.ndarray, y: np.ndarray) -> float:
        return (x @ y / 4 + 1) ** 3

    n = 20
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / (n * n)
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=20)  # full subsets: every draw is equal
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    same, _ = kernel_inception_distance(a, rng.normal(size=(20, 4)), subsets=20, subset_size=15)
    assert abs(same) < mean / 5


# ---------------------------------------------------------------------------------------------------
# npz streaming and the reference format
# ---------------------------------------------------------------------------------------------------


def test_npz_writer_streams_and_reads_back(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    with NpzWriter(path) as writer:
        with writer.stream("arr_0", images.shape, np.uint8) as stream:
            stream.write(images[:3])
            stream.write(images[3:])
        writer.array("mu", np.arange(3.0))
    with np.load(path) as data:  # numpy reads it as an ordinary npz
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["mu"], np.arange(3.0))
    blocks = list(NpzArray(path).batches(2))
    assert [len(b) for b in blocks] == [2, 2, 2, 1] and np.array_equal(np.concatenate(blocks), images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)  # compressed files stream too
    assert np.array_equal(np.concatenate(list(NpzArray(tmp_path / "c.npz").batches(3))), images)
    with pytest.raises(ValueError, match="rows"), NpzWriter(tmp_path / "bad.npz") as writer:
        with writer.stream("arr_0", images.shape, np.uint8) as stream:
            stream.write(images[:2])
    assert not (tmp_path / "bad.npz").exists() and not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------
# Inception plumbing with a random-weight network (no real weights needed)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory) -> Path:
    """torchvision's InceptionV3 layout (the same keys as the TF port), He-initialised, saved as a plain state dict."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.normal_(0.0, math.sqrt(2.0 / value[0].numel()))
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def inception(random_inception_file) -> InceptionFeatures:
    return InceptionFeatures(random_inception_file)


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=INCEPTION_FILE.replace(".", r"\.")):
        find_inception_weights()
    with pytest.raises(UserError, match="nowhere.pth"):
        find_inception_weights(tmp_path / "nowhere.pth")
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "from-env.pth"))
    with pytest.raises(UserError, match="from-env.pth"):
        find_inception_weights()


def test_inception_weights_are_read_without_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "object": Path("x")}, path)
    with pytest.raises(UserError, match="weights_only"):
        InceptionFeatures(path)


def test_inception_features_layout_and_batch_size_invariance(inception):
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    seen = {}
    handle = inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    features = inception(images)
    handle.remove()
    assert features["pool"].shape == (2, 2048) and features["logits"].shape == (2, 1008)
    assert features["spatial"].shape == (2, 17 * 17 * 7)
    spatial_map = seen["map"]  # [2, 192, 17, 17]; TF flattens [17, 17, 7] row-major: (h, w, c)
    h, w, c = 5, 11, 3
    assert features["spatial"][1, (h * 17 + w) * 7 + c] == pytest.approx(spatial_map[1, c, h, w].item())
    # logits are the unbiased ones (no fc bias): pool @ W^T
    expected = features["pool"].double() @ inception.net.fc.weight.double().T
    torch.testing.assert_close(features["logits"].double(), expected, rtol=1e-4, atol=1e-4)
    one = inception(images[1:])  # the same image alone
    for key in ("pool", "logits", "spatial"):
        torch.testing.assert_close(one[key], features[key][1:], rtol=1e-4, atol=1e-5)


def _write_images(path: Path, n: int, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, size, size, 3))
    images = np.clip(base + rng.normal(scale=60, size=(n, size, size, 3)), 0, 255).astype(np.uint8)
    np.savez(path, arr_0=images, arr_1=np.arange(n) % 3)
    return images


def test_reference_batch_from_the_real_network(tmp_path, inception):
    source = tmp_path / "real.npz"
    real = _write_images(source, 3, seed=0)
    ref = tmp_path / "ref.npz"
    make_reference_batch(ImageSource(str(source)), ref, [inception], keep_images=2, seed=1, batch_size=2)
    with np.load(ref) as data:
        assert (
            data["arr_0"].shape == (2, 16, 16, 3)
            and data["mu"].shape == (2048,)
            and data["sigma"].shape == (2048, 2048)
        )
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
        features = inception(torch.from_numpy(real).permute(0, 3, 1, 2))
        np.testing.assert_allclose(data["mu"], features["pool"].double().mean(0).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            data["sigma_s"], np.cov(features["spatial"].double().numpy(), rowvar=False), rtol=1e-3, atol=1e-6
        )


def test_reference_format_and_evaluation_are_batch_size_invariant(tmp_path):
    fake = FakeInception()
    source = tmp_path / "real.npz"
    real = _write_images(source, 30, seed=0)
    ref = tmp_path / "ref.npz"
    summary = make_reference_batch(ImageSource(str(source)), ref, [fake], keep_images=20, seed=1, batch_size=7)
    assert summary["images_in_statistics"] == 30 and summary["images_kept"] == 20
    assert {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"} == set(npz_keys(ref))
    features = fake(torch.from_numpy(real).permute(0, 3, 1, 2))
    with np.load(ref) as data:
        kept = data["arr_0"]
        rows = [int(np.flatnonzero((real == image).all(axis=(1, 2, 3)))[0]) for image in kept]
        assert rows == sorted(rows) and len(set(rows)) == 20 and np.array_equal(data["arr_1"], np.array(rows) % 3)
        np.testing.assert_allclose(data["mu"], features["pool"].mean(0).numpy(), rtol=1e-12)  # over all 30
        np.testing.assert_allclose(data["sigma_s"], np.cov(features["spatial"].numpy(), rowvar=False), rtol=1e-10)
    stored = read_reference_stats(ref)
    assert set(stored) == {"inception.pool", "inception.spatial"}

    samples = tmp_path / "samples.npz"
    sample_images = _write_images(samples, 25, seed=2)
    results = [
        evaluate_samples(ImageSource(str(samples)), ref, fake, batch_size=b, kid_subsets=5, kid_subset_size=10)
        for b in (4, 25)
    ]
    a, b = results[0].to_json(), results[1].to_json()
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "kid"):
        assert a[key] == pytest.approx(b[key], rel=1e-7, abs=1e-7), key  # float64 round-off only
    assert a["num_samples"] == 25 and a["num_reference_images"] == 20
    # each metric is the one of the collected features: gFID/sFID against the stored statistics of all 30
    gen = fake(torch.from_numpy(sample_images).permute(0, 3, 1, 2))
    ref_pool = fake(torch.from_numpy(kept).permute(0, 3, 1, 2))["pool"].numpy()
    assert a["fid"] == pytest.approx(frechet_distance(FeatureStats.of(gen["pool"].numpy()), stored["inception.pool"]))
    assert a["sfid"] == pytest.approx(
        frechet_distance(FeatureStats.of(gen["spatial"].numpy()), stored["inception.spatial"])
    )
    assert a["inception_score"] == pytest.approx(inception_score(gen["logits"].numpy()))
    assert (a["precision"], a["recall"]) == pytest.approx(precision_recall(ref_pool, gen["pool"].numpy()))
    assert "gFID" in results[0].table() and "Recall" in results[0].table()


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def test_evaluate_command_makes_a_reference_and_evaluates(tmp_path, monkeypatch, capsys):
    import sendvae.eval.inception as inception_module
    from sendvae.cli import main

    monkeypatch.setattr(
        inception_module, "InceptionFeatures", lambda weights=None, device="cpu", dtype=None: FakeInception()
    )
    _write_images(tmp_path / "real.npz", 24, seed=0)
    _write_images(tmp_path / "samples.npz", 16, seed=5)
    ref, out = tmp_path / "ref.npz", tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--make-ref",
                str(tmp_path / "real.npz"),
                str(ref),
                "--ref-images",
                "12",
                "--features",
                "effnet-lite0",
                "--device",
                "cpu",
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    assert {"mu", "sigma", "mu_s", "sigma_s", "mu_effnet-lite0", "sigma_effnet-lite0"} <= set(npz_keys(ref))
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "samples.npz"),
                "--ref",
                str(ref),
                "--features",
                "effnet-lite0",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 16 and metrics["num_reference_images"] == 12
    assert metrics["fid"] > 0 and metrics["frechet"]["effnet-lite0"] > 0 and 0 <= metrics["precision"] <= 1
    printed = capsys.readouterr().out
    assert "gFID" in printed and "FD_effnet-lite0" in printed and "not recorded" in printed
    protocol = metrics["protocol"]
    assert protocol["reference"]["path"] == str(ref) and len(protocol["reference"]["sha256"]) == 64
    assert protocol["reference"]["statistics"]["effnet-lite0.pool"] == "stored in the reference file"
    lite0 = protocol["feature_spaces"]["effnet-lite0"]
    assert lite0["weights"] is None and "mean" in lite0["features"] and "bicubic" in lite0["input"]
    # the default metrics file sits next to the samples; without --dinov2 the FD space is the offline teacher's
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(ref), "--device", "cpu", "--no-kid"]) == 0
    default = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert default["kid"] is None and default["frechet"] == pytest.approx(metrics["frechet"])
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(ref), "--dinov2", str(tmp_path / "no")]) == 2
    assert "--dinov2" in capsys.readouterr().err


def test_evaluate_command_names_the_missing_inception_file(tmp_path, monkeypatch, capsys):
    from sendvae.cli import main

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _write_images(tmp_path / "samples.npz", 4, seed=0)
    _write_images(tmp_path / "ref.npz", 4, seed=1)
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 2
    assert INCEPTION_FILE in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "nothing.npz" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# FD in other feature spaces, and the protocol beside the numbers
# ---------------------------------------------------------------------------------------------------


class FakeTeacher:
    """A feature space of its own: a fixed nonlinear projection of the 4x4-pooled image (6-d)."""

    name = "fake"
    device = torch.device("cpu")
    protocol = {"implementation": "test projection"}

    def __init__(self) -> None:
        self.weight = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)
        return {"pool": torch.tanh(x @ self.weight)}


def _scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets, with scipy's sqrtm (the TTUR / ADM formula)."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def test_fd_in_a_teacher_space_matches_scipy_and_states_its_protocol(tmp_path):
    import hashlib

    teacher = FakeTeacher()
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    real = _write_images(ref, 40, seed=0)
    generated = _write_images(samples, 30, seed=4)
    metrics = evaluate_samples(ImageSource(str(samples)), ref, FakeInception(), [teacher], batch_size=7, kid=False)
    features = [teacher(torch.from_numpy(a).permute(0, 3, 1, 2))["pool"].numpy() for a in (generated, real)]
    assert metrics.frechet["fake"] == pytest.approx(_scipy_frechet(*features), rel=1e-8)
    assert "FD_fake" in metrics.table()
    protocol = json.loads(json.dumps(metrics.to_json()))["protocol"]  # JSON-ready
    assert protocol["num_samples"] == 30 and protocol["reference"]["images"] == 40
    assert protocol["reference"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    # a plain reference npz has no stored statistics: every one is computed from its images
    assert protocol["reference"]["statistics"]["fake.pool"] == "computed from its arr_0 (40 images)"
    assert protocol["feature_spaces"] == {"inception": FakeInception.protocol, "fake": teacher.protocol}
    assert "uint8" in protocol["uint8"] and "round(clamp((x + 1) * 127.5, 0, 255))" in protocol["uint8"]
    # samples not written by `sendvae sample` say so instead of guessing
    assert protocol["sampling"] is None and protocol["label_sampling"] == "not recorded in the samples file"


def test_dinov2_features_follow_edm2_protocol():
    from sendvae.eval.inception import DinoV2Features

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # DINOv2-L/14's layout, shrunk; random weights
    dino = DinoV2Features("random", model_kwargs=tiny)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8))
    # EDM2: /255, bicubic resize to 224, ImageNet mean/std, the CLS token after the final norm
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        tokens = dino.teacher.model.forward_features((x - mean) / std)  # timm: [CLS, patches], final norm applied
    assert tokens.shape == (3, 1 + 16 * 16, 32)
    torch.testing.assert_close(dino(images)["pool"], tokens[:, 0], rtol=1e-4, atol=1e-4)
    assert dino.protocol["weights"] == "random" and "CLS" in dino.protocol["implementation"]
    assert dino.name == "dinov2" and dino.teacher.input_size == 224
