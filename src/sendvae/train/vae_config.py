"""Settings of stage 1 (``sendvae train-vae``, SPEC.md section 2), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sendvae.config import param
from sendvae.train.loop_config import AdamWConfig, LoopConfig


@dataclass
class ModelConfig:
    init: str = param("tiny-f4c4", "VAE to start from: a preset name (random init) or a path (sendvae folder, "
                                   "diffusers folder, LDM checkpoint)")
    stats: str = param("", "latent statistics: empty = the VAE's own; a file (latent_stats.json, REPA-E "
                           "*-latents-stats.pt); 'compute' = measure them on the training data before training")
    stats_images: int = param(2000, "images used whenever latent statistics are computed (a random subset of "
                              "the whole dataset, seeded by train.seed)", min=1)
    export_stats: bool = param(True, "recompute the latent statistics of the published RUN/vae at each export")
    sample_posterior: bool = param(True, "z = a posterior sample (REPA-E); false = the posterior mean")
    logvar_init: float = param(0.0, "random init (a preset) only: bias of the encoder's log-variance outputs; 0 = "
                                    "diffusers' default (posterior std about 1), -8 = nearly deterministic (std 0.02) "
                                    "so the decoder learns from clean latents at once (docs/demo_full.md)")


@dataclass
class TeacherConfig:
    name: str = param("effnet-lite0", "frozen vision foundation model (sendvae.models.teachers registry)")
    weights: str = param("", "its local weights (file or folder); empty = its offline default; 'random' = random init")
    grid: int = param(0, "teacher token grid per side; 0 = the teacher's default (ViTs 16, EfficientNet 8)", min=0)
    antialias: bool = param(False, "antialiased bicubic resize to the teacher's input; false = plain bicubic (REPA-E)")
    cache: str = param("", "folder of a per-image token cache shared by runs on the same images (float16, filled "
                           "lazily: sendvae.data.token_cache); empty = run the teacher on every batch")


@dataclass
class AlignmentConfig:
    kind: Literal["none", "vf", "sendvae"] = param("sendvae", "none | vf (VA-VAE linear projection) | sendvae (mapper)")
    weight: float = param(1.0, "lambda_align (Send-VAE 1.0; VA-VAE's VF loss 0.1 x its adaptive weight)", min=0.0)
    normalize_latent: bool = param(True, "align the latent normalised with the VAE's latent statistics (Send-VAE, "
                                         "SPEC step 2); false = the raw latent (VA-VAE's VF loss: the vf presets)")
    noise: bool = param(True, "sendvae: noise injection z_t = (1 - t) z + t eps, t ~ U(0, 1) (Eq. 1)")
    mapper_depth: int = param(1, "sendvae: ViT blocks in the mapper (paper ablation 0 / 1 / 2)", min=0)
    mapper_width: int = param(0, "sendvae: mapper token width; 0 = the teacher width", min=0)
    mapper_heads: int = param(0, "sendvae: attention heads; 0 = width / 64", min=0)
    mlp_hidden: int = param(2048, "sendvae: hidden width of the mapper's projector MLP", min=1)
    vf_margin_cos: float = param(0.5, "vf: marginal cosine margin")
    vf_margin_dist: float = param(0.25, "vf: marginal distance-matrix margin")
    vf_adaptive: bool = param(True, "vf: multiply by ||grad nll|| / ||grad vf|| at the encoder's last layer (VA-VAE)")


@dataclass
class LossConfig:
    reconstruction: Literal["l1", "mse"] = param("l1", "pixel loss, mean over pixels (REPA-E: l1; the paper names mse)")
    reconstruction_weight: float = param(1.0, "weight of the pixel loss", min=0.0)
    lpips_weight: float = param(0.0, "weight of LPIPS-VGG (mean over batch); 0 = off", min=0.0)
    lpips_weights: str = param("", "VGG16 / LPIPS weights file; empty = torchvision's cached vgg16; 'random' (tests)")
    kl_weight: float = param(1e-6, "weight of the KL (summed over the latent, mean over batch)", min=0.0)
    gan_weight: float = param(0.0, "weight of the generator loss -mean D(x_hat); 0 = no GAN, no discriminator", min=0.0)
    gan_adaptive: bool = param(False, "multiply the GAN weight by the LDM adaptive weight at the decoder's last layer")
    gan_start: int = param(0, "images seen before the GAN terms (and the discriminator) start", min=0)
    disc_layers: int = param(3, "PatchGAN layers", min=1)
    disc_channels: int = param(64, "PatchGAN base width", min=1)
    disc_norm: Literal["batch", "act"] = param("batch", "PatchGAN normalisation (LDM / REPA-E: batch)")
    disc_init: str = param("", "pretrained discriminator weights (LDM / REPA-E layout; the architecture is read from "
                           "the file, and disc_channels / layers / norm must agree or stay at their defaults); "
                           "empty = random init")


@dataclass
class DataConfig:
    source: str = param("shapes:20000", "training images: a prepared store folder or shapes:N[@SEED]")
    resolution: int = param(32, "image side in pixels", min=8)


@dataclass
class OptimConfig(AdamWConfig):
    """AdamW of the VAE and the alignment head, and of the discriminator."""

    lr: float = param(3e-4, "AdamW learning rate of the VAE and the alignment head (constant)", min=0.0)
    disc_lr: float = param(0.0, "discriminator learning rate; 0 = optim.lr", min=0.0)


def _default_loop() -> LoopConfig:
    return LoopConfig(total_images=64_000, batch_size=64, grad_clip=1.0, ema=False)  # REPA-E: no EMA of the VAE


@dataclass
class TrainVAEConfig:
    """Options of ``sendvae train-vae`` (SPEC.md section 2)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=_default_loop)
