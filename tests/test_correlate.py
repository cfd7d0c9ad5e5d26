"""Correlating latent metrics with gFID: the paper's Table 8 numbers, ranks, bootstrap, plots, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sendvae.cli import main
from sendvae.errors import UserError
from sendvae.eval.correlate import (
    average_ranks,
    bootstrap_ci,
    correlate_metrics,
    load_metric_tables,
    parse_gfid,
    pearson,
    run_correlate,
    spearman,
)

# Send-VAE paper, Table 8 (F1 of the attribute probe; gFID of SiT-B/1, 80 epochs, no CFG).
TABLE8 = {
    "IN-VAE": {"celeba": 0.6222, "deepfashion": 0.0786, "awa": 0.5567, "gfid": 17.43},
    "VA-VAE": {"celeba": 0.6347, "deepfashion": 0.1094, "awa": 0.5948, "gfid": 11.40},
    "E2E-VAE": {"celeba": 0.6439, "deepfashion": 0.1177, "awa": 0.6441, "gfid": 8.96},
    "Send-VAE": {"celeba": 0.6647, "deepfashion": 0.1385, "awa": 0.6623, "gfid": 7.57},
}


def _table8_inputs() -> tuple[dict, dict]:
    metrics = {n: {f"{k}:f1": v for k, v in row.items() if k != "gfid"} for n, row in TABLE8.items()}
    return metrics, {n: row["gfid"] for n, row in TABLE8.items()}


def test_table8_pearson_matches_numpy_and_spearman_matches_hand_ranks():
    metrics, gfid = _table8_inputs()
    entries = {e["metric"]: e for e in correlate_metrics(metrics, gfid, n_boot=500, seed=0)}
    names = list(TABLE8)
    g = [TABLE8[n]["gfid"] for n in names]
    for dataset in ("celeba", "deepfashion", "awa"):
        f1 = [TABLE8[n][dataset] for n in names]
        entry = entries[f"{dataset}:f1"]
        assert entry["n"] == 4
        assert entry["pearson"] == pytest.approx(np.corrcoef(f1, g)[0, 1], abs=1e-12)
        # F1 rises IN < VA < E2E < Send while gFID falls: ranks 1..4 against 4..1, rho = -1 exactly
        assert entry["spearman"] == pytest.approx(-1.0, abs=1e-12)
    assert entries["celeba:f1"]["pearson"] == pytest.approx(-0.9015, abs=5e-4)


def test_spearman_with_ties_against_hand_ranks():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4, 3, 5])
    d = rx - rx.mean()
    e = ry - ry.mean()
    assert spearman(x, y) == pytest.approx(float((d * e).sum() / np.sqrt((d * d).sum() * (e * e).sum())))
    assert np.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = -0.8 * x + 0.5 * rng.normal(size=30)
    low, high, kept = bootstrap_ci(x, y, pearson, n_boot=800, seed=3)
    assert (low, high, kept) == bootstrap_ci(x, y, pearson, n_boot=800, seed=3)
    assert low < pearson(x, y) < high < 0 and kept == 800
    # with 4 VAEs some resamples repeat one VAE only (r undefined): they are dropped and counted
    metrics, gfid = _table8_inputs()
    xs = [metrics[n]["celeba:f1"] for n in TABLE8]
    _, _, kept4 = bootstrap_ci(xs, [gfid[n] for n in TABLE8], pearson, n_boot=1000, seed=0)
    assert 900 < kept4 < 1000


def _probe_results(path, rows: dict[str, float]) -> None:
    results = {"config": {"top_k": [3, 5]}, "datasets": [{
        "spec": "celeba:/data/celeba", "name": "celeba",
        "rows": [{"name": n, "kind": "vae", "micro_f1": v, "macro_f1": v - 0.1, "top3_recall": v / 2,
                  "latent_metrics": {"uniformity_gini": 0.5 + 0.01 * i}} for i, (n, v) in enumerate(rows.items())]
        + [{"name": "pixels", "kind": "reference", "micro_f1": 0.3, "macro_f1": 0.2}],
    }]}
    path.write_text(json.dumps(results))


def test_correlate_command_writes_table_json_and_plots(tmp_path, capsys):
    results = tmp_path / "probe_results.json"
    _probe_results(results, {n: TABLE8[n]["celeba"] for n in TABLE8})
    extra = tmp_path / "imagenet.csv"
    extra.write_text("name,imagenet_probe\nIN-VAE,0.4\nVA-VAE,0.6\nE2E-VAE,0.55\nSend-VAE,0.58\n")
    gfid_csv = tmp_path / "gfid.csv"
    gfid_csv.write_text("name,gfid\n" + "".join(f"{n},{TABLE8[n]['gfid']}\n" for n in ["IN-VAE", "VA-VAE"]))
    out = tmp_path / "corr"
    code = main(["correlate", str(results), str(extra), "--gfid-file", str(gfid_csv), "--gfid", "E2E-VAE=8.96",
                 "--gfid", "Send-VAE=7.57", "--bootstrap", "200", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "celeba:micro_f1" in printed and "imagenet_probe" in printed
    saved = json.loads((out / "correlations.json").read_text())
    by_metric = {e["metric"]: e for e in saved["correlations"]}
    assert set(by_metric) == {"celeba:micro_f1", "celeba:macro_f1", "celeba:top3_recall",
                              "celeba:latent.uniformity_gini", "imagenet_probe"}
    assert by_metric["celeba:micro_f1"]["names"] == list(TABLE8)  # the pixels reference has no gFID
    f1 = [TABLE8[n]["celeba"] for n in TABLE8]
    gfid = [TABLE8[n]["gfid"] for n in TABLE8]
    assert by_metric["celeba:micro_f1"]["pearson"] == pytest.approx(np.corrcoef(f1, gfid)[0, 1])
    for metric in by_metric:
        png = out / "plots" / f"{metric.replace(':', '_')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "plots" / "overview.png").is_file()
    assert "| celeba:micro_f1 | 4 |" in (out / "correlations.md").read_text()


def test_inputs_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_gfid(["no-equals"])
    with pytest.raises(UserError, match="not a number"):
        parse_gfid(["a=fast"])
    bad = tmp_path / "m.csv"
    bad.write_text("vae,score\nx,1\n")
    with pytest.raises(UserError, match="'name' column"):
        load_metric_tables([bad])
    results = tmp_path / "r.json"
    _probe_results(results, {"a": 0.1, "b": 0.2})
    with pytest.raises(UserError, match="at least 3 VAEs"):
        run_correlate([results], {"a": 1.0, "b": 2.0}, tmp_path / "o")
    assert main(["correlate", str(tmp_path / "missing.json"), "--gfid", "a=1", "--out", str(tmp_path / "o")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err


def test_correlate_reads_what_sendvae_probe_wrote(tmp_path, capsys):
    """The chain of the issue: `sendvae probe` (with the latent metrics) on four VAEs, then `sendvae correlate`
    against their gFIDs: every correlation is computed from the probe's own numbers, and plots exist."""
    import torch

    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import save_vae

    gfid = {"a": 17.4, "b": 11.4, "c": 9.0, "d": 7.6}
    args = ["probe", "--data", "shapes:240", "--out", str(tmp_path / "probe"), "resolution=32", "l2_grid=[1e-3]",
            "max_iter=30", "latent_metrics=true", "gmm_k_grid=[1,2]"]
    for seed, name in enumerate(gfid):
        torch.manual_seed(seed)
        save_vae(build_vae("tiny-f4c4"), tmp_path / name)
        args += ["--vae", f"{name}={tmp_path / name}"]
    assert main(args) == 0
    results = tmp_path / "probe" / "probe_results.json"
    rows = {r["name"]: r for r in json.loads(results.read_text())["datasets"][0]["rows"]}
    capsys.readouterr()

    out = tmp_path / "corr"
    assert main(["correlate", str(results), *[f"--gfid={n}={v}" for n, v in gfid.items()], "--bootstrap", "100",
                 "--out", str(out)]) == 0
    assert "shapes:macro_f1" in capsys.readouterr().out
    by_metric = {e["metric"]: e for e in json.loads((out / "correlations.json").read_text())["correlations"]}
    assert {"shapes:macro_f1", "shapes:micro_f1", "shapes:latent.uniformity_gini"} <= set(by_metric)
    names = list(gfid)
    for metric, value in (("shapes:macro_f1", lambda r: r["macro_f1"]),
                          ("shapes:latent.uniformity_gini", lambda r: r["latent_metrics"]["uniformity_gini"])):
        xs = [value(rows[n]) for n in names]
        assert by_metric[metric]["names"] == names
        assert by_metric[metric]["pearson"] == pytest.approx(np.corrcoef(xs, [gfid[n] for n in names])[0, 1])
        assert (out / "plots" / f"{metric.replace(':', '_')}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plots" / "overview.png").is_file() and (out / "correlations.md").is_file()
