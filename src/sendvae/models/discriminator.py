"""The hinge PatchGAN discriminator of the VAE's GAN loss (SPEC section 2, step 7: L_VAE's GAN term).

Architecture and parameter names follow the LDM / taming-transformers ``NLayerDiscriminator``
(pix2pix PatchGAN), so pretrained LDM and REPA-E discriminator weights load as they are:

    main.0   Conv 4x4 stride 2, in -> ndf (with bias), LeakyReLU 0.2
    main.2.. n_layers x [Conv 4x4 (stride 2, the last stride 1), no bias; norm; LeakyReLU 0.2],
             widths ndf * min(2^n, 8)
    last     Conv 4x4 stride 1 -> 1 logit per patch

The norm is BatchNorm (LDM and REPA-E use this; default) or taming's ActNorm (``norm="act"``,
convs then have a bias). Initialisation as taming: conv weights N(0, 0.02), BatchNorm weights
N(1, 0.02), biases 0. Output: patch logits [B, 1, h', w'] (30x30 for 256 px and 3 layers).
The losses on these logits (hinge) are in ``sendvae.losses``.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch
from torch import nn

from sendvae.errors import UserError
from sendvae.models.teachers import read_state_dict

logger = logging.getLogger(__name__)

NormKind = Literal["batch", "act"]
# Prefixes under which training checkpoints keep the discriminator (REPA-E, LDM Lightning, DDP, compile).
DISCRIMINATOR_PREFIXES = ("loss.discriminator.", "discriminator.", "module.", "_orig_mod.")


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialised from the first training batch (taming)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized) == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_(1.0 / (flat.std(1).view_as(self.scale) + 1e-6))
                self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class PatchDiscriminator(nn.Module):
    """PatchGAN: images [B, in_channels, H, W] in [-1, 1] -> patch logits [B, 1, h', w']."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: NormKind = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"discriminator: n_layers must be >= 1, got {n_layers}")
        if norm not in ("batch", "act"):
            raise ValueError(f"discriminator: norm must be 'batch' or 'act', got {norm!r}")
        self.in_channels, self.ndf, self.n_layers, self.norm = in_channels, ndf, n_layers, norm
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=norm == "act"),
                nn.BatchNorm2d(out) if norm == "batch" else ActNorm(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """taming's ``weights_init``: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def discriminator_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``main.*`` tensors of a discriminator, its training-checkpoint prefixes stripped."""
    out = dict(state)
    for prefix in DISCRIMINATOR_PREFIXES:
        if any(k.startswith(prefix + "main.") for k in out):
            out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def _architecture_from_keys(state: dict[str, torch.Tensor], path: str) -> tuple[int, int, int, NormKind]:
    """(in_channels, ndf, n_layers, norm) read off the tensor shapes of an NLayerDiscriminator."""
    conv_ids = sorted(
        int(k.split(".")[1])
        for k, v in state.items()
        if k.startswith("main.") and k.endswith(".weight") and v.dim() == 4
    )
    if not conv_ids or "main.0.weight" not in state:
        raise UserError(
            f"discriminator weights {path}: no NLayerDiscriminator tensors (main.0.weight ...); "
            f"found keys {sorted(state)[:8]}"
        )
    first = state["main.0.weight"]
    norm: NormKind = "act" if any(k.endswith(".loc") for k in state) else "batch"
    return int(first.shape[1]), int(first.shape[0]), len(conv_ids) - 2, norm


def load_discriminator(path: str | os.PathLike[str]) -> PatchDiscriminator:
    """A :class:`PatchDiscriminator` with the weights of ``path`` (safetensors or weights-only torch file).

    Accepts a bare discriminator state dict or a checkpoint that keeps it under ``discriminator.``
    / ``loss.discriminator.`` (LDM) or a ``"discriminator"`` entry (REPA-E). The architecture
    (input channels, ndf, layers, norm) is read from the tensor shapes. Every key must match:
    otherwise a :class:`UserError` lists the missing and unexpected keys.
    """
    path = os.fspath(path)
    state = discriminator_state_dict(read_state_dict(path, "discriminator weights", entry="discriminator"))
    in_channels, ndf, n_layers, norm = _architecture_from_keys(state, path)
    model = PatchDiscriminator(in_channels, ndf, n_layers, norm)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"discriminator weights {path} do not fit PatchDiscriminator(in_channels={in_channels}, ndf={ndf}, "
            f"n_layers={n_layers}, norm={norm!r}): missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"discriminator weights {path}: {exc}") from exc
    logger.info("discriminator: loaded %s (ndf %d, %d layers, %s norm)", path, ndf, n_layers, norm)
    return model
