"""Does a latent metric predict generation quality? Correlations of probe / latent metrics with gFID.

The Send-VAE paper's claim (arXiv 2601.05823, Figures 1-2, Table 8) is that attribute-level linear
probing F1 tracks gFID across VAEs (Pearson -0.9572 between attribute recall and gFID), while
ImageNet linear probing, uniformity and GMM discrimination do not. This module joins per-VAE
metrics -- from ``sendvae probe`` JSON results or any CSV with a ``name`` column -- with gFID values
per VAE name and reports, for every metric:

* Pearson's r (``cov(x, y) / (sd(x) sd(y))``) and Spearman's rho (Pearson's r of the ranks, ties
  given their average rank);
* percentile bootstrap confidence intervals: VAEs are resampled with replacement ``n_boot`` times
  from a seeded generator; resamples in which either variable is constant (r undefined) are
  dropped, and the number kept is reported (with 4 VAEs a good share of the resamples degenerate);
* a scatter plot of metric vs gFID with a least-squares line and the VAE names (PNG, matplotlib Agg);
* a markdown table.

Metric names are ``DATASET:metric`` (``celeba:micro_f1``, ``shapes:latent.gmm_modes``); only rows
with a gFID are used, so reference rows (pixels, teacher) drop out unless given a gFID.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sendvae.errors import UserError
from sendvae.eval.probe import json_safe

log = logging.getLogger(__name__)

PROBE_METRICS = ("micro_f1", "macro_f1", "top3_recall", "top5_recall", "mean_factor_accuracy")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def metrics_from_probe_results(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``probe_results.json`` content -> {row name: {"DATASET:metric": value}}."""
    table: dict[str, dict[str, float]] = {}
    datasets = results.get("datasets", [])
    short = [ds.get("name") or ds.get("spec", "data") for ds in datasets]
    for ds, name in zip(datasets, short):
        prefix = name if short.count(name) == 1 else ds.get("spec", name)  # two shapes:N sets keep apart
        for row in ds.get("rows", []):
            metrics = table.setdefault(row["name"], {})
            for key, value in row.items():
                if re.fullmatch(r"top\d+_recall", key) or key in PROBE_METRICS:
                    if isinstance(value, (int, float)):
                        metrics[f"{prefix}:{key}"] = float(value)
            for key, value in (row.get("latent_metrics") or {}).items():
                if isinstance(value, (int, float)):
                    metrics[f"{prefix}:latent.{key}"] = float(value)
    return table


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None


def metrics_from_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """A CSV with a ``name`` column and one numeric column per metric (empty cells are skipped)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "name" not in reader.fieldnames:
            raise UserError(f"{path}: needs a header row with a 'name' column")
        table: dict[str, dict[str, float]] = {}
        for line, row in enumerate(reader, start=2):
            name = (row.pop("name") or "").strip()
            if not name:
                raise UserError(f"{path} line {line}: empty name")
            table.setdefault(name, {}).update(
                {k: _number(v, f"{path} line {line}, column {k}") for k, v in row.items() if k and v not in (None, "")}
            )
    return table


def load_metric_tables(paths: Iterable[str | Path]) -> dict[str, dict[str, float]]:
    """Merge probe JSON results and metric CSVs into {name: {metric: value}} (later files win on clashes)."""
    merged: dict[str, dict[str, float]] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"results file {p} does not exist")
        if p.suffix.lower() == ".csv":
            table = metrics_from_csv(p)
        else:
            try:
                table = metrics_from_probe_results(json.loads(p.read_text()))
            except json.JSONDecodeError as exc:
                raise UserError(f"{p} is not valid JSON ({exc}); give probe_results.json or a .csv") from None
        for name, metrics in table.items():
            merged.setdefault(name, {}).update(metrics)
    return merged


def parse_gfid(items: Sequence[str] = (), csv_path: str | Path | None = None) -> dict[str, float]:
    """gFID per VAE name from ``name=value`` items and/or a CSV (``name,gfid`` with or without a header)."""
    gfid: dict[str, float] = {}
    if csv_path is not None:
        path = Path(csv_path)
        if not path.is_file():
            raise UserError(f"--gfid-file {path} does not exist")
        with path.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip() or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise UserError(f"{path} line {line}: expected 'name,gfid'")
                if line == 1 and row[1].strip().lower() in ("gfid", "fid", "value"):
                    continue
                gfid[row[0].strip()] = _number(row[1].strip(), f"{path} line {line}")
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--gfid {item!r}: expected NAME=VALUE")
        gfid[name.strip()] = _number(value.strip(), f"--gfid {item}")
    return gfid


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either variable is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 1e-300 else math.nan


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def bootstrap_ci(
    x: Sequence[float], y: Sequence[float], statistic: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, int]:
    """Percentile bootstrap interval of ``statistic(x, y)`` over resampled pairs -> (low, high, resamples kept)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        v = statistic(x[idx], y[idx])
        if not math.isnan(v):
            values.append(v)
    if len(values) < 2:
        return math.nan, math.nan, len(values)
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high), len(values)


def correlate_metrics(
    metrics: Mapping[str, Mapping[str, float]],
    gfid: Mapping[str, float],
    *,
    n_boot: int = 2000,  # bootstrap resamples per statistic
    level: float = 0.95,  # confidence level of the intervals
    seed: int = 0,  # bootstrap generator
    min_points: int = 3,  # metrics known for fewer VAEs (with gFID) are skipped
) -> list[dict[str, Any]]:
    """One entry per metric: the VAEs used, their values, Pearson/Spearman and bootstrap intervals."""
    names = [n for n in metrics if n in gfid]
    missing = sorted(set(gfid) - set(metrics))
    if missing:
        log.warning("gFID given for %s but no metrics found for them", ", ".join(missing))
    all_metrics = sorted({m for n in names for m in metrics[n]})
    out = []
    for metric in all_metrics:
        used = [n for n in names if metric in metrics[n] and not math.isnan(metrics[n][metric])]
        if len(used) < min_points:
            log.info("metric %s: only %d VAEs with gFID, skipped", metric, len(used))
            continue
        xs = [metrics[n][metric] for n in used]
        ys = [gfid[n] for n in used]
        p_lo, p_hi, p_kept = bootstrap_ci(xs, ys, pearson, n_boot=n_boot, level=level, seed=seed)
        s_lo, s_hi, s_kept = bootstrap_ci(xs, ys, spearman, n_boot=n_boot, level=level, seed=seed)
        out.append({
            "metric": metric, "n": len(used), "names": used, "values": xs, "gfid": ys,
            "pearson": pearson(xs, ys), "pearson_ci": [p_lo, p_hi], "pearson_boot_kept": p_kept,
            "spearman": spearman(xs, ys), "spearman_ci": [s_lo, s_hi], "spearman_boot_kept": s_kept,
            "level": level, "n_boot": n_boot,
        })
    return out


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "metric"


def scatter_plot(entry: Mapping[str, Any], path: str | Path, ax: Any = None) -> None:
    """Metric (x) vs gFID (y) with a least-squares line and VAE names, like the paper's Figures 1-2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.2, 3.4), dpi=150)
    x, y = np.asarray(entry["values"], dtype=float), np.asarray(entry["gfid"], dtype=float)
    ax.scatter(x, y, s=28, color="tab:blue", zorder=3)
    for name, xi, yi in zip(entry["names"], x, y):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, slope * grid + intercept, color="tab:red", lw=1.2, ls="--", zorder=2)
    ax.set_xlabel(entry["metric"])
    ax.set_ylabel("gFID")
    ax.set_title(f"r = {entry['pearson']:.3f}, rho = {entry['spearman']:.3f} (n = {entry['n']})", fontsize=8)
    ax.margins(0.12)
    ax.grid(alpha=0.3)
    if own:
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def overview_plot(entries: Sequence[Mapping[str, Any]], path: str | Path, columns: int = 3) -> None:
    """All metric-vs-gFID panels in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(entries) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), dpi=120, squeeze=False)
    for ax, entry in zip(axes.flat, entries):
        scatter_plot(entry, path, ax=ax)
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def correlation_markdown(entries: Sequence[Mapping[str, Any]]) -> str:
    """A table: metric, n, Pearson r [CI], Spearman rho [CI]."""
    lines = ["# Latent metrics vs gFID", "",
             "| metric | n | Pearson r | CI | Spearman rho | CI | plot |", "|---|---|---|---|---|---|---|"]

    def f(v: float) -> str:
        return "–" if v is None or math.isnan(v) else f"{v:.4f}"

    for e in entries:
        lines.append(
            f"| {e['metric']} | {e['n']} | {f(e['pearson'])} | [{f(e['pearson_ci'][0])}, {f(e['pearson_ci'][1])}] | "
            f"{f(e['spearman'])} | [{f(e['spearman_ci'][0])}, {f(e['spearman_ci'][1])}] | "
            f"[png](plots/{_slug(e['metric'])}.png) |"
        )
    if entries:
        level = entries[0]["level"]
        lines += ["", f"Intervals: {level:.0%} percentile bootstrap over VAEs ({entries[0]['n_boot']} resamples, "
                  "resamples with a constant variable dropped)."]
    return "\n".join(lines) + "\n"


def run_correlate(
    results: Sequence[str | Path],
    gfid: Mapping[str, float],
    out_dir: str | Path,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] | None = None,  # keep only these metric names (default: all)
) -> list[dict[str, Any]]:
    """Join results with gFID; write correlations.json, correlations.md, plots/<metric>.png and plots/overview.png."""
    if not gfid:
        raise UserError("no gFID values: give --gfid NAME=VALUE ... or --gfid-file CSV")
    table = load_metric_tables(results)
    if metrics:
        unknown = sorted(set(metrics) - {m for row in table.values() for m in row})
        if unknown:
            raise UserError(f"--metric {unknown[0]} is not in the results (known: "
                            f"{', '.join(sorted({m for row in table.values() for m in row}))})")
        table = {n: {m: v for m, v in row.items() if m in metrics} for n, row in table.items()}
    common = sorted(set(table) & set(gfid))
    if len(common) < 3:
        raise UserError(f"need at least 3 VAEs with both metrics and a gFID; matched {common or 'none'} "
                        f"(results name {sorted(table)}, gFID names {sorted(gfid)})")
    entries = correlate_metrics(table, gfid, n_boot=n_boot, level=level, seed=seed)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for e in entries:
        scatter_plot(e, out / "plots" / f"{_slug(e['metric'])}.png")
    if entries:
        overview_plot(entries, out / "plots" / "overview.png")
    payload = json_safe({"gfid": dict(gfid), "correlations": entries})
    (out / "correlations.json").write_text(json.dumps(payload, indent=1))
    (out / "correlations.md").write_text(correlation_markdown(entries))
    return entries
