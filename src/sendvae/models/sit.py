"""SiT: the latent flow transformer of stage 2, with the REPA projector (SPEC.md section 4).

The backbone is the DiT/SiT transformer: patch embedding of the latent, a fixed 2D sin-cos position
embedding, a sinusoidal time embedding (256 frequencies) and a class embedding (with a null class for
classifier-free guidance) summed into the condition ``c``, then blocks with adaLN-zero modulation
(LayerNorm without affine, fused-qkv attention through ``F.scaled_dot_product_attention``, tanh-GELU
MLP), and a modulated final linear layer. REPA (Yu et al. 2025) adds a token-wise projector
``MLP d -> 2048 -> 2048 -> D_teacher`` (SiLU) on the hidden states after block ``encoder_depth``; its
output is aligned to the teacher's patch tokens by :func:`repa_loss`.

Time convention: the model takes t with **t = 1 meaning noise** and predicts the velocity
``eps - x`` (``sendvae.transport``), the convention of REPA and REPA-E. Checkpoints of the official
SiT (t = 0 is noise, velocity ``x - eps``) load with ``convention="sit"``: the model then feeds
``1 - t`` to its weights and negates their output, so every caller still speaks this project's
convention.

State dicts use the key names and shapes of the official SiT, REPA and REPA-E models
(``x_embedder.proj``, ``t_embedder.mlp.0/2``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.mlp.fc1/fc2``, ``blocks.N.adaLN_modulation.1``, ``final_layer.linear``,
``final_layer.adaLN_modulation.1``, ``projectors.K.0/2/4``, the ``pos_embed`` buffer, REPA-E's
``bn.*`` latent statistics), so their released weights load with :func:`load_sit`.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sendvae.errors import UserError
from sendvae.pickles import pickle_refusal

log = logging.getLogger(__name__)

Convention = Literal["repa", "sit"]


# --------------------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------------------


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim/2))``, [B, dim]."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim/2))``, [M, dim]."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    k = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """2D sin-cos position embedding for a ``grid x grid`` token map in row-major order, [grid*grid, dim].

    The first half of the channels encodes the column (x) index, the second half the row (y) index
    (the MAE / DiT layout, so released checkpoints' ``pos_embed`` buffers match).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


# --------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches of the latent -> tokens [B, N, d] (key ``x_embedder.proj``).

    The weight keeps the Conv2d layout [d, C, p, p] of the released checkpoints; the forward is one
    matmul over the unfolded patches, which is faster than a strided convolution on CPU.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (h // p) * (w // p), c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal frequencies -> Linear -> SiLU -> Linear (keys ``t_embedder.mlp.0/2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row ``num_classes`` is the null class used for guidance (label dropout)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def drop_labels(labels: torch.Tensor, prob: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes ``null_class`` with probability ``prob``."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# --------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` over [B, heads, N, head_dim] tensors.

    Fused ``F.scaled_dot_product_attention`` everywhere except bf16 on CPU, where PyTorch's fused
    CPU kernel is 3-4x slower than two batched matmuls for the short sequences of latent SiTs
    (measured: 64 tokens, head dim 64, forward + backward); there the scores are formed with a
    matmul, normalised in float32 and applied with a second matmul.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x (1 + scale) + shift`` with per-sample shift/scale [B, d] (one fused kernel)."""
    return torch.addcmul(shift.unsqueeze(1), x, scale.unsqueeze(1) + 1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (keys ``attn.qkv``, ``attn.proj``).

    The qkv output is laid out [3, heads, head_dim] along the features, as in timm's ``Attention``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (keys ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-zero block: ``x += gate_a * attn(mod(LN(x)))``, ``x += gate_m * mlp(mod(LN(x)))``.

    ``adaLN_modulation`` (SiLU, Linear d -> 6d) maps the condition to the six shift/scale/gate vectors;
    it starts at zero so each block starts as the identity (adaLN-zero).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """``c_act`` is the condition after the SiLU (shared by all blocks, computed once)."""
        mod = self.adaLN_modulation[1](c_act)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        h = self.attn(modulate(F.layer_norm(x, (self.dim,), eps=1e-6), shift_a, scale_a))
        x = torch.addcmul(x, gate_a.unsqueeze(1), h)
        h = self.mlp(modulate(F.layer_norm(x, (self.dim,), eps=1e-6), shift_m, scale_m))
        return torch.addcmul(x, gate_m.unsqueeze(1), h)


class FinalLayer(nn.Module):
    """Modulated LayerNorm then Linear d -> p*p*C_out (keys ``final_layer.linear``, ``.adaLN_modulation.1``)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](c_act).chunk(2, dim=-1)
        return self.linear(modulate(F.layer_norm(x, (self.dim,), eps=1e-6), shift, scale))


def build_projector(hidden_size: int, projector_dim: int, teacher_dim: int) -> nn.Sequential:
    """REPA's projector ``Linear d -> 2048 -> SiLU -> 2048 -> SiLU -> D_teacher`` (keys ``.0``, ``.2``, ``.4``)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, teacher_dim),
    )


@dataclass
class SiTArgs:
    """Everything needed to rebuild a :class:`SiT` (written to ``config.json`` of a run)."""

    input_size: int = 32  # latent height = width
    in_channels: int = 4  # latent channels
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the null class is index num_classes
    teacher_dims: list[int] = field(default_factory=list)  # one REPA projector per teacher width; [] = none
    projector_dim: int = 2048
    encoder_depth: int = 8  # the projectors read the hidden states after this block (1-based)
    learn_sigma: bool = False  # official SiT: 2C output channels, of which the first C are the velocity
    qk_norm: bool = False
    latent_bn: bool = False  # REPA-E: non-affine BatchNorm buffers holding the latent statistics
    convention: Convention = "repa"  # time convention of the weights; the forward always speaks ours


class SiT(nn.Module):
    """Class-conditional SiT predicting the velocity ``eps - x`` at time t (t = 1 is noise)."""

    def __init__(self, args: SiTArgs | None = None, **kwargs: Any) -> None:
        super().__init__()
        if args is not None and kwargs:
            raise TypeError("pass either SiTArgs or keyword arguments, not both")
        args = SiTArgs(**kwargs) if args is None else args
        if args.input_size % args.patch_size:
            raise ValueError(f"latent size {args.input_size} is not divisible by the patch size {args.patch_size}")
        if args.teacher_dims and not 1 <= args.encoder_depth <= args.depth:
            raise ValueError(f"encoder_depth {args.encoder_depth} must lie in [1, depth={args.depth}]")
        self.args = args
        d = args.hidden_size
        self.in_channels = args.in_channels
        self.out_channels = 2 * args.in_channels if args.learn_sigma else args.in_channels
        self.num_classes = args.num_classes
        self.null_class = args.num_classes
        self.grid = args.input_size // args.patch_size

        self.x_embedder = PatchEmbed(args.in_channels, d, args.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(args.num_classes, d)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid * self.grid, d), persistent=True)
        self.blocks = nn.ModuleList(
            [SiTBlock(d, args.num_heads, args.mlp_ratio, qk_norm=args.qk_norm) for _ in range(args.depth)]
        )
        self.projectors = nn.ModuleList([build_projector(d, args.projector_dim, dim) for dim in args.teacher_dims])
        self.final_layer = FinalLayer(d, args.patch_size, self.out_channels)
        if args.latent_bn:
            self.bn = nn.BatchNorm2d(args.in_channels, eps=1e-4, affine=False, track_running_stats=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias; N(0, 0.02) label table and time MLP; sin-cos positions.

        Zero at the start: every block's adaLN output (each block begins as the identity: adaLN-zero)
        and the final layer's modulation and linear (the model begins by predicting zero velocity).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for layer in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.pos_embed.copy_(sincos_2d(self.args.hidden_size, self.grid).unsqueeze(0))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, p*p*C] (features ordered p_row, p_col, C) -> latent [B, C, H, W]."""
        b, p, c, g = x.shape[0], self.args.patch_size, self.out_channels, self.grid
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity ``eps - x`` for latents x [B, C, H, W] at times t [B] (t = 1 noise) and labels y [B].

        Labels equal to ``num_classes`` select the null (unconditional) embedding. With
        ``return_tokens`` also returns the projected tokens after block ``encoder_depth``, one
        [B, N, D_teacher] tensor per projector.
        """
        sit_time = self.args.convention == "sit"
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t_model = 1.0 - t if sit_time else t
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c_act = F.silu(self.t_embedder(t_model) + self.y_embedder(y))
        tokens: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = block(h, c_act)
            if return_tokens and i + 1 == self.args.encoder_depth:
                tokens = [projector(h) for projector in self.projectors]
        out = self.unpatchify(self.final_layer(h, c_act))
        if self.args.learn_sigma:
            out = out[:, : self.in_channels]
        if sit_time:
            out = -out
        if return_tokens:
            if not self.projectors:
                raise ValueError("return_tokens=True but this SiT has no REPA projector (teacher_dims is empty)")
            return out, tokens
        return out

    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """REPA-E's per-channel latent (mean, std) from the ``bn`` buffers, or None when absent.

        REPA-E trains on ``(z - mean) / std`` and decodes ``z * std + mean`` with these values; a
        sampler using a REPA-E checkpoint must denormalise with them (not with another VAE's stats).
        """
        if not self.args.latent_bn:
            return None
        return self.bn.running_mean.clone(), self.bn.running_var.sqrt()


# --------------------------------------------------------------------------------------------------
# Loss pieces and FLOP count
# --------------------------------------------------------------------------------------------------


def repa_loss(projected: Sequence[torch.Tensor], teacher_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA alignment: negative cosine similarity per token, averaged over tokens, batch and teachers.

    ``-(1/K) sum_k mean_{b,n} cos(h_k[b, n], y_k[b, n])`` (REPA Eq. 8); it is negative when aligned.
    Computed in float32.
    """
    if len(projected) != len(teacher_tokens):
        raise ValueError(f"{len(projected)} projectors but {len(teacher_tokens)} teacher token sets")
    total = projected[0].new_zeros((), dtype=torch.float32)
    for h, y in zip(projected, teacher_tokens):
        if h.shape != y.shape:
            raise ValueError(f"projected tokens {tuple(h.shape)} and teacher tokens {tuple(y.shape)} differ in shape")
        total = total - F.cosine_similarity(h.float(), y.float(), dim=-1, eps=1e-8).mean()
    return total / len(projected)


def forward_flops(args: SiTArgs, with_projector: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass for one sample, counted analytically.

    Counts the patch embedding, qkv / attention scores / attention values / output projection, the MLP,
    every adaLN linear, the time MLP, the final linear and (optionally) the REPA projectors; the
    elementwise work (norms, activations, residuals) is left out, as in MFU conventions.
    """
    d, n, p = args.hidden_size, (args.input_size // args.patch_size) ** 2, args.patch_size
    hidden = int(d * args.mlp_ratio)
    out_c = 2 * args.in_channels if args.learn_sigma else args.in_channels
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden + 2 * d * 6 * d
    flops = args.depth * per_block
    flops += 2 * n * args.in_channels * p * p * d  # patch embedding
    flops += 2 * 256 * d + 2 * d * d  # time MLP
    flops += 2 * d * 2 * d + 2 * n * d * p * p * out_c  # final layer
    if with_projector:
        for dim in args.teacher_dims:
            flops += 2 * n * (d * args.projector_dim + args.projector_dim**2 + args.projector_dim * dim)
    return int(flops)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

_SIZES: dict[str, tuple[int, int, int]] = {  # name -> (depth, width, heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (4, 128, 4),  # tiny CPU preset (demo, tests)
    "M": (6, 192, 3),  # small CPU preset
}
_ENCODER_DEPTH = {"XL": 8, "L": 8, "B": 4, "S": 4, "T": 2, "M": 3}

PRESETS: tuple[str, ...] = tuple(f"SiT-{size}/{p}" for size in _SIZES for p in (1, 2, 4))


def preset_args(name: str, **overrides: Any) -> SiTArgs:
    """Arguments of preset ``SiT-{XL,L,B,S,M,T}/{1,2,4}``; overrides (input_size, in_channels, ...) apply on top.

    Official sizes: XL 28 blocks / 1152 / 16 heads, L 24 / 1024 / 16, B 12 / 768 / 12, S 12 / 384 / 6;
    REPA's projector depth: 8 for XL and L, 4 for B (and S). T (4 / 128 / 4) and M (6 / 192 / 3) are
    tiny CPU presets.
    """
    match = re.fullmatch(r"SiT-(XL|L|B|S|M|T)/(\d+)", name)
    if not match:
        raise UserError(f"unknown SiT preset {name!r}; choose one of {', '.join(PRESETS)}")
    size, patch = match.group(1), int(match.group(2))
    depth, width, heads = _SIZES[size]
    values: dict[str, Any] = {
        "patch_size": patch, "hidden_size": width, "depth": depth, "num_heads": heads,
        "encoder_depth": _ENCODER_DEPTH[size],
    }
    values.update(overrides)
    return SiTArgs(**values)


def build_sit(name: str, **overrides: Any) -> SiT:
    """A freshly initialised SiT of preset ``name`` (see :func:`preset_args`)."""
    return SiT(preset_args(name, **overrides))


# --------------------------------------------------------------------------------------------------
# Loading released checkpoints
# --------------------------------------------------------------------------------------------------

_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6, 192: 3, 128: 4}


def infer_args(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None,
               encoder_depth: int | None = None, convention: Convention = "repa") -> SiTArgs:
    """Rebuild :class:`SiTArgs` from the key set and shapes of a SiT / REPA / REPA-E state dict.

    Neither the number of heads nor the projector's block is stored in the weights: the heads default
    to the official value for the width, the projector block to 8 (depth >= 24) or 4 (REPA's values).
    """
    try:
        proj = state_dict["x_embedder.proj.weight"]
        pos = state_dict["pos_embed"]
        table = state_dict["y_embedder.embedding_table.weight"]
        final = state_dict["final_layer.linear.weight"]
        fc1 = state_dict["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise UserError(f"not a SiT state dict: key {exc.args[0]} is missing") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(pos.shape[1])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_proj = sum(1 for k in state_dict if re.fullmatch(r"projectors\.\d+\.4\.weight", k))
    teacher_dims = [int(state_dict[f"projectors.{i}.4.weight"].shape[0]) for i in range(n_proj)]
    if num_heads is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise UserError(f"cannot tell the number of heads of a width-{hidden} SiT; pass num_heads")
        num_heads = _HEADS_BY_WIDTH[hidden]
    return SiTArgs(
        input_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / hidden,
        num_classes=table.shape[0] - 1,
        teacher_dims=teacher_dims,
        projector_dim=int(state_dict["projectors.0.0.weight"].shape[0]) if n_proj else 2048,
        encoder_depth=encoder_depth or (8 if depth >= 24 else 4),
        learn_sigma=final.shape[0] == 2 * in_channels * patch * patch,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        latent_bn="bn.running_mean" in state_dict,
        convention=convention,
    )


def read_checkpoint(path: str | Path, prefer: Literal["ema", "model"] = "ema") -> dict[str, torch.Tensor]:
    """The SiT weights in a ``.safetensors`` file or a torch checkpoint (``{"ema", "model", ...}`` or bare).

    Torch files load with ``weights_only=True``; REPA / REPA-E checkpoints also hold a pickled
    ``argparse.Namespace`` of their arguments, which is allowed as data and otherwise ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SiT checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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
    sendvae: t = 1 noise) or ``"sit"`` (official SiT: t = 0 noise, opposite velocity). ``"auto"``
    picks ``"sit"`` for a checkpoint with 2C output channels and no projector (the official SiT
    layout) and ``"repa"`` otherwise. The returned model always speaks this project's convention.
    Its ``latent_statistics()`` holds REPA-E's BatchNorm latent statistics when the checkpoint has them.
    A folder is read as a ``train-sit`` run (``RUN`` or ``RUN/sit``, see
    :func:`sendvae.train.sit.load_sit_run`; ``prefer`` picks EMA or raw weights).
    """
    if Path(path).is_dir():
        from sendvae.train.sit import load_sit_run

        return load_sit_run(path, weights=prefer).model
    state = read_checkpoint(path, prefer)
    args = infer_args(state, num_heads=num_heads, encoder_depth=encoder_depth)
    if convention == "auto":
        convention = "sit" if args.learn_sigma and not args.teacher_dims else "repa"
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
        f"projectors {args.teacher_dims or 'none'}, learn_sigma {args.learn_sigma}, convention {args.convention}"
    )


def args_to_dict(args: SiTArgs) -> dict[str, Any]:
    """JSON-friendly form of :class:`SiTArgs`."""
    return asdict(args)


def args_from_dict(data: Mapping[str, Any]) -> SiTArgs:
    """Inverse of :func:`args_to_dict` (unknown keys are an error that names them)."""
    known = set(SiTArgs.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown SiT argument(s) {unknown}; known: {sorted(known)}")
    return SiTArgs(**dict(data))
