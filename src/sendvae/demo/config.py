"""The demo's settings and its three scales (smoke, default, full), importable without torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sendvae.config import from_dict, param, parse_overrides, to_dict
from sendvae.errors import UserError

SCALES = ("smoke", "default", "full")
ALIGNED = ("vf", "sendvae", "sendvae-nonoise")
VARIANT_PRESETS = {  # variant -> its stage-1 preset in configs/shapes
    "none": "none",
    "vf": "vf",
    "sendvae": "sendvae",
    "sendvae-nonoise": "sendvae_nonoise",
}


@dataclass
class DemoConfig:
    """Everything that fixes the demo's results (written to ``OUT/demo_config.yaml``)."""

    scale: str = param("default", "the preset these values started from", choices=SCALES)
    seed: int = param(0, "seed of the data, initialisations, batch order, probes and samples", min=0)
    resolution: int = param(32, "image side: 32 (f4 VAE) or 64 (f8 VAE); the latent grid is 8x8 in both", choices=(32, 64))
    n_train: int = param(12_000, "rendered training images (VAEs, probe-train, classifier, SiT)", min=64)
    n_test: int = param(3_000, "held-out test images, drawn with another seed (probe-test, metrics)", min=32)
    vae_preset: str = param("", "VAE architecture; empty = tiny-f4c4 at 32 px, tiny-f8c4 at 64 px")
    presets: str = param("", "folder of the stage presets (base.yaml, none.yaml, vf.yaml, sendvae.yaml, "
                             "sit_tiny.yaml); empty = configs/shapes of this checkout")
    teacher: str = param("effnet-lite0", "frozen teacher (sendvae.models.teachers); its grid is set to the latent grid")
    precision: str = param("auto", "training/evaluation precision: auto = bf16 autocast where this CPU computes bf16 "
                                   "natively (AVX512-BF16/AMX), else fp32", choices=("auto", "fp32", "bf16"))
    threads: int = param(0, "torch threads; 0 = the run's policy (torch's default on idle cores, fewer threads with a "
                             "passive OpenMP wait when other processes are busy: sendvae.threads)", min=0)
    batch_size: int = param(16, "VAE batch size (base and fine-tunes); the pilot used 64: 16 keeps the pilot's step counts "
                                "inside the 15-minute fp32 budget (README, 'Performance')", min=2)
    base_steps: int = param(350, "base VAE optimiser steps", min=1)
    base_lr: float = param(1e-3, "base VAE AdamW learning rate (docs/demo_full.md: 1e-3 with a nearly deterministic "
                                 "initial posterior draws shapes 2x sooner than 5e-4)", min=0.0)
    finetune_steps: int = param(200, "optimiser steps of every fine-tune (the same budget for each variant)", min=1)
    finetune_lr: float = param(2e-4, "fine-tune AdamW learning rate", min=0.0)
    align_weight: float = param(1.0, "lambda_align of the aligned variants", min=0.0)
    variants: list[str] = param(["none", "vf", "sendvae"], "fine-tune variants (none, vf, sendvae, sendvae-nonoise)")
    finetune_seeds: int = param(1, "fine-tune seeds per variant (all from the one base VAE)", min=1)
    stats_images: int = param(1000, "images used for the latent statistics at each VAE export", min=16)
    log_every_steps: int = param(10, "steps between metrics.jsonl rows (the loss curves)", min=1)
    checkpoint_every_steps: int = param(200, "steps between checkpoints (resume points)", min=1)
    probe_train: int = param(4000, "probe-train images (the first of the train set; 0 = all)", min=0)
    probe_references: list[str] = param(["pixels", "random-vae"], "reference rows: pixels, random-vae, teacher")
    reference_pca_dim: int = param(256, "PCA the reference rows to this many dims (0 = never)", min=0)
    probe_max_iter: int = param(150, "L-BFGS iterations per L2 value of each probe", min=1)
    classifier_steps: int = param(200, "training steps of the evaluation classifier", min=1)
    classifier_batch: int = param(32, "batch size of the evaluation classifier", min=2)
    generation: bool = param(True, "run stage 2 (generation data, latent caches, SiTs, sampling along training, metrics)")
    generation_smoke: bool = param(False, "label the generation results as a smoke run (too short to judge)")
    gen_data: str = param("shapes-gen", "shapes variant of the generation study (sendvae.data.shapes.VARIANTS): its "
                                        "images train the SiTs and the generation classifier", choices=("shapes", "shapes-gen"))
    gen_test: int = param(1000, "held-out generation test images (classifier accuracy, FD reference, ceiling)", min=32)
    gen_classifier_steps: int = param(150, "training steps of the generation classifier", min=1)
    sit_variants: list[str] = param(["sendvae"], "VAEs (fine-tune seed 0) that get a SiT")
    sit_seeds: int = param(1, "SiT seeds per VAE (the curves show their spread)", min=1)
    sit_preset: str = param("SiT-T/2", "SiT size/patch (patch 2 on the 8x8 latent: 16 tokens)")
    recipe_variants: list[str] = param([], "VAEs that also get the LightningDiT-style SiT (the generator-recipe row)")
    recipe_preset: str = param("LightningDiT-T/2", "size/patch of the generator-recipe SiT (preset sit_lightning.yaml)")
    sit_projector_dim: int = param(512, "hidden width of the SiT's REPA projector (2048 would dominate a tiny SiT)", min=1)
    sit_posterior: str = param("mean", "latents the SiT learns: mean = posterior means, sample = posterior samples",
                               choices=("mean", "sample"))
    sit_steps: int = param(800, "SiT optimiser steps (docs/demo_full.md: the recipe's measurements)", min=1)
    sit_points: int = param(3, "checkpoints along SiT training that are sampled and measured (the curves)", min=1)
    sit_images: int = param(2000, "generation training images (their latents train the SiT; the variant has 3,072 "
                                  "factor combinations)", min=16)
    sit_batch_size: int = param(32, "SiT batch size (32 learns the classes faster than 128 for the same CPU time)", min=2)
    sit_lr: float = param(1e-3, "SiT AdamW learning rate (constant)", min=0.0)
    repa_weight: float = param(0.0, "lambda of the REPA loss (teacher tokens on the SiT token grid); 0 = off", min=0.0)
    num_samples: int = param(120, "class-balanced samples per checkpoint and guidance setting", min=12)
    recon_images: int = param(1000, "test images for PSNR / SSIM / LPIPS (the first of the test set; 0 = all)", min=0)
    fd_images: int = param(0, "reconstructed test images in FD(recon, real); 0 = num_samples (as many as FD(gen))", min=0)
    sampler: str = param("euler", "euler | heun (ODE) | sde", choices=("euler", "heun", "sde"))
    sample_steps: int = param(16, "sampler steps", min=2)
    cfg_scale: float = param(3.0, "classifier-free guidance scale of the guided samples (the others use 1)", min=1.0)

    def check(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANT_PRESETS]
        if unknown or not self.variants:
            raise UserError(f"variants: {unknown or self.variants} not among {list(VARIANT_PRESETS)}")
        for key in ("sit_variants", "recipe_variants"):
            missing = [v for v in getattr(self, key) if v not in self.variants]
            if missing:
                raise UserError(f"{key}: {missing} are not fine-tuned (variants: {self.variants})")
        bad = [r for r in self.probe_references if r not in ("pixels", "random-vae", "teacher")]
        if bad:
            raise UserError(f"probe_references: {bad} not among ['pixels', 'random-vae', 'teacher']")
        if self.num_samples < 2 * 6:
            raise UserError(f"num_samples: {self.num_samples} is too few for 6 classes (need >= 12)")


def demo_config(scale: str = "default", seed: int = 0, resolution: int = 32, overrides: Sequence[str] = ()) -> DemoConfig:
    """The settings of ``scale`` (smoke | default | full), then ``key=value`` overrides."""
    if scale not in SCALES:
        raise UserError(f"demo scale {scale!r} is not one of {list(SCALES)}")
    values: dict[str, Any] = {"scale": scale, "seed": seed, "resolution": resolution}
    if scale == "smoke":  # the smallest end-to-end run (CI): every step, a few dozen steps each
        values.update(
            n_train=600, n_test=200, batch_size=16, base_steps=24, finetune_steps=8, stats_images=64,
            log_every_steps=4, checkpoint_every_steps=1000, probe_train=0, probe_max_iter=20,
            classifier_steps=12, classifier_batch=32, sit_steps=8, sit_batch_size=32, sit_images=256, num_samples=24,
            sample_steps=4, generation_smoke=True, gen_test=64, gen_classifier_steps=12, sit_points=2,
            sit_variants=["none", "sendvae"], recipe_variants=["none"],
        )
    elif scale == "full":  # the generation study in full: 66.6 minutes measured in fp32 on 2 idle cores (docs/demo_full.md)
        values.update(
            n_train=20_000, n_test=3_000, base_steps=2000, finetune_steps=400, probe_train=6_000, recon_images=2_000,
            variants=["none", "vf", "sendvae", "sendvae-nonoise"], probe_references=["pixels", "random-vae", "teacher"],
            classifier_steps=300, classifier_batch=64, sit_variants=["none", "vf", "sendvae"], sit_steps=2400,
            sit_seeds=2, sit_points=5, recipe_variants=["none"], sit_images=4000, num_samples=300, cfg_scale=4.0,
            generation_smoke=False,
            checkpoint_every_steps=500,
        )
    data = to_dict(DemoConfig())
    data.update(values)
    data.update(parse_overrides(overrides))  # DemoConfig is flat: key=value replaces a top-level key
    return from_dict(DemoConfig, data)
