"""The attribute probe: agreement with scikit-learn, the F1/top-k definitions, factor recovery vs chance,
the feature cache and seeded posterior samples, and the `sendvae probe` command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sendvae.errors import UserError
from sendvae.eval.probe import (
    chance_macro_f1,
    evaluate_probe,
    f1_scores,
    factor_accuracy,
    top_k_recall,
    top_k_recall_per_image,
)
from sendvae.eval.probe_features import (
    Features,
    PixelEncoder,
    TeacherEncoder,
    VAEEncoder,
    extract_encoder_features,
    extract_features,
)
from sendvae.eval.probe_solver import Standardizer, best_f1_thresholds, fit_linear_probe


def _synthetic_multilabel(n: int, d: int, a: int, seed: int, missing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, d)
    x = torch.randn(n, d, generator=gen) * scale + 1.0
    w = torch.randn(d, a, generator=gen)
    y = (((x - 1.0) / scale) @ w / math.sqrt(d) + 0.6 * torch.randn(n, a, generator=gen) > 0.3).float()
    y[torch.rand(n, a, generator=gen) < missing] = math.nan
    return x, y


def test_probe_matches_sklearn_logistic_regression():
    """Same standardised features, same objective (C = 1 / (l2 * n_a)): predictions agree >= 98%, F1 within 0.01."""
    from sklearn.linear_model import LogisticRegression

    x, y = _synthetic_multilabel(1400, 40, 5, seed=1)
    xt, yt, xv, yv = x[:1000], y[:1000], x[1000:], y[1000:]
    l2 = 1e-2
    probe = fit_linear_probe(xt, yt, xv, yv, l2_grid=(l2,), early_stopping=False, max_iter=500, progress=False)
    xs_train = Standardizer.fit(xt)(xt).double().numpy()
    xs_val = probe.standardizer(xv).double().numpy()
    ours = probe.logits(xv)
    theirs = torch.empty_like(ours)
    for j in range(y.shape[1]):
        known = ~torch.isnan(yt[:, j])
        clf = LogisticRegression(C=1.0 / (l2 * int(known.sum())), tol=1e-10, max_iter=10_000)
        clf.fit(xs_train[known.numpy()], yt[known, j].numpy())
        theirs[:, j] = torch.from_numpy(clf.decision_function(xs_val)).float()
    agree = ((ours > 0) == (theirs > 0)).float().mean()
    assert agree >= 0.98
    _, f1_ours = f1_scores((ours > 0).float(), yv)
    _, f1_theirs = f1_scores((theirs > 0).float(), yv)
    assert abs(f1_ours - f1_theirs) <= 0.01
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.02)


def test_l2_is_selected_by_validation_loss_and_recorded():
    x, y = _synthetic_multilabel(600, 200, 3, seed=2, missing=0.0)  # n / d small: the grid matters
    probe = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e-1, 1e-3, 0.0), progress=False)
    assert set(probe.val_losses) == {1e-1, 1e-3, 0.0}
    for a, chosen in enumerate(probe.l2):  # each attribute keeps the L2 with its lowest validation loss
        assert probe.val_losses[chosen][a] == min(v[a] for v in probe.val_losses.values())
    # and the probe uses exactly that attribute's weights: its validation loss is the chosen one
    val_logits = probe.logits(x[300:])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(val_logits, y[300:], reduction="none").mean(0)
    chosen_losses = torch.tensor([float(probe.val_losses[c][a]) for a, c in enumerate(probe.l2)])
    torch.testing.assert_close(loss, chosen_losses.float(), atol=1e-5, rtol=1e-5)


def test_validation_is_carved_from_train_when_missing():
    x, y = _synthetic_multilabel(500, 10, 2, seed=3)
    probe = fit_linear_probe(x, y, l2_grid=(1e-3,), val_fraction=0.2, progress=False)
    assert evaluate_probe(probe, x, y)["micro_f1"] > 0.6
    with pytest.raises(UserError, match="val_fraction"):
        fit_linear_probe(x, y, l2_grid=(1e-3,), val_fraction=1.5, progress=False)


def test_thresholds_maximise_f1_against_brute_force():
    gen = torch.Generator().manual_seed(4)
    y = (torch.rand(300, 4, generator=gen) < torch.tensor([0.1, 0.3, 0.5, 0.8])).float()
    logits = y * 1.0 + torch.randn(300, 4, generator=gen)
    logits[:50, 2] = 0.25  # ties must not be split
    y[::7, 1] = math.nan
    thresholds = best_f1_thresholds(logits, y)
    for a in range(4):
        known = ~torch.isnan(y[:, a])
        s, t = logits[known, a], y[known, a]
        brute = max(
            float(2 * ((s > c) & (t == 1)).sum() / ((s > c).sum() + (t == 1).sum()))
            for c in torch.cat([s, s.min()[None] - 1])
        )
        chosen = (s > thresholds[a]).float()
        f1 = float(2 * (chosen * t).sum() / (chosen.sum() + t.sum()))
        assert f1 == pytest.approx(brute, abs=1e-6)


def test_top_k_recall_counts_per_attribute_as_deepfashion_does():
    """mmfashion's protocol: recall per attribute (its positives ranked in the top k), then the mean over
    the best attributes; the per-image average is another number on the same scores."""
    nan = math.nan
    y = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, nan, 0], [0, 0, 1, 0]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.8, 0.3, 0.2, 0.0], [0.2, 0.7, 0.1, 0.0], [0.1, 0.2, 0.9, 0.0]])
    # top-1 picks attribute 0, 0, 1, 2. Attribute 0: positive in images 0-2, ranked first in 0 and 1 -> 2/3;
    # attribute 1: positive in image 0 only, which ranks attribute 0 first -> 0; attribute 2: positive in
    # image 3 (image 2's label is unknown) -> 1; attribute 3 has no positive and does not count.
    assert top_k_recall(scores, y, 1) == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert top_k_recall(scores, y, 1, best=2) == pytest.approx((1 + 2 / 3) / 2)
    assert top_k_recall(scores, y, 1, best=0) == top_k_recall(scores, y, 1, best=50)
    # per image: 1/2, 1, 0, 1
    assert top_k_recall_per_image(scores, y, 1) == pytest.approx(2.5 / 4)
    # top-2 adds attribute 1 for images 0, 1 and 3 and attribute 0 for image 2: every positive is found
    assert top_k_recall(scores, y, 2) == pytest.approx(1.0)
    assert math.isnan(top_k_recall(scores, torch.zeros_like(y), 1))


def test_teacher_feature_cache_key_names_the_resize():
    """Teacher features made with the other resize (plain vs antialiased bicubic) are never reused."""
    from sendvae.models.teachers import build_teacher

    plain, smooth = (TeacherEncoder(build_teacher("effnet-lite0", grid=2, antialias=a), "effnet-lite0")
                     for a in (False, True))
    assert "bicubic:" in plain.key and "bicubic-antialias:" in smooth.key


def test_f1_top_k_and_factor_accuracy_by_hand():
    nan = math.nan
    y = torch.tensor([[1, 0, 1, 0], [0, 1, nan, 0], [1, 1, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    per_attr, micro = f1_scores(pred, y)
    # attribute 0: tp 2; 1: tp 1 fp 1 fn 1; 2: fn 1 (the NaN label ignored); 3: nothing -> undefined
    assert per_attr[0] == pytest.approx(1.0)
    assert per_attr[1] == pytest.approx(0.5)
    assert per_attr[2] == pytest.approx(0.0)
    assert math.isnan(per_attr[3])
    assert micro == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.9, 0.3], [0.2, 0.9, 0.8, 0.1]])
    # per image, top-1: image 0 hits 1/2, image 1 hits 0/1 (its NaN label is not a positive), image 2 hits 1/2
    assert top_k_recall_per_image(scores, y, 1) == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert top_k_recall_per_image(scores, y, 2) == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    groups = {"left": [0, 1], "right": [2, 3]}
    onehot = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, nan, nan]], dtype=torch.float32)
    acc = factor_accuracy(scores, onehot, groups)
    assert acc["left"] == pytest.approx(2 / 3)
    assert acc["right"] == pytest.approx(1 / 2)  # image 2 has an unknown label in this group


def _factor_data(n: int, sizes: list[int], informative: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    factors = torch.stack([torch.randint(s, (n,), generator=gen) for s in sizes], 1)
    onehot = torch.cat([torch.nn.functional.one_hot(factors[:, i], s) for i, s in enumerate(sizes)], 1).float()
    groups, start = {}, 0
    for i, s in enumerate(sizes):
        groups[f"f{i}"] = list(range(start, start + s))
        start += s
    noise = torch.randn(n, 64, generator=gen)
    if not informative:
        return noise, onehot, groups
    mixing = torch.randn(onehot.shape[1], 64, generator=gen)
    return onehot @ mixing + 0.3 * noise, onehot, groups


def test_probe_recovers_factors_and_random_features_sit_at_chance():
    sizes = [6, 8, 4, 3]
    for informative in (True, False):
        x, y, groups = _factor_data(2400, sizes, informative, seed=5)
        probe = fit_linear_probe(x[:1600], y[:1600], x[1600:2000], y[1600:2000], groups=groups, l2_grid=(1e-3,),
                                 progress=False)
        result = evaluate_probe(probe, x[2000:], y[2000:])
        for i, size in enumerate(sizes):
            acc = result["factor_accuracy"][f"f{i}"]
            if informative:
                assert acc > 0.95
            else:  # 400 test images: 4 binomial standard deviations around 1 / size
                assert abs(acc - 1 / size) < 4 * math.sqrt((1 / size) * (1 - 1 / size) / 400)
        chance = chance_macro_f1(y[2000:])
        if informative:
            assert result["macro_f1"] > 0.95
        else:
            assert abs(result["macro_f1"] - chance) < 0.05


def test_shapes_pixels_recover_colours_and_cache_round_trips(tmp_path):
    from sendvae.data.shapes import FACTORS, ShapesDataset, attribute_names

    train_set, test_set = ShapesDataset(1500, 16, seed=0), ShapesDataset(400, 16, seed=1)
    key = "shapes:test|16|train"
    train = extract_encoder_features(PixelEncoder(), train_set, dataset_key=key, cache_dir=tmp_path, batch_size=256)
    assert list(tmp_path.glob("features-*.safetensors"))
    again = extract_encoder_features(PixelEncoder(), train_set, dataset_key=key, cache_dir=tmp_path, batch_size=100)
    assert torch.equal(train.x, again.x) and torch.equal(train.attributes, again.attributes)
    assert train.shape == (3, 16, 16) and train.x.shape == (1500, 768)
    test = extract_encoder_features(PixelEncoder(), test_set, batch_size=256)
    names = attribute_names()
    groups = {f: [i for i, n in enumerate(names) if n.startswith(f + "=")] for f in FACTORS}
    fit = dict(groups=groups, names=names, l2_grid=(1e-3,), max_iter=60, progress=False)
    probe = fit_linear_probe(train.x, train.attributes, **fit)
    result = evaluate_probe(probe, test.x, test.attributes)
    control = fit_linear_probe(torch.randn(len(train), 128), train.attributes, **fit)
    control_result = evaluate_probe(control, torch.randn(len(test), 128), test.attributes)
    for factor, values in FACTORS.items():
        p = 1 / len(values)
        assert abs(control_result["factor_accuracy"][factor] - p) < 4 * math.sqrt(p * (1 - p) / 400) + 0.02
        if factor in ("object_hue", "background", "x", "y"):  # linear in pixels: far above chance
            assert result["factor_accuracy"][factor] > min(3 * p, 0.9)
            assert result["factor_accuracy"][factor] > control_result["factor_accuracy"][factor] + 0.3


def test_posterior_samples_are_seeded_per_image_not_per_batch(tmp_path):
    from sendvae.data.shapes import ShapesDataset
    from sendvae.models.vae import build_vae

    vae = build_vae("tiny-f4c4").eval()
    data = ShapesDataset(10, 32, seed=0)
    a = extract_features(vae, data, use_mean=False, batch_size=3, seed=7)
    b = extract_features(vae, data, use_mean=False, batch_size=10, seed=7)
    mean = extract_features(vae, data, use_mean=True, batch_size=4)
    torch.testing.assert_close(a.x, b.x)
    assert a.shape == (4, 8, 8) and a.x.shape == (10, 256)
    assert not torch.allclose(a.x, mean.x)
    assert VAEEncoder(vae, True).key != VAEEncoder(vae, False, 7).key != VAEEncoder(vae, False, 8).key


def test_features_tokens_follow_the_layout():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    feats = Features(x.flatten(1), None, torch.zeros(2, dtype=torch.long), torch.arange(2), (3, 2, 2), "chw")
    tokens = feats.tokens()
    assert tokens.shape == (8, 3)
    torch.testing.assert_close(tokens[1], x[0, :, 0, 1])
    zeros = torch.zeros(2, dtype=torch.long)
    nd = Features(torch.arange(12.0).reshape(2, 6), None, zeros, torch.arange(2), (3, 2), "nd")
    torch.testing.assert_close(nd.tokens(), torch.arange(12.0).reshape(6, 2))


def test_bad_inputs_name_the_problem():
    x, y = _synthetic_multilabel(50, 4, 2, seed=6)
    with pytest.raises(UserError, match="l2_grid"):
        fit_linear_probe(x, y, l2_grid=(-1.0,), progress=False)
    with pytest.raises(UserError, match="expected features"):
        fit_linear_probe(x, y[:, 0], progress=False)
    with pytest.raises(UserError, match="unknown"):
        fit_linear_probe(x, torch.full_like(y, math.nan), progress=False)


def test_probe_command_end_to_end_with_references_and_cache(tmp_path, capsys):
    from sendvae.cli import main
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import save_vae

    torch.manual_seed(0)
    save_vae(build_vae("tiny-f4c4"), tmp_path / "tiny")
    out = tmp_path / "probe"
    argv = ["probe", "--vae", f"tiny={tmp_path / 'tiny'}", "--data", "shapes:300", "--reference", "pixels",
            "--out", str(out), "resolution=32", "l2_grid=[1e-3]", "max_iter=40", "reference_pca_dim=64",
            "latent_metrics=true", "gmm_k_grid=[1,2]"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| tiny | vae | 256 |" in printed and "| pixels | reference | 64 |" in printed
    results = json.loads((out / "probe_results.json").read_text())
    (ds,) = results["datasets"]
    assert ds["name"] == "shapes" and len(ds["attributes"]) == 49 and set(ds["factors"]) >= {"shape", "texture"}
    assert (ds["n_train"], ds["n_val"], ds["n_test"]) == (210, 30, 60)
    tiny, pixels = ds["rows"]
    assert tiny["feature_shape"] == [4, 8, 8] and pixels["feature_dim"] == 3 * 32 * 32
    assert all(0 <= v <= 1 for v in tiny["factor_accuracy"].values())
    assert set(tiny["latent_metrics"]) >= {"uniformity_gini", "gmm_modes", "class_probe_accuracy"}
    assert 0 <= tiny["micro_f1"] <= 1 and len(tiny["per_attribute_f1"]) == 49
    assert len(list((out / "feature_cache").glob("*.safetensors"))) == 6  # 2 rows x 3 splits


def test_probe_command_errors_name_the_input(tmp_path, capsys):
    from sendvae.cli import main

    assert main(["probe", "--vae", str(tmp_path / "nope"), "--data", "shapes:100", "--out", str(tmp_path)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["probe", "--reference", "teacher", "--data", "shapes:100", "--out", str(tmp_path)]) == 2
    assert "teacher:NAME" in capsys.readouterr().err
