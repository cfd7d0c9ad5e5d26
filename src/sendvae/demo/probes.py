"""The demo's probe step: linear probes of the 49 shapes attributes on every VAE and the reference rows.

Each row is a linear probe (:mod:`sendvae.eval.probe`) on the flattened posterior mean, fitted on the
first ``probe_train`` training images and scored on the held-out test set (macro-F1 and per-factor
accuracy); the reference rows are raw pixels, a random-init VAE and (in ``--full``) the teacher,
PCA-reduced to ``reference_pca_dim``. Rows are saved as they finish, so the step resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sendvae.demo.config import DemoConfig
from sendvae.demo.plan import atomic_json, slug
from sendvae.demo.vaes import latent_grid, vae_preset

log = logging.getLogger(__name__)


class AutocastEncoder:
    """A probe feature encoder (:class:`sendvae.eval.probe_features.FeatureEncoder`) run under bf16 autocast.

    Evaluation features only need a few significant digits, and bf16 makes the encoders 2-3x faster
    on CPUs with native bf16 (the demo asks only where ``precision`` resolved to bf16); the
    feature-cache key records the precision."""

    def __init__(self, encoder: Any, bf16: bool) -> None:
        self.encoder, self.bf16 = encoder, bf16
        self.key = encoder.key + (":bf16" if bf16 else "")
        self.layout = encoder.layout

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(images, index).float()


def _probe_row(name: str, kind: str, encoder: Any, train: Any, test: Any, cfg: DemoConfig, keys: tuple[str, str],
               cache: Path) -> dict[str, Any]:
    """Features -> (PCA for references) -> linear probe fitted on probe-train -> scores on the test set."""
    from sendvae.data.shapes import attribute_names
    from sendvae.eval.probe import evaluate_probe, factor_groups
    from sendvae.eval.probe_features import extract_encoder_features
    from sendvae.eval.probe_solver import PCA, fit_linear_probe

    start = time.time()
    names = attribute_names()
    feats = [extract_encoder_features(encoder, ds, dataset_key=key, cache_dir=cache, batch_size=250, desc=f"{name} {split}")
             for ds, key, split in ((train, keys[0], "train"), (test, keys[1], "test"))]
    x_train, x_test = feats[0].x, feats[1].x
    if kind == "reference" and cfg.reference_pca_dim and x_train.shape[1] > cfg.reference_pca_dim:
        pca = PCA.fit(x_train, cfg.reference_pca_dim, cfg.seed)
        x_train, x_test = pca(x_train), pca(x_test)
    probe = fit_linear_probe(x_train, feats[0].attributes, max_iter=cfg.probe_max_iter, seed=cfg.seed, names=names,
                             groups=factor_groups(names), progress=False)
    scores = evaluate_probe(probe, x_test, feats[1].attributes)
    return {"name": name, "kind": kind, "feature_dim": int(feats[0].x.shape[1]), "probe_dim": int(x_train.shape[1]),
            "l2": probe.l2, "macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"],
            "mean_factor_accuracy": scores["mean_factor_accuracy"], "factor_accuracy": scores["factor_accuracy"],
            "n_train": int(x_train.shape[0]), "n_test": int(x_test.shape[0]), "seconds": round(time.time() - start, 1)}


def _encoder_specs(cfg: DemoConfig, vaes: dict[str, str]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(row name, kind, encoder factory) for every VAE and reference row."""
    from sendvae.eval.probe_features import PixelEncoder, TeacherEncoder, VAEEncoder
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import load_vae

    specs: list[tuple[str, str, Callable[[], Any]]] = []
    for name, path in vaes.items():
        specs.append((name, "vae", lambda path=path: VAEEncoder(load_vae(path).eval())))
    for ref in cfg.probe_references:
        if ref == "pixels":
            specs.append(("pixels", "reference", PixelEncoder))
        elif ref == "random-vae":
            def random_vae() -> Any:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    return VAEEncoder(build_vae(vae_preset(cfg), resolution=cfg.resolution).eval())
            specs.append(("random-init VAE", "reference", random_vae))
        else:
            def teacher_encoder() -> Any:
                from sendvae.models.teachers import build_teacher

                return TeacherEncoder(build_teacher(cfg.teacher, grid=latent_grid(cfg)).eval(), cfg.teacher)
            specs.append((f"teacher {cfg.teacher}", "reference", teacher_encoder))
    return specs


def run_probes(cfg: DemoConfig, data: dict[str, Any], vaes: dict[str, str], folder: Path) -> dict[str, Any]:
    """Step ``probe``: every VAE and reference row; each row is saved as it finishes (resumable)."""
    from torch.utils.data import Subset

    from sendvae.data.shapes import attribute_vector
    from sendvae.data.store import ImageStore
    from sendvae.eval.probe import chance_macro_f1

    train_store, test_store = ImageStore(data["train"]), ImageStore(data["test"])
    n = min(cfg.probe_train or len(train_store), len(train_store))
    train = Subset(train_store, range(n))
    keys = (f"demo-train|{data['train_hash']}|{n}", f"demo-test|{data['test_hash']}")
    rows_dir = folder / "rows"
    rows_dir.mkdir(exist_ok=True)
    rows = []
    for name, kind, make in _encoder_specs(cfg, vaes):
        path = rows_dir / f"{slug(name)}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        encoder = AutocastEncoder(make(), cfg.precision == "bf16")
        row = _probe_row(name, kind, encoder, train, test_store, cfg, keys, folder / "features")
        log.info("probe %s: macro-F1 %.4f, mean factor accuracy %.4f (%.0f s)", name, row["macro_f1"],
                 row["mean_factor_accuracy"], row["seconds"])
        atomic_json(path, row)
        rows.append(row)
    attributes = torch.from_numpy(attribute_vector(test_store.factors))
    return {"rows": rows, "chance_macro_f1": chance_macro_f1(attributes), "n_train": n, "n_test": len(test_store)}
