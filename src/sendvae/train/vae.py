"""Stage 1: Send-VAE fine-tuning (SPEC.md section 2) as a stage of the shared loop.

Per micro-batch of images x (uint8 -> [-1, 1], DESIGN.md section 2):

1. ``posterior = vae.encode(x)``; ``z = posterior.sample()`` (REPA-E) or its mean (``model.sample_posterior``);
2. ``z_n = vae.normalize(z)`` with the VAE's fixed per-channel latent statistics (``alignment.normalize_latent``);
3. alignment of ``z_n`` with the frozen teacher's tokens ``y = f(x)`` (:mod:`sendvae.losses`):
   ``none``; ``vf`` (VA-VAE: linear 1x1 projection, margins 0.5 / 0.25, adaptive weight at the encoder's
   last layer); ``sendvae`` (noise injection Eq. 1 -> mapper h_phi -> ``1 - mean cos``, Eq. 2);
4. ``L = lambda_align * L_align + L_VAE`` with (reductions next to the weights)::

       L_VAE = w_rec * L1-or-MSE(x, x_hat)          mean over pixels
             + w_lpips * LPIPS(x, x_hat)            mean over batch
             + w_kl * KL(q(z|x) || N(0, I))          sum over the latent, mean over batch
             + w_gan * (-mean D(x_hat))              fixed weight (REPA-E) or x LDM adaptive weight

The loop runs two phases per step: ``vae`` (VAE + alignment head, AdamW) and, once ``loss.gan_start``
images have been seen, ``disc`` (hinge loss on real x and the detached reconstruction of the same
micro-batch, its own AdamW). The VAE is published as ``RUN/vae`` (EMA weights when EMA is on, with
freshly computed latent statistics) by :func:`sendvae.models.vae_formats.save_vae`; the mapper and the
discriminator stay in the training checkpoints only.
"""

from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sendvae.config import ConfigError
from sendvae.data.store import open_image_dataset
from sendvae.data.token_cache import TokenCache, dataset_identity
from sendvae.losses import (
    Alignment,
    PerceptualLoss,
    adaptive_weight,
    build_alignment,
    generator_loss,
    hinge_discriminator_loss,
    kl_loss,
    reconstruction_loss,
)
from sendvae.models.discriminator import PatchDiscriminator, load_discriminator
from sendvae.models.teachers import Teacher, build_teacher
from sendvae.models.latent_stats import compute_latent_stats
from sendvae.models.vae import VAE, VAE_PRESETS, build_vae
from sendvae.models.vae_formats import load_latent_stats, load_vae, save_vae
from sendvae.hardware import resolve_precision
from sendvae.pixels import to_model
from sendvae import distributed as dist_utils
from sendvae.train.loop import train
from sendvae.train.stage import Phase, StepContext
from sendvae.train.vae_config import (
    AlignmentConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainVAEConfig,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The stage


class VAEStage:
    """The stage-1 plug-in of the shared loop: phases ``vae`` and (with a GAN) ``disc``."""

    def __init__(self, cfg: TrainVAEConfig, vae: VAE, alignment: Alignment, teacher: Teacher | None = None,
                 discriminator: nn.Module | None = None, perceptual: nn.Module | None = None,
                 stats_data: torch.utils.data.Dataset | None = None, token_cache: TokenCache | None = None) -> None:
        self.cfg, self.vae, self.alignment, self.teacher, self.token_cache = cfg, vae, alignment, teacher, token_cache
        self.alignment_trains = any(True for _ in alignment.parameters())  # none has no parameters
        self.discriminator, self.perceptual, self.stats_data = discriminator, perceptual, stats_data
        if alignment.needs_teacher and teacher is None:
            raise ConfigError(f"alignment.kind={alignment.kind} needs a teacher (teacher.name)")
        o = cfg.optim
        trained = list(vae.parameters()) + list(alignment.parameters())
        self.optimizer = torch.optim.AdamW(trained, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                           eps=o.eps)
        self.disc_optimizer = None
        if discriminator is not None:
            self.disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=o.disc_lr or o.lr,
                                                    betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)

    # -- what the loop asks for ----------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"vae": self.vae}
        if self.alignment_trains:
            modules["alignment"] = self.alignment  # the mapper (sendvae) or the 1x1 projection (vf)
        if self.discriminator is not None:
            modules["disc"] = self.discriminator
        return modules

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen: dict[str, nn.Module] = {}
        if self.teacher is not None:
            frozen["teacher"] = self.teacher
        if self.perceptual is not None:
            frozen["lpips"] = self.perceptual
        return frozen

    def ema_modules(self) -> list[str]:
        return ["vae"]

    def phases(self) -> list[Phase]:
        trains = tuple(name for name in self.modules() if name != "disc")
        phases = [Phase("vae", self.optimizer, trains, self.vae_loss)]
        if self.discriminator is not None:
            phases.append(Phase("disc", self.disc_optimizer, ("disc",), self.discriminator_loss,
                                start_images=self.cfg.loss.gan_start))
        return phases

    @torch.no_grad()
    def prepare_batch(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Model-space pixels and, when aligning, the teacher's tokens of the same uint8 images (read
        from ``teacher.cache`` where it has them)."""
        images = batch["image"]
        out = {"image": images, "x": to_model(images)}
        if self.teacher is not None and self.alignment.needs_teacher:
            teacher = ctx.module("teacher")

            def run_teacher(rows: torch.Tensor) -> torch.Tensor:
                with ctx.autocast():
                    return teacher(images[rows.to(images.device)]).float()

            if self.token_cache is not None:
                out["tokens"] = self.token_cache.fetch(batch["index"], run_teacher)
            else:
                out["tokens"] = run_teacher(torch.arange(images.shape[0]))
        return out

    # -- the two losses --------------------------------------------------------------------------
    def vae_loss(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """``lambda_align * L_align + L_VAE`` for one micro-batch (float32 scalar) and its parts."""
        c, x = self.cfg, batch["x"]
        vae: VAE = ctx.module("vae")
        posterior = vae.encode(x)
        z = posterior.sample(ctx.generator) if c.model.sample_posterior else posterior.mean
        recon = vae.decode(z)
        ctx.scratch["recon"] = recon.detach()

        rec = reconstruction_loss(x, recon, c.loss.reconstruction)
        nll = c.loss.reconstruction_weight * rec
        logs: dict[str, Any] = {"rec": rec.detach()}
        if self.perceptual is not None:
            lpips = ctx.module("lpips")(x, recon)
            nll = nll + c.loss.lpips_weight * lpips
            logs["lpips"] = lpips.detach()
        kl = kl_loss(posterior)
        loss = nll + c.loss.kl_weight * kl
        logs["kl"] = kl.detach()

        if self.alignment.kind != "none":
            aligned = vae.normalize(z) if c.alignment.normalize_latent else z
            align, align_logs = ctx.module("alignment")(aligned, batch["tokens"], generator=ctx.generator)
            weight: torch.Tensor | float = c.alignment.weight
            if self.alignment.kind == "vf" and c.alignment.vf_adaptive:
                # VA-VAE: ||grad nll|| / ||grad vf|| at the encoder's last layer, clamped to 1e8.
                weight = weight * adaptive_weight(nll, align, vae.encoder_last_layer(), clamp=1e8)
                logs["align_weight"] = weight.detach()
            loss = loss + weight * align
            logs.update(align_logs)

        if self.discriminator is not None and ctx.images_seen >= c.loss.gan_start:
            fake_logits = ctx.module("disc")(recon)  # the disc's own parameters get no gradient here
            gan = generator_loss(fake_logits)
            weight = c.loss.gan_weight
            if c.loss.gan_adaptive:
                weight = weight * adaptive_weight(nll, gan, vae.decoder_last_layer())
                logs["gan_weight"] = weight.detach()
            loss = loss + weight * gan
            logs["gan_g"] = gan.detach()
        return loss, logs

    def discriminator_loss(self, batch: dict[str, torch.Tensor],
                           ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """Hinge loss on the real images and the detached reconstruction of the ``vae`` phase."""
        disc = ctx.module("disc")
        real, fake = disc(batch["x"]), disc(ctx.scratch["recon"])
        loss = hinge_discriminator_loss(real, fake)
        return loss, {"logits_real": real.detach().float().mean(), "logits_fake": fake.detach().float().mean()}

    # -- publishing ------------------------------------------------------------------------------
    def export(self, run_dir: str | Path, modules: dict[str, nn.Module]) -> None:
        """Write ``RUN/vae`` (a sendvae VAE folder) from the published VAE (EMA copy when EMA is on)."""
        vae = deepcopy(modules["vae"]).eval()
        if self.cfg.model.export_stats and self.stats_data is not None:
            vae.set_latent_stats(*latent_stats(vae, self.stats_data, self.cfg))
        save_vae(vae, Path(run_dir) / "vae")


# ----------------------------------------------------------------------------------------------
# Building a stage from a config


def latent_stats(vae: VAE, data: torch.utils.data.Dataset, cfg: TrainVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean/std on ``model.stats_images`` training images drawn at random (seeded by
    ``train.seed``) from the whole dataset, of the posterior samples that stage 2 trains on
    (:func:`sendvae.models.latent_stats.compute_latent_stats`)."""
    bf16 = resolve_precision(cfg.train.precision, next(vae.parameters()).device).precision == "bf16"
    return compute_latent_stats(vae, data, cfg.model.stats_images, batch_size=min(64, cfg.model.stats_images),
                                autocast_bf16=bf16, subset_seed=cfg.train.seed)


def initial_vae(cfg: TrainVAEConfig) -> VAE:
    """The VAE to fine-tune: a preset (random init, seeded by ``train.seed``) or a checkpoint path."""
    init = cfg.model.init
    if not init:
        raise ConfigError("model.init is empty: give the VAE to fine-tune (e.g. model.init=runs/shapes-base/vae) "
                          f"or a preset for a random start ({', '.join(VAE_PRESETS)})")
    if init in VAE_PRESETS:
        torch.manual_seed(cfg.train.seed)
        return build_vae(init, resolution=cfg.data.resolution, logvar_init=cfg.model.logvar_init)
    if not Path(init).exists():
        raise ConfigError(
            f"model.init: {init!r} is neither a VAE preset ({', '.join(VAE_PRESETS)}) nor an existing path")
    if cfg.model.logvar_init:
        raise ConfigError(f"model.logvar_init={cfg.model.logvar_init:g} only applies to a random init (a preset); "
                          f"model.init is the trained VAE {init!r}: set model.logvar_init=0")
    return load_vae(init)


def initial_discriminator(loss: LossConfig) -> PatchDiscriminator:
    """The PatchGAN: random init from ``loss.disc_channels`` / ``disc_layers`` / ``disc_norm``, or the
    weights of ``loss.disc_init`` with the architecture read from the file. With ``disc_init`` a setting
    at its default means "as in the file"; any other value the file contradicts is refused, never dropped."""
    if not loss.disc_init:
        return PatchDiscriminator(3, loss.disc_channels, loss.disc_layers, loss.disc_norm)
    disc = load_discriminator(loss.disc_init)
    defaults = LossConfig()
    for key, loaded in (("disc_channels", disc.ndf), ("disc_layers", disc.n_layers), ("disc_norm", disc.norm)):
        value = getattr(loss, key)
        if value != loaded and value != getattr(defaults, key):
            raise ConfigError(f"loss.{key}={value} contradicts loss.disc_init={loss.disc_init}, whose discriminator "
                              f"has {key}={loaded}: set loss.{key}={loaded} or leave it at its default")
    return disc


def build_vae_stage(cfg: TrainVAEConfig,
                    device: torch.device | str = "cpu") -> tuple[VAEStage, torch.utils.data.Dataset]:
    """The stage and its dataset from a config; models are built on CPU, statistics measured on ``device``."""
    dataset = open_image_dataset(cfg.data.source, cfg.data.resolution)
    vae = initial_vae(cfg)
    if cfg.model.stats not in ("", "compute"):
        vae.set_latent_stats(*load_latent_stats(cfg.model.stats))
    elif cfg.model.stats == "compute":
        vae.to(device)
        vae.set_latent_stats(*latent_stats(vae, dataset, cfg))
        vae.cpu()
        log.info("latent statistics: mean %s, std %s", vae.latent_mean.tolist(), vae.latent_std.tolist())
    f = vae.downsample_factor
    if cfg.data.resolution % f:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the VAE's downsampling factor {f}")
    latent_grid = cfg.data.resolution // f

    a = cfg.alignment
    teacher = None
    if a.kind != "none":
        teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights or None, grid=cfg.teacher.grid or None,
                                antialias=cfg.teacher.antialias)
    torch.manual_seed(cfg.train.seed + 1)
    alignment = build_alignment(
        a.kind, vae.latent_channels, latent_grid,
        teacher.dim if teacher is not None else 0, teacher.grid if teacher is not None else latent_grid,
        noise=a.noise, mapper_depth=a.mapper_depth, mapper_width=a.mapper_width or None,
        mapper_heads=a.mapper_heads or None, mlp_hidden=a.mlp_hidden, margin_cos=a.vf_margin_cos,
        margin_dist=a.vf_margin_dist)

    loss = cfg.loss
    discriminator = None
    if loss.gan_weight > 0:
        torch.manual_seed(cfg.train.seed + 2)
        discriminator = initial_discriminator(loss)
    perceptual = PerceptualLoss(loss.lpips_weights or None) if loss.lpips_weight > 0 else None
    log.info("stage 1: VAE %s (%s), %d-channel %dx%d latent; alignment %s%s; GAN %s; LPIPS %s",
             vae.preset or "custom", cfg.model.init, vae.latent_channels, latent_grid, latent_grid, a.kind,
             f" to {teacher.name} {teacher.grid}x{teacher.grid}x{teacher.dim}" if teacher is not None else "",
             f"weight {loss.gan_weight} from {loss.gan_start} images" if discriminator is not None else "off",
             loss.lpips_weight or "off")
    token_cache = None
    if teacher is not None and cfg.teacher.cache:
        token_cache = teacher_token_cache(cfg, teacher, dataset, device)
    stage = VAEStage(cfg, vae, alignment, teacher, discriminator, perceptual, stats_data=dataset,
                     token_cache=token_cache)
    return stage, dataset


def teacher_token_cache(cfg: TrainVAEConfig, teacher: Teacher, dataset: torch.utils.data.Dataset,
                        device: torch.device | str) -> TokenCache:
    """The ``teacher.cache`` of this teacher (its weights' fingerprint, grid, resize and the precision it
    runs at on ``device``) on this dataset."""
    from sendvae.eval.probe_features import module_fingerprint

    key = {"teacher": teacher.name, "weights": module_fingerprint(teacher), "grid": teacher.grid,
           "antialias": cfg.teacher.antialias, "precision": resolve_precision(cfg.train.precision, device).precision,
           **dataset_identity(dataset, cfg.data.source)}
    cache = TokenCache(cfg.teacher.cache, key, len(dataset), teacher.grid * teacher.grid, teacher.dim)
    log.info("teacher tokens cached in %s (%d of %d images so far)", cache.path, cache.filled_count(), len(dataset))
    return cache


def train_vae(cfg: TrainVAEConfig, out: str | Path) -> dict[str, Any]:
    """Train stage 1 into run directory ``out`` (resuming from its checkpoints); returns the loop's summary.

    The published VAE is ``out/vae`` (load it with :func:`sendvae.models.vae_formats.load_vae`).
    """
    dinfo = dist_utils.init_distributed(cfg.train.device)
    try:
        stage, dataset = build_vae_stage(cfg, dinfo.device)
        summary = train(stage, dataset, cfg.train, out, run_config=cfg)
    finally:
        dist_utils.shutdown(dinfo)
    summary["vae"] = str(Path(out) / "vae")
    return summary


__all__ = [
    "ModelConfig", "TeacherConfig", "AlignmentConfig", "LossConfig", "DataConfig", "OptimConfig", "TrainVAEConfig",
    "VAEStage", "build_vae_stage", "initial_vae", "latent_stats", "train_vae",
]
