"""SiT checkpoint formats: released SiT / REPA / REPA-E / LightningDiT files and ``train-sit`` run folders.

- Released checkpoints (a ``.safetensors`` file or a torch file read with ``weights_only=True``) carry
  only weights: :func:`infer_args` rebuilds the architecture from the key set and shapes, and
  :func:`load_sit` loads them in the time convention they were trained in (see :mod:`sendvae.models.sit`).
- A ``train-sit`` run publishes ``RUN/sit/``: ``config.json`` (``"format": "sendvae-sit"``, the model
  arguments, classes, latent shape, VAE path and fingerprint, teacher), ``ema.safetensors`` and
  ``model.safetensors``. :func:`save_sit_folder` writes it as one folder and :func:`load_sit_run`
  reads it back, for the sampler and for :func:`load_sit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sendvae.atomic import atomic_folder
from sendvae.errors import UserError
from sendvae.models.sit import Convention, SiT, SiTArgs, args_from_dict, args_to_dict, mlp_hidden_size
from sendvae.pickles import pickle_refusal

log = logging.getLogger(__name__)

RUN_FORMAT = "sendvae-sit"


# --------------------------------------------------------------------------------------------------
# Loading released checkpoints
# --------------------------------------------------------------------------------------------------

_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6, 192: 3, 128: 4}


def infer_args(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None,
               encoder_depth: int | None = None, convention: Convention = "repa") -> SiTArgs:
    """Rebuild :class:`SiTArgs` from the key set and shapes of a SiT / REPA / REPA-E / LightningDiT state dict.

    The architecture options show in the keys (``mlp.w12``: SwiGLU, ``norm1.weight``: RMSNorm,
    ``feat_rope.*``: 2-D RoPE, ``attn.q_norm.weight``: QK-norm). The projector's block is not stored in
    the weights: it defaults to REPA's 8 (depth >= 24) or 4, and a checkpoint with projectors and fewer
    blocks than that needs ``encoder_depth``. Nor are the heads, except through a RoPE buffer's head
    width: otherwise they default to the official value for the width.
    """
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    try:
        proj = state_dict["x_embedder.proj.weight"]
        pos = state_dict["pos_embed"]
        table = state_dict["y_embedder.embedding_table.weight"]
        final = state_dict["final_layer.linear.weight"]
        modulation = state_dict["blocks.0.adaLN_modulation.1.weight"]
        mlp_width = (state_dict["blocks.0.mlp.w3.weight"].shape[1] if swiglu
                     else state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise UserError(f"not a SiT state dict: key {exc.args[0]} is missing") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if modulation.shape[0] != 6 * hidden:
        raise UserError(f"blocks.0.adaLN_modulation.1 has {modulation.shape[0]} outputs, not 6 x {hidden}: "
                        "shift-free adaLN (LightningDiT's wo_shift) is not supported")
    grid = math.isqrt(pos.shape[1])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_proj = sum(1 for k in state_dict if re.fullmatch(r"projectors\.\d+\.4\.weight", k))
    teacher_dims = [int(state_dict[f"projectors.{i}.4.weight"].shape[0]) for i in range(n_proj)]
    if num_heads is None and "feat_rope.freqs_cos" in state_dict:
        num_heads = hidden // state_dict["feat_rope.freqs_cos"].shape[1]
    if num_heads is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise UserError(f"cannot tell the number of heads of a width-{hidden} SiT; pass num_heads")
        num_heads = _HEADS_BY_WIDTH[hidden]
    if not encoder_depth:
        encoder_depth = 8 if depth >= 24 else 4
        if n_proj and encoder_depth > depth:
            raise UserError(
                f"this {depth}-block SiT has a REPA projector, but the block it reads is not stored in the "
                f"weights and REPA's default ({encoder_depth}) exceeds the depth: pass encoder_depth=K "
                f"(load_sit(path, encoder_depth=K)) with K in [1, {depth}], the value it was trained with")
    elif n_proj and not 1 <= encoder_depth <= depth:
        raise UserError(f"encoder_depth={encoder_depth} must lie in [1, {depth}] for this {depth}-block SiT")
    args = SiTArgs(
        input_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        # SwiGLU keeps 2/3 of int(d * ratio): the ratio to two decimals that gives its width back
        mlp_ratio=round(1.5 * mlp_width / hidden, 2) if swiglu else mlp_width / hidden,
        num_classes=table.shape[0] - 1,
        teacher_dims=teacher_dims,
        projector_dim=int(state_dict["projectors.0.0.weight"].shape[0]) if n_proj else 2048,
        encoder_depth=encoder_depth,
        learn_sigma=final.shape[0] == 2 * in_channels * patch * patch,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        pos="rope2d" if "feat_rope.freqs_cos" in state_dict else "sincos",
        mlp="swiglu" if swiglu else "gelu",
        norm="rmsnorm" if "blocks.0.norm1.weight" in state_dict else "layernorm",
        latent_bn="bn.running_mean" in state_dict,
        convention=convention,
    )
    if mlp_hidden_size(args) != mlp_width:
        raise UserError(f"cannot rebuild a width-{mlp_width} SwiGLU from mlp_ratio {args.mlp_ratio} and width {hidden}")
    return args


def read_checkpoint(path: str | Path, prefer: Literal["ema", "model"] = "ema") -> dict[str, torch.Tensor]:
    """The SiT weights in a ``.safetensors`` file or a torch checkpoint (``{"ema", "model", ...}`` or bare).

    Torch files load with ``weights_only=True``; REPA / REPA-E checkpoints also hold a pickled
    ``argparse.Namespace`` of their arguments, which is allowed as data and otherwise ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SiT checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state: Any = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"SiT checkpoint: {pickle_refusal(path, exc)}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise UserError(f"cannot read SiT checkpoint {path} with weights_only=True: {exc}") from None
    if isinstance(state, Mapping):
        for key in (prefer, "ema", "model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no SiT state dict (expected tensors, or an 'ema' / 'model' entry)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_sit(
    path: str | Path,
    convention: Convention | Literal["auto"] = "auto",
    *,
    prefer: Literal["ema", "model"] = "ema",
    num_heads: int | None = None,
    encoder_depth: int | None = None,
) -> SiT:
    """Load a released SiT / REPA / REPA-E checkpoint, a SiT safetensors file or a ``train-sit`` run.

    ``convention`` names the time convention the weights were trained in: ``"repa"`` (REPA, REPA-E,
    sendvae: t = 1 noise) or ``"sit"`` (official SiT and LightningDiT: t = 0 noise, opposite velocity).
    ``"auto"`` picks ``"sit"`` for a checkpoint without projector that has 2C output channels (the
    official SiT layout) or any LightningDiT option (RoPE, SwiGLU, RMSNorm), and ``"repa"`` otherwise;
    pass it explicitly for a file of this project's own projector-less LightningDiT-style SiT. The
    returned model always speaks this project's convention. ``num_heads`` and ``encoder_depth`` (the
    REPA projector's block) are not stored in released weights: see :func:`infer_args`.
    Its ``latent_statistics()`` holds REPA-E's BatchNorm latent statistics when the checkpoint has them.
    A folder is read as a ``train-sit`` run (``RUN`` or ``RUN/sit``, see :func:`load_sit_run`;
    ``prefer`` picks EMA or raw weights).
    """
    if Path(path).is_dir():
        return load_sit_run(path, weights=prefer).model
    state = read_checkpoint(path, prefer)
    args = infer_args(state, num_heads=num_heads, encoder_depth=encoder_depth)
    if convention == "auto":
        lightning = (args.pos, args.mlp, args.norm) != ("sincos", "gelu", "layernorm")
        convention = "sit" if (args.learn_sigma or lightning) and not args.teacher_dims else "repa"
        log.info("%s: assuming the %s time convention (pass convention= to override)", path, convention)
    if convention not in ("repa", "sit"):
        raise UserError(f"convention must be 'repa', 'sit' or 'auto', got {convention!r}")
    args.convention = convention
    with torch.device("meta"):
        model = SiT(args)
    if args.latent_bn and "bn.num_batches_tracked" not in state:
        state = {**state, "bn.num_batches_tracked": torch.zeros((), dtype=torch.long)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(
            f"{path} does not match the SiT layout inferred from it ({describe_args(args)}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("loaded %s: %s", path, describe_args(args))
    return model.eval()


def describe_args(args: SiTArgs) -> str:
    """One line naming a SiT's size, e.g. ``depth 28, width 1152, 16 heads, patch 2, 4x32x32 latents``."""
    return (
        f"depth {args.depth}, width {args.hidden_size}, {args.num_heads} heads, patch {args.patch_size}, "
        f"{args.in_channels}x{args.input_size}x{args.input_size} latents, {args.num_classes} classes, "
        f"projectors {args.teacher_dims or 'none'}, learn_sigma {args.learn_sigma}, convention {args.convention}, "
        f"pos {args.pos}, mlp {args.mlp}, norm {args.norm}, qk_norm {args.qk_norm}"
    )


# --------------------------------------------------------------------------------------------------
# train-sit run folders
# --------------------------------------------------------------------------------------------------


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # a DDP wrapper
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_sit_folder(folder: Path, ema: nn.Module, model: nn.Module, info: dict[str, Any]) -> Path:
    """Write ``folder/{config.json, ema.safetensors, model.safetensors}`` atomically (as one folder)."""
    sit: SiT = getattr(model, "module", model)
    config = {"format": RUN_FORMAT, "model": args_to_dict(sit.args), **info}

    def write(tmp: Path) -> None:
        for name, module in (("ema", ema), ("model", model)):
            save_file(_state(module), str(tmp / f"{name}.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    return atomic_folder(folder, write)


@dataclass
class SiTRun:
    """A trained SiT read back from ``RUN/sit``: the model and what the sampler needs to decode."""

    model: SiT
    config: dict[str, Any]
    folder: Path

    @property
    def vae_path(self) -> str:
        return str(self.config["vae"]["path"])

    @property
    def vae_fingerprint(self) -> str:
        return str(self.config["vae"]["fingerprint"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.config["latent_shape"]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])


def load_sit_run(run_or_folder: str | Path, weights: Literal["ema", "model"] = "ema",
                 device: str | torch.device = "cpu") -> SiTRun:
    """Load ``RUN/sit`` (or the ``sit`` folder itself) written by ``train-sit``; EMA weights by default."""
    folder = Path(run_or_folder)
    if not (folder / "config.json").is_file() and (folder / "sit" / "config.json").is_file():
        folder = folder / "sit"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{run_or_folder} holds no trained SiT ({config_path} is missing; is the run finished?)")
    config = json.loads(config_path.read_text())
    if config.get("format") != RUN_FORMAT:
        raise UserError(f"{config_path} has format {config.get('format')!r}, expected {RUN_FORMAT!r}")
    weights_path = folder / f"{weights}.safetensors"
    if not weights_path.is_file():
        raise UserError(f"{weights_path} is missing")
    with torch.device("meta"):
        model = SiT(args_from_dict(config["model"]))
    try:
        state = load_file(str(weights_path), device=str(device))
    except SafetensorError as exc:
        raise UserError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return SiTRun(model.eval(), config, folder)
