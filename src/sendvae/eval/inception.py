"""The feature extractors behind the generation metrics: ADM's InceptionV3 features, and teacher features.

ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) runs the TensorFlow graph
``classify_image_graph_def.pb`` (Inception 2015-12-05) on uint8 images and reads three things:

- ``pool_3:0``: the 2048-d pooled features, for FID, precision / recall (and KID here);
- ``mixed_6/conv:0``, first 7 channels: the spatial features for sFID. ``mixed_6`` is the seventh
  Inception block (torch-fidelity's ``Mixed_6d``; the blocks are ``mixed`` .. ``mixed_10`` =
  ``Mixed_5b`` .. ``Mixed_7c``) and ``conv`` its 1x1 branch after batch norm and ReLU
  (``Mixed_6d.branch1x1``), a [17, 17, 768-branch] map of which channels 0..6 are kept and
  flattened in TensorFlow's (H, W, C) order: 17 * 17 * 7 = 2023 numbers;
- the logits ``pool_3 @ W`` without the bias (``softmax/logits/MatMul``), 1008 classes, for the
  Inception Score.

torch-fidelity's ``FeatureExtractorInceptionV3`` is a PyTorch port of that graph (TF1's bilinear
resize to 299, the same normalisation, TF-style average pooling) whose ``2048`` and
``logits_unbiased`` outputs are these features; the spatial map is read with a forward hook on
``Mixed_6d.branch1x1``. Its weights come from a local file (nothing downloads): the pytorch-fid /
torch-fidelity conversion of the TF graph, ``pt_inception-2015-12-05-6726825d.pth`` (or
``weights-inception-2015-12-05-6726825d.pth``), given by path, by ``$SENDVAE_INCEPTION``, or found in
the torch hub cache. The file is read with ``torch.load(weights_only=True)`` (or safetensors).

Other feature spaces for the Frechet distance:

- :class:`DinoV2Features`, EDM2's FD_DINOv2 (Karras et al. 2024, "Analyzing and improving the
  training dynamics of diffusion models"): the final-norm CLS token of DINOv2-L/14 at 224 px
  (uint8 -> /255 -> bicubic resize to 224 -> ImageNet mean/std), weights from a local file through
  the teacher registry;
- :class:`TeacherFeatures`: any :mod:`sendvae.models.teachers` teacher, its patch tokens mean-pooled
  (the offline default is ``effnet-lite0``).

Each extractor carries ``protocol``: a JSON-ready description (implementation, weights file and
sha256, resize, normalisation, features) that ``sendvae evaluate`` writes next to its numbers.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sendvae.errors import UserError
from sendvae.pickles import pickle_refusal

log = logging.getLogger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILE_ALIASES = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "SENDVAE_INCEPTION"
INCEPTION_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF "mixed_6/conv"
SPATIAL_CHANNELS = 7


class FeatureExtractor(Protocol):
    """Maps uint8 images [B, 3, H, W] (on ``device``) to named float features, one row per image."""

    name: str
    device: torch.device
    protocol: dict[str, Any]  # how the features are computed, for the metrics file

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def weights_record(path: str | Path | None) -> dict[str, Any]:
    """``{"weights": path, "weights_sha256": hex}`` of a weights file (a folder's files are not hashed)."""
    from sendvae.train.checkpoint import sha256_file

    if path is None:
        return {"weights": None, "weights_sha256": None}
    path = Path(path)
    return {"weights": str(path), "weights_sha256": sha256_file(path) if path.is_file() else None}


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$SENDVAE_INCEPTION``, else the torch hub cache; or a UserError."""
    if path is None:
        path = os.environ.get(INCEPTION_ENV) or None
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        raise UserError(f"Inception weights file {path} does not exist. {_where_to_get()}")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILE_ALIASES:
        if (cache / name).is_file():
            return cache / name
    raise UserError(f"no Inception weights given and none in {cache}. {_where_to_get()}")


def _where_to_get() -> str:
    return (
        f"FID/sFID/IS need the TF-compatible InceptionV3 weights {INCEPTION_FILE}: download it on a machine "
        f"with internet from {INCEPTION_URLS[0]} (or torch-fidelity's copy, {INCEPTION_URLS[1]}), then pass "
        f"--inception PATH or set {INCEPTION_ENV}=PATH"
    )


def read_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors, or a torch file read with ``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"Inception weights: {pickle_refusal(path, exc)}") from None
        except Exception as exc:  # other unreadable files come in many types
            raise UserError(f"cannot read Inception weights {path} with weights_only=True: {exc}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an Inception state dict (expected a mapping of tensors)")
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


class InceptionFeatures(nn.Module):
    """ADM's Inception features: ``pool`` [B, 2048], ``logits`` [B, 1008] (no bias), ``spatial`` [B, 2023].

    ``dtype`` is the network's internal precision (float32, or float64 for exact comparisons).
    """

    name = "inception"

    def __init__(
        self, weights: str | Path | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights)
        state = read_inception_state(path)
        buffer = io.BytesIO()  # torch-fidelity reads its weights with torch.load: hand it the checked tensors
        torch.save(state, buffer)
        buffer.seek(0)
        if dtype not in (torch.float32, torch.float64):
            raise UserError(f"Inception dtype must be float32 or float64, got {dtype}")
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
            )
        except RuntimeError as exc:
            raise UserError(f"{path} does not fit the TF-compatible InceptionV3 ({str(exc).splitlines()[0]})") from None
        # Set the precision here: torch-fidelity 0.4 maps its "float64" option to float32.
        self.net.feature_extractor_internal_dtype = dtype
        self.net.to(dtype)
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        self.device = torch.device(device)
        self.to(self.device)
        self.protocol = {
            "implementation": "torch-fidelity FeatureExtractorInceptionV3 ('inception-v3-compat'), a PyTorch port "
            "of the TF graph classify_image_graph_def.pb (2015-12-05) that ADM's evaluator runs",
            **weights_record(path),
            "input": "uint8 images as float, TF1-style bilinear resize to 299 (torch-fidelity), (x - 128) / 128",
            "features": "pool_3 (2048) for FID, precision/recall, KID; mixed_6/conv channels 0..6 in (H, W, C) "
            "order (2023) for sFID; logits without bias (1008) for IS",
            "dtype": str(dtype).removeprefix("torch."),
        }
        log.info("Inception features from %s (%s)", path, dtype)

    def _keep_spatial(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # [B, C, 17, 17] -> first 7 channels -> (H, W, C) order as TensorFlow flattens NHWC -> [B, 2023]
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "logits": logits, "spatial": spatial}


class TeacherFeatures(nn.Module):
    """A frozen teacher's patch tokens, mean-pooled to one vector per image: ``pool`` [B, dim]."""

    def __init__(self, name: str, weights: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from sendvae.models.teachers import build_teacher

        self.name = name
        self.teacher = build_teacher(name, weights=weights)
        self.device = torch.device(device)
        self.to(self.device)
        self.protocol = {
            "implementation": f"sendvae teacher {name}: patch tokens mean-pooled to one vector per image",
            **weights_record(weights),
            "input": f"uint8 -> /255 -> the teacher's mean/std -> {self.teacher.resize} resize to "
            f"{self.teacher.input_size} px",
            "features": f"mean of {self.teacher.grid}x{self.teacher.grid} tokens ({self.teacher.dim})",
        }

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.teacher(images.to(self.device))
        return {"pool": tokens.float().mean(dim=1)}


DINOV2_FD_TEACHER = "dinov2-l"  # EDM2's FD_DINOv2 network: ViT-L/14
DINOV2_FD_GRID = 16  # 16 x 14 = 224 px input


class DinoV2Features(nn.Module):
    """EDM2's FD_DINOv2 features: ``pool`` [B, 1024] = the final-norm CLS token of DINOv2-L/14 at 224 px.

    Input as EDM2: uint8 -> /255 -> bicubic resize to 224 x 224 -> ImageNet mean/std (the teacher
    registry's preprocessing normalises first and resizes with antialiasing; normalising is per-channel
    affine, so the order does not matter). ``weights``: timm or Meta's ``dinov2_vitl14_pretrain.pth``
    (``model_kwargs`` shrink the network for tests).
    """

    name = "dinov2"

    def __init__(
        self, weights: str | Path, device: torch.device | str = "cpu", model_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        from sendvae.models.teachers import build_teacher

        self.teacher = build_teacher(DINOV2_FD_TEACHER, weights=weights, grid=DINOV2_FD_GRID, antialias=True,
                                     model_kwargs=model_kwargs)
        self.device = torch.device(device)
        self.to(self.device)
        self.protocol = {
            "implementation": "DINOv2-L/14 (timm vit_large_patch14_dinov2) CLS token after the final norm "
            "(EDM2's FD_DINOv2)",
            **weights_record(weights),
            "input": "uint8 -> /255 -> bicubic (antialiased) resize to 224 -> ImageNet mean/std",
            "features": f"CLS token ({self.teacher.dim})",
        }

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.teacher.preprocess(images.to(self.device))
        tokens = self.teacher.model.forward_features(x)  # [B, prefix + patches, dim], final norm applied
        return {"pool": tokens[:, 0].float()}


def build_feature_extractor(spec: str, device: torch.device | str = "cpu") -> TeacherFeatures:
    """A teacher feature space from ``NAME`` or ``NAME:WEIGHTS`` (``effnet-lite0``, ``dinov2-b:/ckpt/dinov2.pth``)."""
    name, _, weights = spec.partition(":")
    return TeacherFeatures(name, weights or None, device)
