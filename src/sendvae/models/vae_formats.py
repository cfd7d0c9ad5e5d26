"""VAE checkpoint formats: sendvae folders, diffusers folders, LDM checkpoints, and their key maps.

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

Latent statistics files (:func:`load_latent_stats`): our ``latent_stats.json``, REPA-E's
``*-latents-stats.pt`` and LightningDiT-style tensor files. :func:`save_vae` writes a sendvae folder
and :func:`export_diffusers` a diffusers one, each as a whole folder (:func:`sendvae.atomic.atomic_folder`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sendvae.atomic import atomic_folder
from sendvae.errors import UserError
from sendvae.models.vae import VAE, VAEArch, build_vae, meta_autoencoder
from sendvae.pickles import flatten_tensors, pickle_refusal

logger = logging.getLogger(__name__)

FORMAT_NAME = "sendvae-vae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "latent_stats.json"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


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
    num_levels = len(arch.block_out_channels)
    return {diffusers_key_to_ldm(k, num_levels): k for k in meta_autoencoder(arch).state_dict()}


def _is_attention_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", ldm_key))


def _meta_state_shapes(arch: VAEArch) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in meta_autoencoder(arch).state_dict().items()}


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
