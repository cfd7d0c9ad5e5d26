"""Linear probes of attributes on a VAE latent: the paper's disentanglement measure (SPEC.md section 3).

Send-VAE argues that a generation-friendly latent lays attribute information out *linearly*, and
measures it with a linear probe on the **flattened encoder latent** (no pooling; 32x16x16 = 8192-d
for f16d32) that predicts binary attributes (CelebA, DeepFashion, AwA2), scored by F1 (paper
Table 8). The paper leaves the classifier, splits and F1 averaging open; this module fixes them:

* **features** (:mod:`sendvae.eval.probe_features`): the posterior mean (default) or one posterior
  sample per image, flattened; cached as safetensors per (encoder fingerprint, dataset, split). A
  sample for image ``i`` uses noise seeded by ``(seed, i)``, so it does not depend on the batch size.
* **classifier** (:mod:`sendvae.eval.probe_solver`, ``fit_linear_probe``): one logistic regression per
  attribute, all fitted jointly in torch by full-batch L-BFGS on features standardised with *train*
  statistics. The
  objective for attribute ``a`` is ``mean_i BCE(x_i . w_a + b_a, y_ia) + (l2 / 2) |w_a|^2`` over the
  images whose label is known (NaN labels are masked), i.e. scikit-learn's
  ``LogisticRegression(C = 1 / (l2 * n_a))``. Each attribute's L2 weight is chosen from ``l2_grid``
  (extended down to 1e-5 and 0, PILOT.md) by its validation log-loss, with early stopping on that
  loss, per attribute (the problems are independent; one attribute overfitting does not stop the
  others); without a validation split the dataset's train split is carved (seeded).
* **thresholds**: one per attribute, chosen on validation to maximise that attribute's F1.
* **scores** (:func:`evaluate_probe`): micro F1 (pooled TP/FP/FN), macro F1 (mean of per-attribute
  F1 over attributes where F1 is defined), per-attribute F1, top-k recall (DeepFashion's protocol as
  mmfashion computes it, :func:`top_k_recall`: per attribute, the fraction of its positive images
  that rank it among their k highest scores, averaged over the ``recall_best`` attributes with the
  highest recall; k = 3, 5; the per-image variant is reported too, :func:`top_k_recall_per_image`)
  and, for datasets made of one-hot factor groups (shapes), the per-factor accuracy of the argmax
  inside each group.

:func:`run_probe` runs this for several VAEs and reference rows (raw pixels, a teacher's tokens,
a random-init VAE) on several datasets, and writes ``probe_results.json`` and ``probe_results.md``.
Wide references are reduced for speed to the top principal directions of their *standardised*
features, the components kept at their relative scale (``standardized_pca`` in
:mod:`sendvae.eval.probe_solver`). A random-init VAE is a *reference*, not a floor: it can beat a
trained VAE on some factors (PILOT.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sendvae.config import to_dict
from sendvae.errors import UserError
from sendvae.eval.probe_config import ProbeConfig
from sendvae.eval.probe_features import (
    FeatureEncoder,
    Features,
    PixelEncoder,
    TeacherEncoder,
    VAEEncoder,
    extract_encoder_features,
)
from sendvae.eval.probe_solver import (
    LinearProbe,
    carve_validation,
    check_xy,
    fit_linear_probe,
    nan_to_mask,
    standardized_pca,
)
from sendvae.hardware import resolve_device
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def f1_scores(pred: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Per-attribute F1 [A] (NaN where no known positive is predicted or present) and micro F1."""
    y, mask = nan_to_mask(y.float())
    pred = pred.float() * mask
    tp = (pred * y).sum(0)
    fp = (pred * (1 - y) * mask).sum(0)
    fn = ((1 - pred) * y * mask).sum(0)
    denom = 2 * tp + fp + fn
    per_attr = torch.where(denom > 0, 2 * tp / denom.clamp_min(_EPS), torch.full_like(tp, math.nan))
    micro_denom = float(denom.sum())
    micro = 2 * float(tp.sum()) / micro_denom if micro_denom > 0 else math.nan
    return per_attr, micro


def _in_top_k(scores: Tensor, k: int) -> Tensor:
    """0/1 matrix like ``scores`` [n, A]: 1 where the attribute is among the image's k highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, top, 1.0)


def top_k_recall(scores: Tensor, y: Tensor, k: int, best: int = 50) -> float:
    """DeepFashion's top-k recall rate, the published protocol (mmfashion's attribute evaluation).

    Per attribute a: ``recall_a = |images positive for a that rank a among their k top scores| /
    |images positive for a|``, over the attributes with at least one positive. Reported: the mean of
    the ``best`` highest ``recall_a`` (mmfashion: 50 of DeepFashion's 1,000 attributes), or of all of
    them when ``best`` is 0 or exceeds their number. Unknown (NaN) labels count as not positive.
    """
    y, _ = nan_to_mask(y.float())
    positives = y.sum(0)
    has = positives > 0
    if not bool(has.any()):
        return math.nan
    recall = (_in_top_k(scores, k) * y).sum(0)[has] / positives[has]
    if 0 < best < recall.numel():
        recall = recall.topk(best).values
    return float(recall.mean())


def top_k_recall_per_image(scores: Tensor, y: Tensor, k: int) -> float:
    """Per image, |positives among the k top scores| / |positives|, averaged over images with a positive.

    Not DeepFashion's protocol (:func:`top_k_recall` counts per attribute); unknown (NaN) labels count
    as not positive.
    """
    y, _ = nan_to_mask(y.float())
    positives = y.sum(1)
    has = positives > 0
    hits = (_in_top_k(scores, k) * y).sum(1)
    return float((hits[has] / positives[has]).mean()) if bool(has.any()) else math.nan


def factor_accuracy(logits: Tensor, y: Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Per factor, the accuracy of the argmax over its one-hot group (images with exactly one known positive)."""
    out = {}
    for factor, cols in groups.items():
        cols_t = torch.as_tensor(list(cols), dtype=torch.long)
        target = y[:, cols_t]
        valid = (~torch.isnan(target)).all(1) & ((target == 1).sum(1) == 1)
        if not bool(valid.any()):
            out[factor] = math.nan
            continue
        pred = logits[valid][:, cols_t].argmax(1)
        out[factor] = float((pred == target[valid].argmax(1)).float().mean())
    return out


def evaluate_probe(probe: LinearProbe, x: Tensor, y: Tensor, ks: Sequence[int] = (3, 5),
                   recall_best: int = 50) -> dict[str, Any]:
    """Micro/macro/per-attribute F1, top-k recall (over the ``recall_best`` best attributes, and per
    image) and (with factor groups) per-factor accuracy on (x, y)."""
    check_xy(x, y, "evaluation")
    logits = probe.logits(x).cpu()
    y = y.float().cpu()
    per_attr, micro = f1_scores((logits > probe.thresholds).float(), y)
    defined = ~torch.isnan(per_attr)
    result: dict[str, Any] = {
        "micro_f1": micro,
        "macro_f1": float(per_attr[defined].mean()) if bool(defined.any()) else math.nan,
        "per_attribute_f1": {n: float(v) for n, v in zip(probe.names, per_attr)},
    }
    for k in ks:
        result[f"top{k}_recall"] = top_k_recall(logits, y, k, recall_best)
        result[f"top{k}_recall_per_image"] = top_k_recall_per_image(logits, y, k)
    if probe.groups:
        acc = factor_accuracy(logits, y, probe.groups)
        result["factor_accuracy"] = acc
        values = [v for v in acc.values() if not math.isnan(v)]
        result["mean_factor_accuracy"] = sum(values) / len(values) if values else math.nan
    return result


def chance_macro_f1(y: Tensor) -> float:
    """Macro F1 of the best label-blind rule (predict every image positive): mean of 2p / (1 + p)."""
    y, mask = nan_to_mask(y.float())
    p = (y * mask).sum(0) / mask.sum(0).clamp_min(1)
    keep = p > 0
    return float((2 * p[keep] / (1 + p[keep])).mean())


# ----------------------------------------------------------------------------------------------
# run_probe: VAEs x datasets -> JSON + markdown
# ----------------------------------------------------------------------------------------------


@dataclass
class RowSpec:
    """One probed row: a VAE checkpoint or a reference (pixels, teacher:NAME[@WEIGHTS], random-vae:PRESET)."""

    name: str
    kind: str  # "vae" or "reference"
    source: str


def parse_vae_argument(text: str) -> RowSpec:
    """``[NAME=]PATH``; the name defaults to the checkpoint's folder or file stem."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():  # a bare path (which may itself contain '=')
        path, name = text, ""
    if not path:
        raise UserError(f"--vae {text!r}: expected PATH or NAME=PATH")
    if not Path(path).exists():
        raise UserError(f"--vae {text!r}: {path} does not exist")
    return RowSpec(name or Path(path.rstrip("/")).stem, "vae", path)


REFERENCE_FORMS = "pixels, teacher:NAME[@WEIGHTS], random-vae:PRESET"


def parse_reference(text: str) -> RowSpec:
    kind, _, arg = text.partition(":")
    if kind == "pixels" and not arg:
        return RowSpec("pixels", "reference", text)
    if kind in ("teacher", "random-vae") and arg:
        return RowSpec(text, "reference", text)
    raise UserError(f"--reference {text!r}: expected one of {REFERENCE_FORMS}")


def _build_encoder(row: RowSpec, cfg: ProbeConfig, device: torch.device) -> FeatureEncoder:
    if row.kind == "vae":
        from sendvae.models.vae_formats import load_vae

        vae = load_vae(row.source).to(device).eval()
        return VAEEncoder(vae, cfg.use_mean, cfg.seed)
    kind, _, arg = row.source.partition(":")
    if kind == "pixels":
        return PixelEncoder()
    if kind == "teacher":
        from sendvae.models.teachers import build_teacher

        name, _, weights = arg.partition("@")
        return TeacherEncoder(build_teacher(name, weights=weights or None).to(device).eval(), name)
    from sendvae.models.vae import build_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_vae(arg, resolution=cfg.resolution)
    return VAEEncoder(vae.to(device).eval(), cfg.use_mean, cfg.seed)


def dataset_short_name(spec: str) -> str:
    """``celeba:/data/CelebA`` -> ``celeba``; ``csv:attrs.csv`` -> ``attrs``."""
    kind, _, arg = spec.partition(":")
    if kind == "csv" and arg:
        return Path(arg).stem
    return kind or spec


def _dataset_key(spec: str, resolution: int, split: str) -> str:
    kind, sep, arg = spec.partition(":")
    if sep and kind != "shapes" and arg:
        arg = str(Path(arg).resolve())
    return f"{kind}{sep}{arg}|{resolution}|{split}"


def factor_groups(names: Sequence[str], dataset: Any = None) -> dict[str, list[int]] | None:
    """One-hot factor groups: the dataset's own ``factor_groups`` if it has them, else names ``factor=value``."""
    own = getattr(dataset, "factor_groups", None)
    if own:
        return {k: list(v) for k, v in dict(own).items()}
    if not names or not all("=" in n for n in names):
        return None
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.split("=", 1)[0], []).append(i)
    return groups


def _split_or_none(data: Any, split: str) -> Any:
    try:
        ds = data.split(split)
    except (KeyError, ValueError, UserError) as exc:
        log.info("no %s split (%s)", split, exc)
        return None
    return ds if ds is not None and len(ds) > 0 else None


@dataclass
class _DatasetSplits:
    spec: str
    names: list[str]
    groups: dict[str, list[int]] | None
    train: Any
    val: Any
    test: Any


def _open_dataset(spec: str, cfg: ProbeConfig) -> _DatasetSplits:
    from sendvae.data.attributes import open_attribute_dataset

    data = open_attribute_dataset(spec, cfg.resolution)
    names = list(data.names)
    train, test = _split_or_none(data, "train"), _split_or_none(data, "test")
    if train is None or test is None:
        raise UserError(f"--data {spec}: needs non-empty train and test splits")
    return _DatasetSplits(spec, names, factor_groups(names, data), train, _split_or_none(data, "val"), test)


def _probe_one_row(
    row: RowSpec, data: _DatasetSplits, cfg: ProbeConfig, device: torch.device, cache_dir: Path | None,
) -> dict[str, Any]:
    start = time.time()
    encoder = _build_encoder(row, cfg, device)

    def feats(split: str, ds: Any) -> Features:
        return extract_encoder_features(
            encoder, ds, dataset_key=_dataset_key(data.spec, cfg.resolution, split), cache_dir=cache_dir,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, desc=f"{row.name} {split}",
        )

    train, test = feats("train", data.train), feats("test", data.test)
    if data.val is not None:
        val = feats("val", data.val)
    else:
        tr, va = carve_validation(len(train), cfg.val_fraction, cfg.seed)
        train, val = train.subset(tr), train.subset(va)
    if cfg.max_train and len(train) > cfg.max_train:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.max_train]
        train = train.subset(keep.sort().values)
    if train.attributes is None or test.attributes is None or val.attributes is None:
        raise UserError(f"--data {data.spec}: items carry no 'attributes'")
    pca_dim = cfg.reference_pca_dim if row.kind == "reference" else cfg.pca_dim
    x_train, x_val, x_test = train.x, val.x, test.x
    standardize = True
    if pca_dim and x_train.shape[1] > pca_dim:
        x_train, x_val, x_test = standardized_pca(x_train, (x_val, x_test), pca_dim, seed=cfg.seed, device=device)
        standardize = False  # orthonormal projections of standardised features: keep their relative scale
    probe = fit_linear_probe(  # copies the (standardised) features to the device itself
        x_train, train.attributes, x_val, val.attributes, l2_grid=cfg.l2_grid,
        max_iter=cfg.max_iter, check_every=cfg.check_every, patience=cfg.patience, seed=cfg.seed,
        names=data.names, groups=data.groups, device=device, standardize=standardize,
    )
    result: dict[str, Any] = {
        "name": row.name, "kind": row.kind, "source": row.source, "encoder": encoder.key,
        "feature_shape": list(train.shape), "feature_dim": int(train.x.shape[1]), "probe_dim": int(x_train.shape[1]),
        "l2_median": float(torch.tensor(probe.l2).median()),
        "l2_per_attribute": dict(zip(probe.names, probe.l2)),
        "val_log_loss": {str(k): float(v.mean()) for k, v in probe.val_losses.items()},
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
    }
    result.update(evaluate_probe(probe, x_test, test.attributes, cfg.top_k, cfg.recall_best))
    if cfg.latent_metrics:
        from sendvae.eval.latent_metrics import latent_metric_summary

        result["latent_metrics"] = latent_metric_summary(
            x_train, train.labels, x_test, test.labels, test.tokens(), seed=cfg.seed, device=device,
            l2_grid=cfg.l2_grid, max_iter=cfg.max_iter, k_grid=cfg.gmm_k_grid, standardize=standardize,
        )
    result["chance_macro_f1"] = chance_macro_f1(test.attributes)
    result["seconds"] = round(time.time() - start, 2)
    return result


_MARKDOWN_LATENT = ("class_probe_accuracy", "uniformity_gini", "uniformity_entropy", "gmm_modes")


def probe_markdown(results: Mapping[str, Any]) -> str:
    """A markdown table per dataset: one row per VAE/reference (per-attribute F1 stays in the JSON)."""
    from sendvae.eval.report import format_value

    lines = ["# Linear probes of attributes (flattened latent, F1 thresholds chosen on validation)", ""]
    for ds in results["datasets"]:
        rows = ds["rows"]
        ks = [k for k in results["config"]["top_k"]]
        headers = ["row", "kind", "dim", "micro-F1", "macro-F1"] + [f"top-{k} recall" for k in ks]
        factors = list(rows[0].get("factor_accuracy", {})) if rows else []
        if factors:
            headers += ["mean factor acc"] + factors
        present = rows[0].get("latent_metrics", {}) if rows else {}
        lm_keys = [k for k in _MARKDOWN_LATENT if k in present]  # the GMM NLL curve stays in the JSON
        headers += lm_keys + ["median L2"]
        lines += [f"## {ds['name']} (`{ds['spec']}`)", "",
                  f"{len(ds['attributes'])} attributes; train {ds['n_train']}, val {ds['n_val']}"
                  f"{' (carved from train)' if ds['val_carved'] else ''}, test {ds['n_test']}; "
                  f"chance macro-F1 (predict all positive) {format_value(ds['chance_macro_f1'])}.", "",
                  "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in rows:
            cells = [r["name"], r["kind"], r["probe_dim"], r["micro_f1"], r["macro_f1"]]
            cells += [r.get(f"top{k}_recall") for k in ks]
            if factors:
                cells += [r.get("mean_factor_accuracy")] + [r["factor_accuracy"].get(f) for f in factors]
            cells += [r.get("latent_metrics", {}).get(k) for k in lm_keys] + [r["l2_median"]]
            lines.append("| " + " | ".join(format_value(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run_probe(
    vae_paths: Sequence[str],
    data_specs: Sequence[str],
    out_dir: str | Path,
    config: ProbeConfig | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Probe every VAE (``[NAME=]PATH``) and reference on every dataset; write JSON + markdown into ``out_dir``.

    Returns the results dictionary that is written to ``probe_results.json``.
    """
    cfg = config or ProbeConfig()
    rows = [parse_vae_argument(v) for v in vae_paths] + [parse_reference(r) for r in references]
    if not rows:
        raise UserError("nothing to probe: give at least one --vae or --reference")
    if not data_specs:
        raise UserError("no dataset: give at least one --data SPEC")
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            raise UserError(f"two rows are named {row.name!r}: name them with --vae NAME=PATH")
        seen.add(row.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if cfg.cache_dir.lower() == "none" else Path(cfg.cache_dir or out / "feature_cache")
    device = resolve_device(cfg.device, setting="device")
    results: dict[str, Any] = {"config": to_dict(cfg), "datasets": []}
    for spec in data_specs:
        data = _open_dataset(spec, cfg)
        entry: dict[str, Any] = {
            "spec": spec, "name": dataset_short_name(spec), "attributes": data.names, "factors": data.groups,
            "val_carved": data.val is None, "rows": [],
        }
        for row in tqdm(rows, desc=f"probe {entry['name']}", unit="row", disable=not bars_enabled()):
            r = _probe_one_row(row, data, cfg, device, cache)
            entry["rows"].append(r)
            log.info("%s on %s: micro-F1 %.4f macro-F1 %.4f (%.0f s)", row.name, entry["name"], r["micro_f1"],
                     r["macro_f1"], r["seconds"])
        first = entry["rows"][0]
        entry.update(n_train=first["n_train"], n_val=first["n_val"], n_test=first["n_test"],
                     chance_macro_f1=first["chance_macro_f1"])
        results["datasets"].append(entry)
    results = json_safe(results)
    (out / "probe_results.json").write_text(json.dumps(results, indent=1))
    (out / "probe_results.md").write_text(probe_markdown(results))
    return results
