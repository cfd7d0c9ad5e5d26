"""The pixel convention (DESIGN.md section 2), in one place.

uint8 HWC on disk and in npz files; the model sees float ``x / 127.5 - 1`` in [-1, 1], CHW; model
output goes back to uint8 with ``round(clamp((x + 1) * 127.5, 0, 255))``.
"""

from __future__ import annotations

import torch


def to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (or [3, H, W]) -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 with rounding (values outside the range are clamped)."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


def hwc_to_chw(images: torch.Tensor) -> torch.Tensor:
    """[..., H, W, C] -> [..., C, H, W] (a view)."""
    return images.movedim(-1, -3)


def chw_to_hwc(images: torch.Tensor) -> torch.Tensor:
    """[..., C, H, W] -> [..., H, W, C] (a view)."""
    return images.movedim(-3, -1)
