"""Settings of stage 2 (``sendvae train-sit``, SPEC.md section 4), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sendvae.config import param
from sendvae.train.loop_config import AdamWConfig, LoopConfig


@dataclass
class ModelConfig:
    """The SiT: size preset, architecture options, REPA projector block, label dropout.

    ``pos`` / ``mlp`` / ``norm`` left at ``preset`` take the preset's choice (``SiT-*``: sincos, gelu,
    layernorm as in SiT / REPA; ``LightningDiT-*``: rope2d, swiglu, rmsnorm as in LightningDiT); see
    :mod:`sendvae.models.sit`.
    """

    preset: str = param(
        "SiT-T/1", "{SiT,LightningDiT}-{XL,L,B,S,M,T}/{1,2,4}: official sizes XL/L/B/S, tiny CPU sizes M/T")
    encoder_depth: int = param(
        0, "REPA projector after this block (1-based); 0 = preset default (8 XL/L, 4 B/S)", min=0)
    pos: Literal["preset", "sincos", "rope2d"] = param(
        "preset", "positions: sincos = fixed 2D sin-cos (SiT); rope2d = plus 2-D RoPE on q/k (LightningDiT, EVA-02)")
    mlp: Literal["preset", "gelu", "swiglu"] = param(
        "preset", "block MLP: gelu (SiT) or swiglu = silu(x W1) * (x W2) W3 with 2/3 of the width (LightningDiT)")
    norm: Literal["preset", "layernorm", "rmsnorm"] = param(
        "preset", "block norms: layernorm without affine (SiT) or rmsnorm with a learnt scale (LightningDiT)")
    qk_norm: bool = param(
        False, "normalise each head's queries and keys (LayerNorm, RMSNorm with norm=rmsnorm; not in SiT/REPA)")
    label_dropout: float = param(0.1, "probability of replacing a label by the null class (for CFG)", min=0.0, max=1.0)
    projector_dim: int = param(2048, "hidden width of the REPA projector MLP", min=1)


@dataclass
class TransportConfig:
    """Training times and loss terms (linear path, velocity target, t = 1 noise; :mod:`sendvae.transport`).

    REPA / REPA-E train with uniform t and the velocity MSE alone (the defaults). LightningDiT adds
    logit-normal t (``time_sampling=logit-normal``, mean 0, std 1: the same law in either time
    convention) and its velocity-direction term with weight 1 (``cosine_weight=1``).
    """

    time_sampling: Literal["uniform", "lognormal", "logit-normal"] = param(
        "uniform", "distribution of training times t: uniform (SiT, REPA), lognormal (REPA's option), "
        "logit-normal t = sigmoid(n), n ~ N(time_mean, time_std) (SD3, LightningDiT)")
    time_mean: float = param(0.0, "mean of the normal behind lognormal / logit-normal t (> 0: toward noise)")
    time_std: float = param(1.0, "std of the normal behind lognormal / logit-normal t", min=0.0)
    time_shift: float = param(1.0, "shift t' = s t / (1 + (s - 1) t) toward noise; 1 = none", min=0.0)
    cosine_weight: float = param(
        0.0, "weight of LightningDiT's direction term 1 - cos(v_pred, v_target) (cosine over channels at each "
        "latent position, averaged); 0 = off, LightningDiT uses 1", min=0.0)


@dataclass
class RepaConfig:
    """The REPA alignment term: its weight and where the teacher tokens come from."""

    weight: float = param(0.5, "lambda of the REPA loss (negative cosine per token); 0 = plain SiT", min=0.0)
    source: Literal["online", "cache"] = param(
        "cache", "teacher tokens: cache = stored by cache-latents --teacher; online = teacher run on the images"
    )


@dataclass
class TeacherConfig:
    """The teacher run on the images when ``repa.source=online``."""

    name: str = param("", "teacher for online REPA (e.g. dinov2-b, effnet-lite0); empty = the one in the cache")
    weights: str = param("", "local weights of the online teacher (empty = the registry default)")
    antialias: bool = param(False, "antialiased bicubic resize to the teacher's input; false = plain bicubic "
                            "(REPA / REPA-E); cached tokens must have been made the same way")


@dataclass
class DataConfig:
    """The latent cache and the VAE it was made with."""

    cache: str = param("", "latent cache folder written by `sendvae cache-latents` (required)")
    vae: str = param("", "VAE the cache was made with (checked by fingerprint); empty = the path in the manifest")
    images: str = param("", "image data joined by index for online REPA; empty = the data in the manifest")
    flip_prob: float = param(0.0, "probability of training on an image's horizontal flip (the cache holds both); "
                             "0 = REPA / REPA-E's protocol, no flips", min=0.0, max=1.0)
    posterior: Literal["sample", "mean"] = param(
        "sample", "latents the SiT learns: sample = mean + std * eps (REPA-E's cached-posterior protocol); mean = the "
        "posterior mean alone (a sharper target where the VAE's posterior noise is large, e.g. the tiny CPU VAEs)")


@dataclass
class OptimConfig(AdamWConfig):
    """AdamW (REPA / REPA-E defaults: lr 1e-4, betas (0.9, 0.999), no weight decay)."""


def _default_loop() -> LoopConfig:
    return LoopConfig(total_images=64_000, batch_size=64, ema_decay=0.9999, grad_clip=1.0)


@dataclass
class TrainSiTConfig:
    """Options of ``sendvae train-sit`` (SPEC.md section 4)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=_default_loop)
