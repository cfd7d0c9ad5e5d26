"""Bitwise comparisons of what the commands write: training runs, latent caches, samples, stores.

Each ``assert_same_*`` compares a run that was interrupted and resumed with one that was not, and
names the first file and tensor that differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sendvae.train.checkpoint import Checkpoint, load_latest

# Keys of a checkpoint's state.json that depend on the wall clock, not on the computation.
_CLOCK_KEYS = {"seconds", "files"}
# Columns of metrics.jsonl that depend on the wall clock.
_CLOCK_COLUMNS = {"images_per_s", "seconds"}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert a.keys() == b.keys(), f"{where}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{where}: tensor {key} differs"


def assert_same_safetensors(a: Path, b: Path) -> None:
    assert_same_tensors(load_file(str(a)), load_file(str(b)), str(b))
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert fa.metadata() == fb.metadata(), f"{b}: metadata differs"


def _same_plain(a: object, b: object, where: str) -> None:
    """Optimiser states: nested dicts / lists of tensors and numbers, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _same_plain(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_plain(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    """Every tensor group and optimiser state, and the counters, are identical."""
    assert a.images_seen == b.images_seen, f"{b.path}: {b.images_seen} images seen, expected {a.images_seen}"
    assert sorted(a.state["files"]) == sorted(b.state["files"]), f"{b.path}: other files"
    for name in a.state["files"]:
        key = name.rsplit(".", 1)[0]
        if name.endswith(".safetensors"):
            assert_same_tensors(a.tensors(key), b.tensors(key), f"{b.path}/{name}")
        else:
            _same_plain(a.torch_state(key), b.torch_state(key), f"{b.path}/{name}")
    counters_a = {k: v for k, v in a.state.items() if k not in _CLOCK_KEYS}
    counters_b = {k: v for k, v in b.state.items() if k not in _CLOCK_KEYS}
    assert counters_a == counters_b, f"{b.path}/state.json: {counters_b} != {counters_a}"


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in _CLOCK_COLUMNS} for row in rows]


def assert_same_training_run(reference: Path, run: Path, published: dict[str, list[str]]) -> None:
    """Final checkpoint, published files (``{"vae": ["model.safetensors", ...]}``) and metrics identical."""
    ref_ckpt, run_ckpt = load_latest(reference / "checkpoints"), load_latest(run / "checkpoints")
    assert run_ckpt is not None, f"{run} has no valid checkpoint"
    assert_same_checkpoint(ref_ckpt, run_ckpt)
    for folder, files in published.items():
        for name in files:
            a, b = reference / folder / name, run / folder / name
            if name.endswith(".safetensors"):
                assert_same_safetensors(a, b)
            else:
                assert json.loads(a.read_text()) == json.loads(b.read_text()), f"{b} differs"
    assert metric_rows(run) == metric_rows(reference), f"{run}/metrics.jsonl differs from the uninterrupted run"


def assert_same_cache(reference: Path, cache: Path) -> None:
    """Same manifest and, shard by shard, the same tensors and metadata."""
    manifest = json.loads((reference / "manifest.json").read_text())
    assert json.loads((cache / "manifest.json").read_text()) == manifest, f"{cache}/manifest.json differs"
    shards = sorted(p.name for p in cache.glob("shard-*.safetensors"))
    assert shards == [s["file"] for s in manifest["shards"]], f"{cache}: shards {shards}"
    for name in shards:
        assert_same_safetensors(reference / name, cache / name)
    assert not list(cache.glob(".shard-*")), f"{cache}: temporary shard files left"


def assert_same_samples(reference: Path, samples: Path) -> None:
    """Same ``arr_0`` / ``arr_1`` (and sampling ``metadata``) in the npz and the same settings file; no parts
    folder left."""
    with np.load(reference) as a, np.load(samples) as b:
        assert sorted(a.files) == sorted(b.files) == ["arr_0", "arr_1", "metadata"]
        for key in a.files:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), f"{samples}: {key} differs"
    meta = lambda p: json.loads(p.with_suffix(".json").read_text())  # noqa: E731
    assert meta(samples) == meta(reference), f"{samples.with_suffix('.json')} differs"
    assert not Path(f"{samples}.parts").exists(), f"{samples}.parts was not removed"


def assert_same_store(reference: Path, store: Path) -> None:
    """Same manifest (content hash, skipped files, shards) and byte-identical shard arrays."""
    manifest = json.loads((reference / "manifest.json").read_text())
    assert json.loads((store / "manifest.json").read_text()) == manifest, f"{store}/manifest.json differs"
    for shard in manifest["shards"]:
        for key in ("images", "labels"):
            a, b = np.load(reference / shard[key]), np.load(store / shard[key])
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{store / shard[key]} differs"
    assert not list((store / "shards").glob("*.tmp*")), f"{store}: temporary files left"
