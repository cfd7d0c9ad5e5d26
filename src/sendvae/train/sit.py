"""Stage 2: SiT + REPA on the frozen (Send-)VAE's cached latents (SPEC.md section 4).

One step, per micro-batch of cached posteriors (:mod:`sendvae.data.latents`):

1. choose the image or, with probability ``data.flip_prob`` (0 in REPA / REPA-E, the default), its
   h-flip and draw ``z = mean + std * eps`` (already normalised with the VAE's latent statistics;
   ``data.posterior=mean`` takes ``z = mean``);
2. draw ``t`` (uniform | lognormal | logit-normal, optional shift; :func:`sendvae.transport.sample_time`)
   and ``noise``; ``z_t = (1 - t) z + t noise`` (t = 1 is noise);
3. drop labels to the null class with probability 0.1 (classifier-free guidance);
4. ``L = mean ||v_theta(z_t, t, y) - (noise - z)||^2 + lambda * L_REPA`` with
   ``L_REPA = -mean_n cos(h_phi(block_k(z_t))[n], y_teacher[n])`` (lambda 0.5), the teacher tokens of
   the same (possibly flipped) image, computed on the fly or read from the cache; with
   ``transport.cosine_weight`` > 0 plus LightningDiT's direction term ``w * mean(1 - cos(v_theta, noise - z))``
   (:func:`sendvae.transport.velocity_cosine_loss`).

Every random draw (flip, posterior noise, t, noise, label dropout) is made for the whole global batch
from a generator seeded by ``(seed, images seen)``, and each process keeps its rows: a resumed run
repeats the uninterrupted one exactly, and the result does not depend on the number of processes or
on gradient accumulation. Recipe defaults: AdamW lr 1e-4, betas (0.9, 0.999), no weight decay,
gradient clip 1.0, EMA 0.9999 (REPA / REPA-E). Loss reductions: the velocity MSE is the mean over
batch, channels and positions; the REPA term is the mean over batch and tokens; the direction term
takes the cosine over channels and the mean over positions and batch.

The run publishes ``RUN/sit/``: ``config.json`` (model arguments, preset, classes, latent shape, VAE
path and fingerprint, teacher), ``ema.safetensors`` and ``model.safetensors``
(:func:`sendvae.models.sit_formats.save_sit_folder`; ``load_sit_run`` there reads it back for sampling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sendvae.config import ConfigError, to_dict
from sendvae.data.latents import CacheInfo, LatentDataset, check_fingerprint, open_cache, select_flip
from sendvae.models.sit import SiT, preset_args, repa_loss
from sendvae.models.sit_formats import save_sit_folder
from sendvae.train.data_order import seed_for
from sendvae.train.loop import train
from sendvae.train.stage import Phase, StepContext
from sendvae.train.sit_config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RepaConfig,
    TeacherConfig,
    TrainSiTConfig,
    TransportConfig,
)
from sendvae.transport import interpolate, sample_time, velocity_cosine_loss, velocity_target

log = logging.getLogger(__name__)

_DRAW_STREAM = 7  # keeps the stage's draws apart from the loop's own seeds
_INIT_STREAM = 8  # seed of the initial weights


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, with PyTorch's fused kernel (3x faster on CPU than the default)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, eps=cfg.eps, fused=True,
    )


class SiTStage:
    """The stage-2 plug-in of the shared loop: one phase ``sit`` training the SiT (and its projector)."""

    def __init__(self, cfg: TrainSiTConfig, model: SiT, teacher: nn.Module | None = None,
                 run_info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.teacher = teacher
        self.repa = cfg.repa.weight > 0
        self.run_info = run_info or {}
        if self.repa and cfg.repa.source == "online" and teacher is None:
            raise ConfigError("repa.source: online REPA needs a teacher (teacher.name)")
        self.optimizer = build_optimizer(model, cfg.optim)

    def modules(self) -> dict[str, nn.Module]:
        return {"sit": self.model}

    def ema_modules(self) -> list[str]:
        return ["sit"]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None and self.cfg.repa.source == "online" else {}

    def phases(self) -> list[Phase]:
        return [Phase("sit", self.optimizer, ("sit",), self.loss)]

    def draws(self, batch_rows: int, latent_shape: tuple[int, ...], ctx: StepContext) -> dict[str, torch.Tensor]:
        """This micro-batch's rows of the step's random draws (flip, posterior eps, t, noise, label drop).

        The draws are made for the whole global batch from a generator seeded by ``(seed, images
        seen)`` and each process keeps the rows of the stream positions it holds (the loop's sampler
        gives rank r positions ``r, r + W, r + 2W, ...``), so a step does not depend on the number of
        processes or on gradient accumulation.
        """
        total, device = self.cfg.train.batch_size, ctx.device
        g = torch.Generator(device=device)
        g.manual_seed(seed_for(self.cfg.train.seed, 0, ctx.images_seen, _DRAW_STREAM))
        tr = self.cfg.transport
        every = {
            "flip": (torch.rand(total, generator=g, device=device) < self.cfg.data.flip_prob).long(),
            "eps": torch.randn((total, *latent_shape), generator=g, device=device),
            "t": sample_time(total, tr.time_sampling, generator=g, device=device, mean=tr.time_mean,
                             std=tr.time_std, shift=tr.time_shift),
            "noise": torch.randn((total, *latent_shape), generator=g, device=device),
            "drop": torch.rand(total, generator=g, device=device) < self.cfg.model.label_dropout,
        }
        rows = ctx.rank + ctx.world * (ctx.micro_index * batch_rows + torch.arange(batch_rows, device=device))
        return {key: value[rows] for key, value in every.items()}

    @torch.no_grad()
    def prepare_batch(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Posterior sample of the drawn flip (normalised), the time, noise and label, and the teacher tokens."""
        mean, std = batch["mean"], batch["std"]
        d = self.draws(mean.shape[0], tuple(mean.shape[2:]), ctx)
        m, s = select_flip(mean, std, d["flip"])
        label = torch.where(d["drop"], torch.full_like(batch["label"], self.model.null_class), batch["label"])
        latent = m if self.cfg.data.posterior == "mean" else m + s * d["eps"]
        out = {"latent": latent, "label": label, "t": d["t"], "noise": d["noise"]}
        if self.repa:
            if self.cfg.repa.source == "cache":
                rows = torch.arange(d["flip"].shape[0], device=d["flip"].device)
                out["teacher"] = batch["teacher"][rows, d["flip"]].float()
            else:
                images = batch["image"]
                images = torch.where(d["flip"].view(-1, 1, 1, 1).bool(), images.flip(-1), images)
                with ctx.autocast():
                    out["teacher"] = ctx.module("teacher")(images).float()
        return out

    def loss(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """Velocity MSE (mean over all elements) [+ w * direction term] + lambda * REPA loss, in float32."""
        z, t, noise = batch["latent"], batch["t"], batch["noise"]
        with ctx.autocast():
            out = ctx.module("sit")(interpolate(z, noise, t), t, batch["label"], return_tokens=self.repa)
        velocity, tokens = out if self.repa else (out, None)
        target = velocity_target(z, noise)
        denoise = (velocity.float() - target).square().mean()
        logs: dict[str, Any] = {"denoise": denoise.detach()}
        loss = denoise
        if self.cfg.transport.cosine_weight > 0:
            cosine = velocity_cosine_loss(velocity, target)
            loss = loss + self.cfg.transport.cosine_weight * cosine
            logs["cosine"] = cosine.detach()
        if self.repa:
            align = repa_loss(tokens, [batch["teacher"]])
            loss = loss + self.cfg.repa.weight * align
            logs["repa"] = align.detach()
        return loss, logs

    def export(self, run_dir: str | Path, modules: dict[str, nn.Module]) -> None:
        """Write ``RUN/sit/``: config.json, ema.safetensors (published weights) and model.safetensors."""
        published = modules["sit"]
        save_sit_folder(Path(run_dir) / "sit", published, self.model, self.run_info)


# --------------------------------------------------------------------------------------------------
# Building a run from its config
# --------------------------------------------------------------------------------------------------


def _teacher_for(cfg: TrainSiTConfig, cache: CacheInfo, grid: int
                 ) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The online teacher (or None) and a description of the REPA targets (None without REPA)."""
    if cfg.repa.weight <= 0:
        return None, None
    if cfg.repa.source == "cache":
        if not cache.teacher:
            raise ConfigError(
                f"repa.source: cache {cache.path} holds no teacher tokens; run cache-latents with --teacher, "
                "or set repa.source=online (with teacher.name), or repa.weight=0"
            )
        if cfg.teacher.name and cfg.teacher.name != cache.teacher["name"]:
            raise ConfigError(
                f"teacher.name: {cfg.teacher.name!r} but cache {cache.path} holds {cache.teacher['name']!r} tokens")
        if int(cache.teacher["grid"]) != grid:
            raise ConfigError(
                f"model.preset: the SiT has a {grid}x{grid} token grid but cache {cache.path} holds "
                f"{cache.teacher['grid']}x{cache.teacher['grid']} teacher tokens (cache-latents --teacher-grid)"
            )
        wanted = "bicubic-antialias" if cfg.teacher.antialias else "bicubic"
        cached = cache.teacher.get("resize", "bicubic-antialias")  # older caches do not say: they antialiased
        if cached != wanted:
            raise ConfigError(
                f"teacher.antialias={cfg.teacher.antialias}: the images are resized {wanted} but cache {cache.path} "
                f"holds tokens of {cached}-resized images; set teacher.antialias={not cfg.teacher.antialias} or "
                "re-run cache-latents (--teacher-antialias for the antialiased resize)"
            )
        return None, {**cache.teacher, "resize": cached, "source": "cache"}
    from sendvae.models.teachers import build_teacher

    name = cfg.teacher.name or (cache.teacher or {}).get("name", "")
    if not name:
        raise ConfigError("teacher.name: online REPA needs a teacher name (e.g. dinov2-b, effnet-lite0)")
    weights = cfg.teacher.weights or None
    teacher = build_teacher(name, weights, grid=grid, antialias=cfg.teacher.antialias)
    return teacher, {"name": name, "weights": weights, "dim": int(teacher.dim), "grid": grid,
                     "resize": teacher.resize, "source": "online"}


def build_sit_stage(cfg: TrainSiTConfig) -> tuple[SiTStage, LatentDataset]:
    """The stage and its dataset from a config (checks the cache against the VAE)."""
    from sendvae.models.vae import vae_fingerprint
    from sendvae.models.vae_formats import load_vae

    if not cfg.data.cache:
        raise ConfigError("data.cache: the latent cache folder is required (written by `sendvae cache-latents`)")
    cache = open_cache(cfg.data.cache)
    vae_path = cfg.data.vae or cache.vae_path
    if not Path(vae_path).exists():
        raise ConfigError(f"data.vae: {vae_path} does not exist (the VAE the cache {cache.path} was made with)")
    vae = load_vae(vae_path)
    check_fingerprint(cache, vae_fingerprint(vae, include_stats=False), str(vae_path))
    fingerprint = vae_fingerprint(vae)  # with the statistics the SiT's latents were normalised by
    c, h, w = cache.latent_shape
    if h != w:
        raise ConfigError(f"data.cache: latents are {h}x{w}; the SiT needs square latents")
    options = {name: value for name in ("pos", "mlp", "norm") if (value := getattr(cfg.model, name)) != "preset"}
    args = preset_args(cfg.model.preset, input_size=h, in_channels=c, num_classes=cache.num_classes,
                       qk_norm=cfg.model.qk_norm, projector_dim=cfg.model.projector_dim, **options)
    if cfg.model.encoder_depth:
        args.encoder_depth = cfg.model.encoder_depth
    if h % args.patch_size:
        raise ConfigError(f"model.preset: patch {args.patch_size} does not divide the {h}x{w} latent")
    grid = h // args.patch_size
    teacher, teacher_info = _teacher_for(cfg, cache, grid)
    args.teacher_dims = [int(teacher_info["dim"])] if teacher_info else []
    if args.teacher_dims and not 1 <= args.encoder_depth <= args.depth:
        raise ConfigError(f"model.encoder_depth: {args.encoder_depth} must lie in [1, {args.depth}]")
    if cache.num_classes < 1:
        raise ConfigError(f"data.cache: {cache.path} records no classes (num_classes 0)")
    online = cfg.repa.weight > 0 and cfg.repa.source == "online"
    dataset = LatentDataset(
        cache, vae,
        images=(cfg.data.images or cache.manifest["data"]["spec"]) if online else None,
        teacher=cfg.repa.weight > 0 and cfg.repa.source == "cache",
        resolution=int(cache.manifest["data"]["resolution"]) or None,
    )
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
        torch.manual_seed(seed_for(cfg.train.seed, 0, 0, _INIT_STREAM))
        model = SiT(args)
    info = {
        "preset": cfg.model.preset,
        "num_classes": cache.num_classes,
        "latent_shape": [c, h, w],
        "vae": {"path": str(vae_path), "fingerprint": fingerprint},
        "teacher": teacher_info,
        "cache": {"path": str(cache.path), "data_hash": cache.manifest["data"]["hash"]},
        "config": to_dict(cfg),
    }
    log.info("SiT %s: %.1fM parameters, %d tokens, REPA %s", cfg.model.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, grid * grid,
             f"lambda {cfg.repa.weight} after block {args.encoder_depth}" if args.teacher_dims else "off")
    return SiTStage(cfg, model, teacher, info), dataset


def train_sit(cfg: TrainSiTConfig, out: str | Path) -> dict[str, Any]:
    """Train a SiT (+ REPA) on a latent cache into run directory ``out``; returns the loop's summary."""
    stage, dataset = build_sit_stage(cfg)
    return train(stage, dataset, cfg.train, out, run_config=cfg)


__all__ = [
    "DataConfig", "ModelConfig", "OptimConfig", "RepaConfig", "SiTStage", "TeacherConfig",
    "TrainSiTConfig", "TransportConfig", "build_optimizer", "build_sit_stage", "train_sit",
]
