"""The VAE (LDM AutoencoderKL) with its latent statistics, presets, import and export.

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
it at 1.0).

Formats read by :func:`load_vae`:

- a sendvae VAE folder: ``config.json`` (``"format": "sendvae-vae"``), ``model.safetensors``,
  ``latent_stats.json``;
- a diffusers ``AutoencoderKL`` folder (sd-vae-ft-ema style, old attention names included);
- an LDM-format checkpoint (VA-VAE, REPA-E ``sdvae`` / ``invae`` / ``vavae`` / ``e2e-*``): keys
  ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, possibly nested under
  ``state_dict`` / ``model`` / ``vae`` and prefixed (``first_stage_model.``). The architecture is
  inferred from the tensor shapes, and every key is mapped (the attention blocks inside the
  down/up levels included, which diffusers' own converter misses) or the import stops with the
  list of missing and unexpected keys.

Everything runs on CPU and under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the posterior is
kept in float32 so the KL term and sampling are computed in full precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sendvae.atomic import atomic_folder
from sendvae.errors import UserError
from sendvae.pickles import flatten_tensors, pickle_refusal
from sendvae.progress import bars_enabled

logger = logging.getLogger(__name__)

FORMAT_NAME = "sendvae-vae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "latent_stats.json"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


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


def build_vae(preset: str | VAEArch, resolution: int | None = None) -> VAE:
    """A randomly initialised VAE from a preset name (see :data:`VAE_PRESETS`) or an architecture."""
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
    return vae


def count_parameters(vae: VAE) -> dict[str, int]:
    """Parameter counts: encoder side (encoder + quant_conv), decoder side, total, and tensors."""
    ae = vae.autoencoder
    encoder = sum(p.numel() for n, p in ae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    decoder = sum(p.numel() for n, p in ae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    tensors = sum(1 for _ in ae.parameters())
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder, "tensors": tensors}


# --------------------------------------------------------------------------------------------
# LDM <-> diffusers key mapping
# --------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Attention names of diffusers < 0.14 (e.g. the sd-vae-ft-ema upload) -> current names.
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_key_to_ldm(key: str, num_levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL state-dict key (``num_levels`` = len(ch_mult)).

    diffusers orders the decoder's up blocks from the lowest resolution, LDM from the highest:
    ``decoder.up_blocks.k`` is ``decoder.up.{num_levels - 1 - k}``.
    """
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv") or rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{rest[1]}"
    if rest[0] == "mid_block":
        kind, index, leaf = rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return f"{side}.mid.block_{index + 1}.{_ldm_leaf(leaf, _RESNET_TO_LDM, key)}"
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_ldm_leaf(leaf, _ATTN_TO_LDM, key)}"
    if rest[0] in ("down_blocks", "up_blocks"):
        level = int(rest[1])
        container = "down" if side == "encoder" else "up"
        ldm_level = level if side == "encoder" else num_levels - 1 - level
        kind, tail = rest[2], rest[3:]
        if kind == "resnets":
            return f"{side}.{container}.{ldm_level}.block.{tail[0]}.{_ldm_leaf(tail[1:], _RESNET_TO_LDM, key)}"
        if kind == "attentions":
            return f"{side}.{container}.{ldm_level}.attn.{tail[0]}.{_ldm_leaf(tail[1:], _ATTN_TO_LDM, key)}"
        if kind in ("downsamplers", "upsamplers") and tail[:2] == ["0", "conv"]:
            return f"{side}.{container}.{ldm_level}.{kind[:-2]}.conv.{tail[2]}"
    raise KeyError(f"no LDM name for diffusers key {key}")


def _ldm_name_or_same(key: str, num_levels: int) -> str:
    """The LDM name, or the key itself when it has none (it is then reported as unexpected)."""
    try:
        return diffusers_key_to_ldm(key, num_levels)
    except (KeyError, IndexError, ValueError):
        return key


def _ldm_leaf(leaf: list[str], table: Mapping[str, str], key: str) -> str:
    module, param = ".".join(leaf[:-1]), leaf[-1]
    if module not in table:
        raise KeyError(f"no LDM name for diffusers key {key}")
    return f"{table[module]}.{param}"


def ldm_key_map(arch: VAEArch) -> dict[str, str]:
    """LDM key -> diffusers key for every tensor of ``arch`` (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**_autoencoder_kwargs(arch.diffusers_config()))
    num_levels = len(arch.block_out_channels)
    return {diffusers_key_to_ldm(k, num_levels): k for k in model.state_dict()}


def _is_attention_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", ldm_key))


def _meta_state_shapes(arch: VAEArch) -> dict[str, torch.Size]:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**_autoencoder_kwargs(arch.diffusers_config()))
    return {k: v.shape for k, v in model.state_dict().items()}


def infer_ldm_arch(state_dict: Mapping[str, torch.Tensor], norm_num_groups: int = 32) -> VAEArch:
    """The architecture of an LDM-layout state dict, read from its tensor shapes.

    ch = conv_in width; ch_mult from each level's first res block; num_res_blocks from level 0;
    z_channels from ``decoder.conv_in``; attention per level and in the middle from key presence.
    """

    def tensor(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise UserError(f"LDM checkpoint has no {key}; found keys such as {', '.join(sorted(state_dict)[:8])}")
        return state_dict[key]

    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise UserError(f"LDM checkpoint: encoder levels {levels} are not 0..n-1")
    widths = tuple(int(tensor(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in levels)
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    attention = tuple(
        any(k.startswith((f"encoder.down.{i}.attn.", f"decoder.up.{i}.attn.")) for k in state_dict) for i in levels
    )
    if "decoder.conv_in.weight" in state_dict:
        latent = int(state_dict["decoder.conv_in.weight"].shape[1])
    else:
        latent = int(tensor("encoder.conv_out.weight").shape[0]) // 2
    out_channels = int(state_dict["decoder.conv_out.weight"].shape[0]) if "decoder.conv_out.weight" in state_dict else 3
    return VAEArch(
        block_out_channels=widths,
        layers_per_block=len(blocks),
        latent_channels=latent,
        attention=attention,
        mid_attention=any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in state_dict),
        norm_num_groups=norm_num_groups,
        in_channels=int(tensor("encoder.conv_in.weight").shape[1]),
        out_channels=out_channels,
        use_quant_conv="quant_conv.weight" in state_dict,
        use_post_quant_conv="post_quant_conv.weight" in state_dict,
    )


def _key_report(missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str] = (), limit: int = 20) -> str:
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        keys = sorted(keys)
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"{len(keys)} {title} keys: {shown}")
    return "; ".join(lines)


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint", norm_num_groups: int = 32
) -> tuple[VAEArch, dict[str, torch.Tensor]]:
    """Map an LDM-layout autoencoder state dict to diffusers names (every key, or UserError).

    The 1x1-conv q/k/v/proj_out weights of every attention block (middle and inside the levels)
    become the linear ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` weights.
    """
    arch = infer_ldm_arch(state_dict, norm_num_groups)
    key_map = ldm_key_map(arch)
    shapes = _meta_state_shapes(arch)
    missing = [k for k in key_map if k not in state_dict]
    unexpected = [k for k in state_dict if k not in key_map]
    converted: dict[str, torch.Tensor] = {}
    mismatched = []
    for ldm_key, diffusers_key in key_map.items():
        if ldm_key not in state_dict:
            continue
        value = state_dict[ldm_key]
        target = shapes[diffusers_key]
        if value.shape != target and _is_attention_matrix(ldm_key) and value.shape == (*target, 1, 1):
            value = value.reshape(target)
        if value.shape != target:
            mismatched.append(f"{ldm_key} {tuple(value.shape)} (expected {tuple(target)})")
            continue
        converted[diffusers_key] = value
    if missing or unexpected or mismatched:
        raise UserError(
            f"{source}: the LDM autoencoder weights do not match the inferred architecture "
            f"(widths {list(arch.block_out_channels)}, {arch.layers_per_block} res blocks, latent "
            f"{arch.latent_channels}, attention {list(arch.attention)}): {_key_report(missing, unexpected, mismatched)}"
        )
    return arch, converted


def diffusers_to_ldm(vae: VAE) -> dict[str, torch.Tensor]:
    """The inverse mapping: the VAE's weights under LDM names (attention weights as 1x1 convs)."""
    num_levels = len(vae.autoencoder.config.block_out_channels)
    out = {}
    for key, value in vae.autoencoder.state_dict().items():
        ldm_key = diffusers_key_to_ldm(key, num_levels)
        out[ldm_key] = value.reshape(*value.shape, 1, 1) if _is_attention_matrix(ldm_key) else value
    return out


def _rename_deprecated_attention(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        out[f"{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}" if m else key] = value
    return out


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_tensor_file(path: str | Path) -> dict[str, Any]:
    """A safetensors file, or a torch pickle read with ``weights_only=True`` (UserError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(pickle_refusal(path, exc)) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, expected a dict of tensors")
    return loaded


def _autoencoder_prefix(flat: Mapping[str, torch.Tensor], path: Path, prefix: str | None) -> str:
    if prefix is not None:
        if not any(k.startswith(prefix + "encoder.") for k in flat):
            raise UserError(f"{path}: no keys start with {prefix}encoder.")
        return prefix
    anchor = "encoder.conv_in.weight"
    found = sorted({k[: -len(anchor)] for k in flat if k.endswith(anchor)})
    if not found:
        raise UserError(
            f"{path}: no autoencoder weights found (no key ending in {anchor}); "
            f"first keys: {', '.join(sorted(flat)[:8])}"
        )
    if len(found) > 1:
        raise UserError(
            f"{path} holds several autoencoders, under the prefixes {found}; choose one with prefix= "
            "(CLI: --prefix)"
        )
    return found[0]


def load_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) from a stats file.

    Accepted: our ``latent_stats.json`` ({"mean": [...], "std": [...]}); REPA-E
    ``*-latents-stats.pt`` (``latents_bias`` = mean, ``latents_scale`` = 1 / std, shape [1, C, 1, 1]);
    tensor files with ``mean`` / ``std`` or ``latent_mean`` / ``latent_std`` (LightningDiT style).
    """
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        try:
            data = json.loads(path.read_text())
            return torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["std"], dtype=torch.float32)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: expected JSON with lists 'mean' and 'std' ({exc})") from None
    data = flatten_tensors(read_tensor_file(path))
    if "latents_bias" in data and "latents_scale" in data:
        return data["latents_bias"].float().flatten(), 1.0 / data["latents_scale"].float().flatten()
    for mean_key, std_key in (("latent_mean", "latent_std"), ("mean", "std")):
        if mean_key in data and std_key in data:
            return data[mean_key].float().flatten(), data[std_key].float().flatten()
    raise UserError(
        f"{path}: no latent statistics found (expected latents_bias/latents_scale, latent_mean/latent_std "
        f"or mean/std); keys: {', '.join(sorted(data)[:10])}"
    )


_STATS_CONVENTION = "normalize(z) = (z - mean) / std per channel"


def _write_latent_stats(vae: VAE, folder: Path) -> None:
    data = {"mean": vae.latent_mean.tolist(), "std": vae.latent_std.tolist(), "convention": _STATS_CONVENTION}
    data.update({k: v for k, v in vae.stats_info.items() if k not in data})
    (folder / STATS_FILE).write_text(json.dumps(data, indent=2) + "\n")


def _attach_stats_file(vae: VAE, path: Path) -> None:
    """Set the statistics from a file; a latent_stats.json also brings its recorded provenance."""
    mean, std = load_latent_stats(path)
    info: dict[str, Any] = {"stats_file": str(path)}
    if path.suffix == ".json":
        info = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("mean", "std", "convention")}
    vae.set_latent_stats(mean, std, info)


def _load_strict(vae: VAE, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    expected = {k: v.shape for k, v in vae.autoencoder.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k]]
    if missing or unexpected or mismatched:
        raise UserError(f"{source}: the weights do not match the architecture: "
                        f"{_key_report(missing, unexpected, mismatched)}")
    vae.autoencoder.load_state_dict(dict(state_dict), strict=True)


def _load_sendvae_folder(folder: Path, config: Mapping[str, Any]) -> VAE:
    if config.get("autoencoder"):
        vae = VAE(config["autoencoder"])
    elif config.get("preset"):
        vae = build_vae(config["preset"])
    else:
        raise UserError(f"{folder / CONFIG_FILE}: needs an 'autoencoder' config or a 'preset' name")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{folder}: {WEIGHTS_FILE} is missing")
    _load_strict(vae, read_tensor_file(weights), str(weights))
    if (folder / STATS_FILE).is_file():
        _attach_stats_file(vae, folder / STATS_FILE)
    vae.source = {"format": FORMAT_NAME, "path": str(folder)}
    return vae


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors")) + sorted(
        folder.glob("diffusion_pytorch_model.*.bin"))
    variants = [v for v in variants if "index" not in v.name]
    if variants:
        return variants[0]
    raise UserError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin next to config.json")


def _stats_from_diffusers_config(config: Mapping[str, Any], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' normalisation ``(z - latents_mean) * scaling_factor / latents_std`` as (mean, std).

    With only a scaling factor (SD-VAE: 0.18215) this is mean = shift_factor or 0, std = 1 / factor.
    """
    scale = float(config.get("scaling_factor") or 1.0)
    mean = config.get("latents_mean")
    std = config.get("latents_std")
    shift = config.get("shift_factor")
    mean_t = torch.tensor(mean, dtype=torch.float32) if mean is not None else torch.full((channels,), float(shift or 0.0))
    std_t = torch.tensor(std, dtype=torch.float32) if std is not None else torch.ones(channels)
    return mean_t, std_t / scale


def _load_diffusers_folder(folder: Path, config: Mapping[str, Any]) -> VAE:
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise UserError(f"{folder / CONFIG_FILE}: a diffusers {class_name}, expected an AutoencoderKL")
    vae = VAE(config)
    weights = _diffusers_weights(folder)
    _load_strict(vae, _rename_deprecated_attention(read_tensor_file(weights)), str(weights))
    if (folder / STATS_FILE).is_file():
        _attach_stats_file(vae, folder / STATS_FILE)
    else:
        vae.set_latent_stats(*_stats_from_diffusers_config(config, vae.latent_channels),
                             info={"from": "diffusers config scaling_factor / shift_factor / latents_mean / latents_std"})
    vae.source = {"format": "diffusers", "path": str(folder)}
    return vae


def _load_checkpoint_file(path: Path, prefix: str | None, norm_num_groups: int) -> VAE:
    flat = flatten_tensors(read_tensor_file(path))
    prefix = _autoencoder_prefix(flat, path, prefix)
    inside = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    autoencoder = {k: v for k, v in inside.items() if k.startswith(_AUTOENCODER_PARTS)}
    unused = [k for k in flat if not (k.startswith(prefix) and k[len(prefix):] in autoencoder)]
    ignored = sorted({k.removeprefix(prefix).split(".")[0] for k in unused})
    if ignored:
        logger.info("%s: ignoring entries outside the autoencoder: %s", path, ", ".join(ignored))
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in autoencoder):
        # diffusers naming in a bare weight file: rename to LDM names, then go the same way.
        renamed = _rename_deprecated_attention(autoencoder)
        levels = 1 + max((int(m.group(1)) for k in renamed if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))),
                         default=0)
        autoencoder = {_ldm_name_or_same(k, levels): v for k, v in renamed.items()}
        autoencoder = {k: v.reshape(*v.shape, 1, 1) if _is_attention_matrix(k) and v.ndim == 2 else v
                       for k, v in autoencoder.items()}
        fmt = "diffusers-weights"
    else:
        fmt = "ldm"
    arch, converted = ldm_to_diffusers(autoencoder, str(path), norm_num_groups)
    vae = build_vae(arch)
    _load_strict(vae, converted, str(path))
    vae.source = {"format": fmt, "path": str(path), "prefix": prefix}
    return vae


def load_vae(
    path: str | Path,
    stats: str | Path | None = None,
    prefix: str | None = None,
    norm_num_groups: int = 32,
) -> VAE:
    """Load a VAE from a sendvae folder, a diffusers AutoencoderKL folder or an LDM checkpoint.

    ``stats`` (optional) replaces the latent statistics (see :func:`load_latent_stats`); otherwise a
    sendvae / exported folder brings its ``latent_stats.json``, a diffusers folder its
    ``scaling_factor`` (std = 1 / factor), and an LDM checkpoint starts at mean 0, std 1.
    ``prefix`` picks the autoencoder inside a checkpoint holding several (e.g. ``first_stage_model.``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"VAE path {path} does not exist")
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() and (path / "vae" / CONFIG_FILE).is_file():
            path = path / "vae"  # a whole diffusers pipeline folder
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise UserError(
                f"{path} is a folder without {CONFIG_FILE}: expected a sendvae VAE folder or a diffusers "
                "AutoencoderKL folder"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_path} is not valid JSON: {exc}") from None
        if config.get("format") == FORMAT_NAME:
            vae = _load_sendvae_folder(path, config)
        elif "_class_name" in config or "block_out_channels" in config:
            vae = _load_diffusers_folder(path, config)
        else:
            raise UserError(
                f"{config_path}: neither a sendvae VAE config (\"format\": \"{FORMAT_NAME}\") nor a diffusers "
                "AutoencoderKL config (_class_name, block_out_channels)"
            )
    elif path.suffix in CHECKPOINT_SUFFIXES:
        vae = _load_checkpoint_file(path, prefix, norm_num_groups)
    else:
        raise UserError(
            f"{path}: unknown VAE format; expected a folder or a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    if stats is not None:
        _attach_stats_file(vae, Path(stats))
        vae.source["stats"] = str(stats)
    logger.info("loaded VAE from %s (%s, preset %s)", path, vae.source["format"], vae.preset or "custom")
    return vae


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_vae(vae: VAE, folder: str | Path) -> Path:
    """Write a sendvae VAE folder (config.json, model.safetensors, latent_stats.json) atomically."""
    from safetensors.torch import save_file

    from sendvae import __version__

    def write(tmp: Path) -> None:
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sendvae_version": __version__,
            "preset": vae.preset,
            "autoencoder": vae.config,
            "source": {k: v for k, v in vae.source.items()},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in vae.autoencoder.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        _write_latent_stats(vae, tmp)

    return atomic_folder(Path(folder), write)


def export_diffusers(vae: VAE, folder: str | Path) -> Path:
    """A diffusers folder loadable by ``AutoencoderKL.from_pretrained(folder)``, plus latent_stats.json.

    The config records the statistics in diffusers' own fields: ``latents_mean`` / ``latents_std``
    with ``scaling_factor`` 1.0, i.e. diffusers' ``(z - latents_mean) * scaling_factor / latents_std``
    is our ``normalize(z)``.
    """

    def write(tmp: Path) -> None:
        vae.autoencoder.save_pretrained(str(tmp), safe_serialization=True)
        config_path = tmp / CONFIG_FILE
        config = json.loads(config_path.read_text())
        config.update(scaling_factor=1.0, shift_factor=None, latents_mean=vae.latent_mean.tolist(),
                      latents_std=vae.latent_std.tolist())
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        _write_latent_stats(vae, tmp)

    return atomic_folder(Path(folder), write)


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


# --------------------------------------------------------------------------------------------
# Latent statistics of a dataset
# --------------------------------------------------------------------------------------------


def _images_of(batch: Any) -> torch.Tensor:
    images = batch["image"] if isinstance(batch, Mapping) else batch
    if not isinstance(images, torch.Tensor):
        raise UserError(f"expected image batches as tensors or dicts with 'image', got {type(images).__name__}")
    if images.dtype == torch.uint8:
        from sendvae.pixels import to_model

        return to_model(images)
    return images.float()


@torch.no_grad()
def compute_latent_stats(
    vae: VAE,
    data: Any,
    num_images: int,
    batch_size: int = 64,
    latent: str = "posterior",
    generator: torch.Generator | None = None,
    autocast_bf16: bool = False,
    num_workers: int = 0,
    subset_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw latent over ``num_images`` images drawn from the whole dataset.

    ``data`` is a Dataset of items ``{"image": uint8 [3, H, W], ...}`` (or a DataLoader of such
    batches, read in its own order). From a Dataset the images are a random subset without
    replacement drawn by a generator seeded with ``subset_seed`` (read in index order), never its
    first ``num_images``: stores are sorted by class folder, so a prefix of 10,000 ImageNet images
    would hold about 8 classes (LightningDiT measures random latents, REPA-E's BatchNorm running
    statistics see shuffled batches). ``latent`` says which latent the statistics describe:

    - ``posterior`` (default): the posterior samples ``z = mean + std * eps`` that stage 2 trains on
      (the latent cache keeps the moments and draws z each step, as REPA does), computed exactly from the
      moments: E[z] = E[mean], E[z^2] = E[mean^2 + std^2]. A channel whose posterior noise exceeds the
      spread of its means would otherwise reach the diffusion model with a variance far above 1.
    - ``mean``: the posterior means only;
    - ``sample``: one posterior sample per image drawn with ``generator``.

    Statistics are taken over all images and positions (float64 sums); std is the population std.
    """
    if latent not in ("posterior", "mean", "sample"):
        raise UserError(f"latent statistics of {latent!r}: use posterior, mean or sample")
    from torch.utils.data import DataLoader, Dataset, Subset
    from tqdm import tqdm

    if num_images < 1:
        raise UserError(f"num_images must be positive, got {num_images}")
    if isinstance(data, Dataset):
        available = len(data)  # type: ignore[arg-type]
        if num_images > available:
            logger.warning("the dataset has %d images, fewer than the %d asked for; using all", available, num_images)
            num_images = available
        chosen = torch.randperm(available, generator=torch.Generator().manual_seed(subset_seed))[:num_images]
        loader: Iterable[Any] = DataLoader(Subset(data, chosen.sort().values.tolist()), batch_size=batch_size,
                                           shuffle=False, num_workers=num_workers)
    else:
        loader = data
    device = vae.latent_mean.device
    channels = vae.latent_channels
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    seen = 0
    was_training = vae.training
    vae.eval()
    with tqdm(total=num_images, desc="latent stats", unit="img", disable=not bars_enabled()) as bar:
        for batch in loader:
            x = _images_of(batch)[: num_images - seen].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                posterior = vae.encode(x)
            z = posterior.sample(generator) if latent == "sample" else posterior.mean
            z = z.double().transpose(0, 1).reshape(channels, -1).cpu()
            total += z.sum(dim=1)
            total_sq += z.pow(2).sum(dim=1)
            if latent == "posterior":
                total_sq += posterior.std.double().transpose(0, 1).reshape(channels, -1).cpu().pow(2).sum(dim=1)
            count += z.shape[1]
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= num_images:
                break
    vae.train(was_training)
    if seen == 0:
        raise UserError("no images to compute latent statistics on")
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


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
