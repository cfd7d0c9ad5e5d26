"""The demo's generation study: SiTs on each VAE's latents of the ``shapes-gen`` data, measured along training.

The steps, for every VAE in ``sit_variants`` (fine-tune seed 0):

- ``latents-<vae>/``: the latent cache of the generation train images (:func:`sendvae.data.latents.cache_latents`)
  and the VAE's **reconstruction ceiling**: the generation classifier's class accuracy and FD on the VAE's own
  reconstructions of the first ``num_samples`` generation test images (as many as the samples of one setting,
  since FD depends on the count; :func:`sendvae.eval.shapes_classifier.reconstruction_ceiling`);
- ``sit-<vae>[-s<k>]/``: a SiT (``sit_preset``, preset ``configs/shapes/sit_tiny.yaml``) trained with SiT seed
  ``k`` (``sit_seeds`` of them); ``sit-<vae>-lightning/``: the generator-recipe row, the LightningDiT-style SiT
  (``recipe_preset``, preset ``sit_lightning.yaml``) on the same latents, for the VAEs in ``recipe_variants``.

A SiT run keeps ``sit_points`` checkpoints evenly spaced over its training; each is sampled (EMA weights,
the same labels and initial noise at every point: :func:`sendvae.generator.sample_from_run`) without and
with classifier-free guidance, and the samples are measured in the generation classifier's space (class
consistency and FD to the real test images, :func:`sendvae.eval.shapes_classifier.sample_metrics`). The
points form the convergence curves (the paper's claim: an aligned VAE makes the generator learn faster);
:func:`convergence` averages them over SiT seeds with their spread, :func:`budget_rows` reads the
last point as the fixed-budget table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sendvae.config import load_config
from sendvae.demo.config import DemoConfig
from sendvae.demo.evaluation import load_classifier, real_stats
from sendvae.demo.vaes import check_finished, preset_path

log = logging.getLogger(__name__)

GUIDANCE = ("plain", "cfg")  # sample tags: no guidance, classifier-free guidance at cfg_scale
RECIPE_PRESETS = {"sit": "sit_tiny", "lightning": "sit_lightning"}  # recipe -> its stage preset


@dataclass(frozen=True)
class SiTRun:
    """One SiT of the study: its step folder, the VAE (fine-tune run name without ``vae-``), recipe and seed."""

    name: str
    vae: str
    recipe: str  # "sit" (the REPA SiT) | "lightning" (LightningDiT-style blocks and loss)
    seed: int


def sit_runs(cfg: DemoConfig) -> list[SiTRun]:
    """Every SiT of the study: each ``sit_variants`` VAE x ``sit_seeds`` seeds, then the recipe rows."""
    runs = [SiTRun(f"sit-{vae}" + (f"-s{k}" if k else ""), vae, "sit", k)
            for k in range(cfg.sit_seeds) for vae in cfg.sit_variants]
    runs += [SiTRun(f"sit-{vae}-lightning", vae, "lightning", 0) for vae in cfg.recipe_variants]
    return runs


def sit_preset(cfg: DemoConfig, recipe: str) -> str:
    """The SiT size/patch preset of a recipe."""
    return cfg.sit_preset if recipe == "sit" else cfg.recipe_preset


def encode_generation_data(cfg: DemoConfig, out: Path, vae: str, folder: Path) -> dict[str, Any]:
    """Step ``latents-<vae>``: cache the generation train latents; measure the VAE's reconstruction ceiling."""
    from sendvae.data.latents import cache_latents
    from sendvae.data.store import ImageStore
    from sendvae.eval.reconstruction import vae_reconstructor
    from sendvae.eval.shapes_classifier import reconstruction_ceiling
    from sendvae.models.vae_formats import load_vae

    data = _data(out)
    vae_path = out / f"vae-{vae}" / "vae"
    cache_latents(vae_path, data["gen_train"], folder / "latents", batch_size=250, precision=cfg.precision,
                  device="cpu", num_workers=0)
    test = ImageStore(data["gen_test"])
    n = min(cfg.num_samples, len(test))  # as many images as samples per setting: FD depends on the count
    ceiling = reconstruction_ceiling(
        load_classifier(out / "gen-classifier"), vae_reconstructor(load_vae(vae_path).eval()),
        test.images(0, n), torch.from_numpy(test.labels[:n]), real_stats(out / "gen-classifier"))
    log.info("%s: reconstruction ceiling class accuracy %.3f, FD %.2f", vae, ceiling["class_consistency"], ceiling["fd"])
    return {"cache": str(folder / "latents"), "vae": str(vae_path), "ceiling": ceiling}


def _data(out: Path) -> dict[str, Any]:
    from sendvae.demo.plan import read_done

    return read_done(out / "data") or {}


def train_generator(cfg: DemoConfig, out: Path, run: SiTRun, folder: Path) -> dict[str, Any]:
    """Step ``sit-...``: train the SiT with ``sit_points`` checkpoints, then sample and measure each checkpoint."""
    from sendvae.train.sit import TrainSiTConfig, train_sit

    total = cfg.sit_steps * cfg.sit_batch_size
    every = math.ceil(cfg.sit_steps / cfg.sit_points) * cfg.sit_batch_size  # sit_points checkpoints, the last at the end
    overrides = [
        f"data.cache={out / f'latents-{run.vae}' / 'latents'}", f"data.posterior={cfg.sit_posterior}",
        f"model.preset={sit_preset(cfg, run.recipe)}", f"model.projector_dim={cfg.sit_projector_dim}",
        f"repa.weight={cfg.repa_weight}", "repa.source=online", f"teacher.name={cfg.teacher}",
        f"optim.lr={cfg.sit_lr}", f"train.total_images={total}", f"train.batch_size={cfg.sit_batch_size}",
        f"train.seed={cfg.seed * 100 + run.seed}", f"train.precision={cfg.precision}", "train.num_workers=0",
        "train.device=cpu", f"train.log_every={cfg.log_every_steps * cfg.sit_batch_size}",
        f"train.checkpoint_every={every}", f"train.keep_last={cfg.sit_points + 1}",
    ]
    summary = train_sit(load_config(TrainSiTConfig, preset_path(cfg, RECIPE_PRESETS[run.recipe]), overrides),
                        folder / "sit")
    check_finished(summary, folder / "sit")
    curve = evaluate_checkpoints(cfg, out, run, folder)
    return {"run": run.name, "vae": run.vae, "recipe": run.recipe, "seed": run.seed,
            "preset": sit_preset(cfg, run.recipe), "sit_seconds": summary["seconds"],
            "sit_final_loss": summary["logs"].get("sit/denoise"), "curve": curve, "final": curve[-1]}


def evaluate_checkpoints(cfg: DemoConfig, out: Path, run: SiTRun, folder: Path) -> list[dict[str, Any]]:
    """Sample every checkpoint of the run without and with guidance; one point per checkpoint (oldest first)."""
    from sendvae.eval.shapes_classifier import sample_metrics
    from sendvae.generator import sample_from_run
    from sendvae.sampling import SamplingConfig
    from sendvae.train.checkpoint import list_checkpoints, load_checkpoint

    classifier, real = load_classifier(out / "gen-classifier"), real_stats(out / "gen-classifier")
    vae_path = out / f"vae-{run.vae}" / "vae"
    checkpoints = list_checkpoints(folder / "sit" / "checkpoints")
    curve = []
    for checkpoint in checkpoints:
        images_seen = load_checkpoint(checkpoint, verify=False).images_seen
        point: dict[str, Any] = {"checkpoint": checkpoint.name, "images_seen": images_seen,
                                 "step": images_seen // cfg.sit_batch_size}
        for tag in GUIDANCE:
            sampling = SamplingConfig(sampler=cfg.sampler, steps=cfg.sample_steps, labels="balanced", seed=cfg.seed,
                                      cfg_scale=cfg.cfg_scale if tag == "cfg" else 1.0)
            npz = folder / "samples" / f"{checkpoint.name}_{tag}.npz"
            npz.parent.mkdir(exist_ok=True)
            if not npz.is_file():
                last = checkpoint == checkpoints[-1]
                sample_from_run(checkpoint, npz, sampling, cfg.num_samples, vae=vae_path, batch_size=250,
                                grid=(8, 6) if last else None, device="cpu", chunk_size=cfg.num_samples)
            with np.load(npz) as f:
                images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
                labels = torch.from_numpy(f["arr_1"])
            point[tag] = {"cfg_scale": sampling.cfg_scale, **sample_metrics(classifier, images, labels, real)}
        log.info("%s at %d images: class consistency %.3f / %.3f (CFG), FD %.1f / %.1f", run.name, images_seen,
                 point["plain"]["class_consistency"], point["cfg"]["class_consistency"], point["plain"]["fd"],
                 point["cfg"]["fd"])
        curve.append(point)
    return curve


METRICS = tuple(f"{metric}_{tag}" for tag in GUIDANCE for metric in ("class_consistency", "fd"))


def _point_metric(point: dict[str, Any], key: str) -> float:
    metric, tag = key.rsplit("_", 1)
    return float(point[tag][metric])


def convergence(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Curves per (VAE, recipe), averaged over SiT seeds: ``{"<vae>" or "<vae>-lightning": {"images_seen": [...],
    "seeds": n, "<metric>": {"mean": [...], "low": [...], "high": [...]}}}`` for the metrics of :data:`METRICS`;
    low/high are the seeds' minimum and maximum (equal to the mean with one seed). Runs of a group must share
    their checkpoint positions."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        key = result["vae"] if result["recipe"] == "sit" else f"{result['vae']}-{result['recipe']}"
        groups.setdefault(key, []).append(result)
    curves = {}
    for key, runs in groups.items():
        positions = [[p["images_seen"] for p in r["curve"]] for r in runs]
        if any(p != positions[0] for p in positions):
            raise ValueError(f"{key}: the SiT seeds were checkpointed at different points {positions}")
        curve: dict[str, Any] = {"images_seen": positions[0], "seeds": len(runs)}
        for metric in METRICS:
            values = np.array([[_point_metric(p, metric) for p in r["curve"]] for r in runs])
            curve[metric] = {"mean": values.mean(0).tolist(), "low": values.min(0).tolist(),
                             "high": values.max(0).tolist()}
        curves[key] = curve
    return curves


def budget_rows(curves: dict[str, dict[str, Any]], ceilings: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The fixed-budget table: each curve's last point (mean and half the seed spread) beside the VAE's ceiling."""
    rows = []
    for key, curve in curves.items():
        vae = key.split("-lightning")[0]
        row: dict[str, Any] = {"generator": key, "seeds": curve["seeds"], "images_seen": curve["images_seen"][-1]}
        for metric in METRICS:
            row[metric] = curve[metric]["mean"][-1]
            row[f"{metric}_spread"] = (curve[metric]["high"][-1] - curve[metric]["low"][-1]) / 2
        row["ceiling_class_accuracy"] = ceilings[vae]["class_consistency"]
        row["ceiling_fd"] = ceilings[vae]["fd"]
        rows.append(row)
    return rows
