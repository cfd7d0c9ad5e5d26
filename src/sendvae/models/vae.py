"""The VAE (LDM AutoencoderKL): its posterior, architecture presets and the model with its latent statistics.

Architecture: the LDM first-stage autoencoder (Rombach et al. 2022), carried by diffusers
``AutoencoderKL``: encoder ``x -> moments = quant_conv(E(x))``, posterior
``q(z|x) = N(mean, diag(exp(logvar)))`` (:class:`DiagonalGaussian`), decoder
``x_hat = D(post_quant_conv(z))``. Send-VAE (SPEC.md section 2) fine-tunes this model; its preset
``f16c32`` is VA-VAE's f16d32 layout (ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at the
16x16 level), which as a diffusers model has exactly 69,836,067 parameters in 342 tensors.

Latent convention (DESIGN.md section 2): the per-channel latent normalisation
``normalize(z) = (z - latent_mean) / latent_std`` travels with the checkpoint (buffers
``latent_mean`` / ``latent_std``, stored in ``latent_stats.json``) and is applied at load, so it
can change without re-encoding. diffusers' own ``scaling_factor`` is not used (the carrier keeps
it at 1.0). Reading and writing checkpoints is :mod:`sendvae.models.vae_formats`; measuring the
statistics on a dataset is :mod:`sendvae.models.latent_stats`.

Everything runs on CPU and under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the posterior is
kept in float32 so the KL term and sampling are computed in full precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sendvae.errors import UserError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), kept in float32 (or float64) precision.

    ``logvar`` is clamped to [-30, 20] as in LDM. :meth:`kl` is KL(q || N(0, I)) summed over
    C, H, W: one value per sample (the loss averages it over the batch).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = _at_least_float32(mean)
        self.logvar = _at_least_float32(logvar).clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """From the encoder output [B, 2C, h, w] (mean first, then log-variance)."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @classmethod
    def from_mean_std(cls, mean: torch.Tensor, std: torch.Tensor) -> DiagonalGaussian:
        """From a stored (mean, std) pair, e.g. the latent cache."""
        return cls(mean, 2.0 * torch.log(_at_least_float32(std)))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from ``generator`` (on its own device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(N(mean, var) || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over C, H, W -> [B]."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


# --------------------------------------------------------------------------------------------
# Architecture and presets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEArch:
    """An LDM AutoencoderKL architecture; levels are listed from full resolution down.

    ``attention[i]`` puts a self-attention block after every res block of level i, in the encoder
    and in the decoder (LDM ``attn_resolutions``). ``resolution`` is the native image size; it is
    not part of the architecture (it does not change any weight) and is ignored in comparisons.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    attention: tuple[bool, ...]
    mid_attention: bool = True
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    resolution: int = dataclasses.field(default=256, compare=False)

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.block_out_channels):
            raise UserError(
                f"VAE architecture: attention has {len(self.attention)} levels but block_out_channels has "
                f"{len(self.block_out_channels)}"
            )
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise UserError(
                f"VAE architecture: widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers ``AutoencoderKL`` (scaling disabled: factor 1, no shift)."""
        down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in self.attention)
        up = tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(self.attention))
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": list(down),
            "up_block_types": list(up),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.resolution,
            "scaling_factor": 1.0,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_attention,
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VAEArch | None:
        """The architecture of an AutoencoderKL config, or None when it is not an LDM layout."""
        down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
        up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
        encoder_attn = [{"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}.get(t) for t in down]
        decoder_attn = [{"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}.get(t) for t in reversed(up)]
        if None in encoder_attn or encoder_attn != decoder_attn or config.get("act_fn", "silu") != "silu":
            return None
        sample_size = config.get("sample_size", 256)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        try:
            return cls(
                block_out_channels=tuple(config.get("block_out_channels", (64,))),
                layers_per_block=int(config.get("layers_per_block", 1)),
                latent_channels=int(config.get("latent_channels", 4)),
                attention=tuple(bool(a) for a in encoder_attn),
                mid_attention=bool(config.get("mid_block_add_attention", True)),
                norm_num_groups=int(config.get("norm_num_groups", 32)),
                in_channels=int(config.get("in_channels", 3)),
                out_channels=int(config.get("out_channels", 3)),
                use_quant_conv=bool(config.get("use_quant_conv", True)),
                use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
                resolution=int(sample_size),
            )
        except UserError:
            return None


def _ldm_preset(
    widths: tuple[int, ...], layers: int, latent: int, attention_last: bool, resolution: int, mid_attention: bool = True
) -> VAEArch:
    attention = tuple(attention_last and i == len(widths) - 1 for i in range(len(widths)))
    return VAEArch(widths, layers, latent, attention, mid_attention, resolution=resolution)


VAE_PRESETS: dict[str, VAEArch] = {
    # SD-VAE f8d4 (LDM kl-f8): ch 128, ch_mult (1, 2, 4, 4), no attention inside the levels.
    "f8c4": _ldm_preset((128, 256, 512, 512), 2, 4, False, 256),
    # VA-VAE / IN-VAE / REPA-E f16d32: ch 128, ch_mult (1, 1, 2, 2, 4), attention at 16x16.
    "f16c32": _ldm_preset((128, 128, 256, 256, 512), 2, 32, True, 256),
    # The paper's latent-width ablation (f16d16, f16d64): the f16c32 layout with other widths.
    "f16c16": _ldm_preset((128, 128, 256, 256, 512), 2, 16, True, 256),
    "f16c64": _ldm_preset((128, 128, 256, 256, 512), 2, 64, True, 256),
    # Tiny CPU presets (PILOT.md "Models"): widths multiples of 32 (bf16 fast path on CPU) and no
    # mid-block attention (at an 8x8 grid it adds little and costs about a fifth of a CPU train step).
    "tiny-f4c4": _ldm_preset((32, 64, 128), 1, 4, False, 32, mid_attention=False),  # 32 px -> 8x8x4
    "tiny-f8c4": _ldm_preset((32, 64, 128, 128), 1, 4, False, 64, mid_attention=False),  # 64 px -> 8x8x4
    "tiny-f4c8": _ldm_preset((32, 64, 128), 1, 8, False, 32, mid_attention=False),  # 32 px -> 8x8x8
}


def preset_name(arch: VAEArch | None) -> str | None:
    """The preset whose architecture equals ``arch`` (resolution aside), or None."""
    if arch is None:
        return None
    return next((name for name, preset in VAE_PRESETS.items() if preset == arch), None)


def _autoencoder_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``config`` that this diffusers' AutoencoderKL accepts (others dropped, logged)."""
    from diffusers import AutoencoderKL

    signature = inspect.signature(AutoencoderKL.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in signature and k != "self"}
    dropped = sorted(k for k in config if k not in signature and not k.startswith("_"))
    for key in dropped:
        logger.debug("AutoencoderKL config entry %s=%r is not used by this diffusers version", key, config[key])
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if key in config and key not in signature and config[key] is False:
            raise UserError(f"this VAE needs {key}=False, which your diffusers version does not support; "
                            "upgrade diffusers")
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def meta_autoencoder(arch: VAEArch) -> nn.Module:
    """``arch``'s diffusers ``AutoencoderKL`` on the meta device: its key names and shapes, no memory."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**_autoencoder_kwargs(arch.diffusers_config()))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """diffusers ``AutoencoderKL`` plus the per-channel latent statistics (buffers, shape [C]).

    ``encode(x)`` takes images in [-1, 1] and returns a :class:`DiagonalGaussian`; ``decode(z)``
    returns images in about [-1, 1]. ``normalize`` / ``denormalize`` apply the latent statistics.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor

    def __init__(
        self,
        config: Mapping[str, Any],
        latent_mean: torch.Tensor | None = None,
        latent_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        config = dict(config)
        # Our normalisation is latent_mean / latent_std; the carrier's scaling stays neutral.
        config.update(scaling_factor=1.0, shift_factor=None, latents_mean=None, latents_std=None)
        self.autoencoder = AutoencoderKL(**_autoencoder_kwargs(config))
        channels = self.latent_channels
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self.stats_info: dict[str, Any] = {}  # where the statistics come from (written to latent_stats.json)
        if latent_mean is not None or latent_std is not None:
            self.set_latent_stats(
                latent_mean if latent_mean is not None else torch.zeros(channels),
                latent_std if latent_std is not None else torch.ones(channels),
            )
        self.source: dict[str, Any] = {"format": "random"}

    # -- description -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The carrier's AutoencoderKL configuration (plain dict)."""
        return {k: v for k, v in dict(self.autoencoder.config).items() if not k.startswith("_")}

    @property
    def arch(self) -> VAEArch | None:
        return VAEArch.from_diffusers_config(self.config)

    @property
    def preset(self) -> str | None:
        return preset_name(self.arch)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        size = self.autoencoder.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def encoder_last_layer(self) -> torch.Tensor:
        """Encoder ``conv_out`` weight (VA-VAE's adaptive VF-loss weight is taken here)."""
        return self.autoencoder.encoder.conv_out.weight

    def decoder_last_layer(self) -> torch.Tensor:
        """Decoder ``conv_out`` weight (the LDM adaptive GAN weight is taken here)."""
        return self.autoencoder.decoder.conv_out.weight

    # -- latent statistics -------------------------------------------------------------------
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor, info: Mapping[str, Any] | None = None) -> None:
        """Replace the per-channel latent statistics (validated: shape [C], finite, std > 0).

        ``info`` (e.g. the data set and number of images) is kept in ``stats_info`` and saved
        beside the statistics in ``latent_stats.json``.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        channels = self.latent_channels
        if mean.numel() != channels or std.numel() != channels:
            raise UserError(
                f"latent statistics have {mean.numel()} means and {std.numel()} stds, the VAE has "
                f"{channels} latent channels"
            )
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std <= 0).any():
            raise UserError(f"latent statistics must be finite with std > 0, got mean={mean.tolist()} std={std.tolist()}")
        with torch.no_grad():
            self.latent_mean.copy_(mean)
            self.latent_std.copy_(std)
        self.stats_info = dict(info or {})

    def _stat(self, stat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return stat.view(1, -1, *([1] * (z.ndim - 2))).to(device=z.device)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latent_mean) / latent_std per channel (channel dim 1), in z's dtype."""
        out = (z.float() - self._stat(self.latent_mean, z)) / self._stat(self.latent_std, z)
        return out.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: z * latent_std + latent_mean."""
        out = z.float() * self._stat(self.latent_std, z) + self._stat(self.latent_mean, z)
        return out.to(z.dtype)

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], [B, 3, H, W] -> posterior over z [B, C, H/f, W/f]."""
        moments = self.autoencoder.encoder(x)
        if self.autoencoder.quant_conv is not None:
            moments = self.autoencoder.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) latents [B, C, h, w] -> images [B, 3, h*f, w*f] in about [-1, 1]."""
        if self.autoencoder.post_quant_conv is not None:
            z = self.autoencoder.post_quant_conv(z)
        return self.autoencoder.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]:
        """(reconstruction, posterior, z): z is a posterior sample, or its mean with sample=False."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.decode(z), posterior, z


def build_vae(preset: str | VAEArch, resolution: int | None = None, logvar_init: float = 0.0) -> VAE:
    """A randomly initialised VAE from a preset name (see :data:`VAE_PRESETS`) or an architecture.

    ``logvar_init`` is the bias of the encoder's log-variance outputs (the second half of the moments); 0 keeps
    diffusers' initialisation, whose posterior starts with a standard deviation of about 1. A negative value starts
    the posterior nearly deterministic, as the posteriors of trained VAEs with a small KL weight are: the decoder
    then learns from clean latents from the first step instead of waiting for the encoder to shrink the noise.
    The KL pulls log sigma^2 back towards 0, and under AdamW even a weight of 1e-6 does so within a thousand steps,
    so the shapes base preset (-8) also turns the KL off; docs/demo_full.md gives the measurements.
    """
    if isinstance(preset, str):
        if preset not in VAE_PRESETS:
            raise UserError(f"unknown VAE preset {preset!r}; choose one of {', '.join(VAE_PRESETS)}")
        arch = VAE_PRESETS[preset]
    else:
        arch = preset
    if resolution is not None:
        arch = dataclasses.replace(arch, resolution=resolution)
    vae = VAE(arch.diffusers_config())
    vae.source = {"format": "random", "preset": preset if isinstance(preset, str) else preset_name(arch)}
    if logvar_init:
        ae = vae.autoencoder
        moments = ae.quant_conv if ae.quant_conv is not None else ae.encoder.conv_out
        with torch.no_grad():
            moments.bias[vae.latent_channels:] = logvar_init
    return vae


def count_parameters(vae: VAE) -> dict[str, int]:
    """Parameter counts: encoder side (encoder + quant_conv), decoder side, total, and tensors."""
    ae = vae.autoencoder
    encoder = sum(p.numel() for n, p in ae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    decoder = sum(p.numel() for n, p in ae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    tensors = sum(1 for _ in ae.parameters())
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder, "tensors": tensors}


_STAT_BUFFERS = ("latent_mean", "latent_std")


def vae_fingerprint(vae: VAE, include_stats: bool = True) -> str:
    """sha256 over the sorted state dict (names, dtypes, shapes, bytes).

    With ``include_stats`` (the default) the latent statistics count too: a SiT trained on latents
    normalised with one set of statistics must decode with the same set. Without them the
    fingerprint identifies the encoder/decoder weights alone: a latent cache stores the raw
    posterior, so it stays valid when only the statistics change (DESIGN.md section 2).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if not include_stats and name in _STAT_BUFFERS:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_vae(vae: VAE) -> dict[str, Any]:
    """What ``sendvae vae info`` prints: format, preset, parameters, latent shape, statistics."""
    counts = count_parameters(vae)
    f = vae.downsample_factor
    res = vae.resolution
    identity = bool((vae.latent_mean == 0).all() and (vae.latent_std == 1).all())
    return {
        "format": vae.source.get("format"),
        "source": vae.source.get("path"),
        "preset": vae.preset or "custom",
        "block_out_channels": list(vae.autoencoder.config.block_out_channels),
        "layers_per_block": int(vae.autoencoder.config.layers_per_block),
        "attention": list(vae.arch.attention) if vae.arch else None,
        "parameters": counts,
        "downsample_factor": f,
        "latent_channels": vae.latent_channels,
        "latent_shape": [vae.latent_channels, math.ceil(res / f), math.ceil(res / f)],
        "resolution": res,
        "latent_stats": "identity (mean 0, std 1)" if identity else {
            "mean": [round(v, 6) for v in vae.latent_mean.tolist()],
            "std": [round(v, 6) for v in vae.latent_std.tolist()],
        },
        "fingerprint": vae_fingerprint(vae),
    }
