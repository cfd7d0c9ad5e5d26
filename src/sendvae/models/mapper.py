"""Send-VAE's non-linear mapper h_phi and its noise injection (SPEC section 2, steps 3-4).

The mapper sits between the (normalised, noised) VAE latent and the frozen teacher's tokens, so
the alignment loss (SPEC Eq. 2) does not force dense global semantics onto the latent directly.
It is trained with the VAE and thrown away afterwards (not part of the exported VAE):

    z_t [B, C, h, w]
      -> patch embedding: conv, kernel = stride = p = latent_grid // teacher_grid, C -> width
         (so the token grid equals the teacher grid: f16 latent 16x16 with p = 1, f8 32x32 with p = 2)
      -> + fixed 2D sin-cos positional embedding (not trained)
      -> depth x ViT block (timm ``Block``; heads = width / 64: 12 for 768-d, 16 for 1024-d; depth 0
         allowed, the paper's best is 1)
      -> MLP projector width -> mlp_hidden -> mlp_hidden -> teacher_dim with SiLU (REPA's shape)
      -> [B, N, teacher_dim]

Noise injection (SPEC Eq. 1): ``z_t = (1 - a) eps + a z`` with ``a ~ U(0, 1)`` per sample. In this
project's time convention (t = 1 is noise, ``sendvae.transport``) that is ``t = 1 - a`` and
``z_t = (1 - t) z + t eps`` with ``t ~ U(0, 1)``; switched off, ``z_t = z`` (t = 0).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from sendvae.transport import interpolate, sample_time


def noise_injection(
    z: torch.Tensor, generator: torch.Generator | None = None, enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC Eq. 1: ``(z_t, t)`` with ``t ~ U(0, 1)`` per sample, ``z_t = (1 - t) z + t eps``.

    ``t`` has shape [B] (float32, on z's device). ``enabled=False`` returns ``(z, zeros)``: the
    "no noise" ablation. Random numbers come from ``generator`` (on its own device) when given.
    """
    batch = z.shape[0]
    if not enabled:
        return z, torch.zeros(batch, device=z.device)
    device = generator.device if generator is not None else z.device
    t = sample_time(batch, "uniform", generator=generator, device=device).to(z.device)
    eps = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float32).to(z.device, z.dtype)
    return interpolate(z, eps, t), t


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid * grid, dim] for a row-major token grid.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``, k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    positions = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def projector_mlp(width: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: Linear(width, hidden) SiLU Linear(hidden, hidden) SiLU Linear(hidden, out_dim)."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
    )


class Mapper(nn.Module):
    """h_phi: noised latent [B, C, h, w] -> predicted teacher tokens [B, teacher_grid^2, teacher_dim]."""

    def __init__(
        self,
        latent_channels: int,
        latent_grid: int,
        teacher_dim: int,
        teacher_grid: int,
        depth: int = 1,  # ViT blocks; 0 = patch embedding + projector only
        width: int | None = None,  # token width inside the mapper; None = teacher_dim (the paper)
        heads: int | None = None,  # attention heads; None = width // 64 (at least 1)
        mlp_hidden: int = 2048,  # projector hidden width (REPA: 2048)
        mlp_ratio: float = 4.0,  # ViT block MLP width / token width
    ) -> None:
        super().__init__()
        if teacher_grid <= 0 or latent_grid % teacher_grid:
            raise ValueError(
                f"mapper: latent grid {latent_grid} is not a multiple of the teacher grid {teacher_grid}; "
                "choose the teacher's grid (or image size) so that latent_grid = patch * teacher_grid"
            )
        if depth < 0:
            raise ValueError(f"mapper: depth must be >= 0, got {depth}")
        width = teacher_dim if width is None else width
        heads = max(1, width // 64) if heads is None else heads
        if width % heads:
            raise ValueError(f"mapper: width {width} is not divisible by {heads} heads")
        self.latent_channels = latent_channels
        self.latent_grid = latent_grid
        self.teacher_grid = teacher_grid
        self.teacher_dim = teacher_dim
        self.patch = latent_grid // teacher_grid
        self.width = width
        self.heads = heads
        self.patch_embed = nn.Conv2d(latent_channels, width, kernel_size=self.patch, stride=self.patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, teacher_grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.projector = projector_mlp(width, mlp_hidden, teacher_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Linear layers: truncated normal (std 0.02), zero bias; the patch embedding like a linear
        layer on the flattened patch (Xavier uniform); LayerNorms: timm's default (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, z_t: torch.Tensor) -> torch.Tensor:
        expected = (self.latent_channels, self.latent_grid, self.latent_grid)
        if tuple(z_t.shape[1:]) != expected:
            raise ValueError(f"mapper expects latents [B, {', '.join(map(str, expected))}], got {tuple(z_t.shape)}")
        x = self.patch_embed(z_t).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.projector(x)

    def extra_repr(self) -> str:
        return (
            f"latent {self.latent_channels}x{self.latent_grid}x{self.latent_grid} -> patch {self.patch} -> "
            f"{self.teacher_grid}x{self.teacher_grid} tokens, width {self.width}, heads {self.heads}, "
            f"depth {len(self.blocks)} -> {self.teacher_dim}"
        )
