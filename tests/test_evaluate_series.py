"""`sendvae evaluate --checkpoints`: a tiny SiT trained a few steps, every checkpoint sampled with the same
seeds and evaluated, one row per checkpoint; AutoGuidance by one of the run's own training checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.fake_features import FakeInception

from sendvae.config import load_config
from sendvae.data.latents import cache_latents
from sendvae.data.store import open_image_dataset
from sendvae.models.latent_stats import compute_latent_stats
from sendvae.models.vae import build_vae
from sendvae.models.vae_formats import save_vae
from sendvae.train.sit import TrainSiTConfig, train_sit

RES = 32
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "sit_tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A train-sit run with checkpoints after 32, 64 and 96 images (tiny VAE and SiT, no REPA, fp32)."""
    root = tmp_path_factory.mktemp("series")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vae = build_vae("tiny-f4c4", resolution=RES)
        vae.set_latent_stats(*compute_latent_stats(vae, open_image_dataset("shapes:32", RES), 32))
        vae_dir = save_vae(vae, root / "vae")
        cache_latents(vae_dir, "shapes:32", root / "latents", batch_size=32, resolution=RES, shard_size=32,
                              device="cpu", num_workers=0)
        overrides = {
            "data.cache": root / "latents", "repa.weight": 0, "train.precision": "fp32", "train.device": "cpu",
            "train.batch_size": 16, "train.total_images": 96, "train.log_every": 32, "train.checkpoint_every": 32,
            "train.num_workers": 0, "train.seed": 1, "optim.lr": 1e-3, "train.ema_decay": 0.5,
        }
        cfg = load_config(TrainSiTConfig, CONFIG, [f"{k}={v}" for k, v in overrides.items()])
        train_sit(cfg, root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture()
def reference(tmp_path) -> Path:
    data = open_image_dataset("shapes:40", RES)
    images = np.stack([data[i]["image"].permute(1, 2, 0).numpy() for i in range(40)])
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images, arr_1=np.array([int(data[i]["label"]) for i in range(40)]))
    return path


def _series(run: Path, reference: Path, out: Path) -> int:
    from sendvae.cli import main

    return main([
        "evaluate", "--checkpoints", str(run), "--ref", str(reference), "--out-dir", str(out), "--num-samples", "12",
        "--sampler", "euler", "--steps", "4", "--seed", "2", "--labels", "balanced", "--no-kid", "--grid", "3x2",
        "--device", "cpu", "--batch-size", "6",
    ])


def test_every_checkpoint_is_sampled_with_the_same_seeds_and_evaluated(run, reference, tmp_path, monkeypatch):
    import sendvae.eval.inception as inception_module
    from sendvae.generator import sample_from_run
    from sendvae.sampling import SamplingConfig

    monkeypatch.setattr(inception_module, "InceptionFeatures", FakeInception)
    out = tmp_path / "series"
    assert _series(run, reference, out) == 0
    names = [f"ckpt-{n:012d}" for n in (32, 64, 96)]
    with open(out / "series.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["checkpoint"] for r in rows] == names and [int(r["images_seen"]) for r in rows] == [32, 64, 96]
    series = json.loads((out / "series.json").read_text())
    assert series["sampling"]["sampler"] == "euler" and [r["images_seen"] for r in series["rows"]] == [32, 64, 96]
    samples = [np.load(out / f"{name}.npz") for name in names]
    assert all(np.array_equal(s["arr_1"], samples[0]["arr_1"]) for s in samples)  # the same labels everywhere
    assert not np.array_equal(samples[0]["arr_0"], samples[-1]["arr_0"])  # from different weights
    for name, row in zip(names, series["rows"]):
        metrics = json.loads((out / f"{name}.metrics.json").read_text())
        assert row["fid"] == metrics["fid"] and float(rows[names.index(name)]["fid"]) == pytest.approx(metrics["fid"])
        assert row["fd_effnet-lite0"] == metrics["frechet"]["effnet-lite0"] > 0
        sampling = metrics["protocol"]["sampling"]
        assert sampling["sampler"] == "euler" and sampling["nfe_per_sample"] == 4 and sampling["seed"] == 2
        assert metrics["protocol"]["label_sampling"] == "balanced" and metrics["num_samples"] == 12
        assert sampling["model"]["images_seen"] == int(name.removeprefix("ckpt-"))
        assert (out / f"{name}.png").is_file()
    # the last checkpoint's EMA weights are the ones the run published at its end
    config = SamplingConfig(sampler="euler", steps=4, seed=2)
    published = sample_from_run(run, tmp_path / "published.npz", config, 12, batch_size=6, grid=None, device="cpu")
    assert np.array_equal(np.load(published)["arr_0"], samples[-1]["arr_0"])
    # a rerun reuses the samples it finds (and refuses samples drawn otherwise)
    stamp = (out / f"{names[0]}.npz").stat().st_mtime_ns
    assert _series(run, reference, out) == 0
    assert (out / f"{names[0]}.npz").stat().st_mtime_ns == stamp
    np.savez(out / f"{names[1]}.npz", arr_0=samples[1]["arr_0"])
    assert _series(run, reference, out) == 2


def test_autoguidance_by_an_earlier_checkpoint_of_the_run(run):
    from sendvae.generator import load_generator
    from sendvae.sampling import SamplingConfig, generate_latents

    first = run / "checkpoints" / f"ckpt-{32:012d}"
    generator = load_generator(run, guide_model=first)
    assert generator.source["guide_model"] == {"path": str(first), "images_seen": 32}
    config = SamplingConfig(sampler="euler", steps=3, cfg_scale=2.0, guidance="autoguidance", guide_model=str(first))
    labels = torch.tensor([0, 1, 2])
    guided = generate_latents(generator.model, range(3), labels, generator.latent_shape, config, generator.num_classes,
                              guide_model=generator.guide_model)
    plain = generate_latents(generator.model, range(3), labels, generator.latent_shape,
                             SamplingConfig(sampler="euler", steps=3), generator.num_classes)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
