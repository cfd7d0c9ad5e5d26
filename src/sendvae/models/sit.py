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
``bn.*`` latent statistics), so their released weights load with
:func:`sendvae.models.sit_formats.load_sit`.

Architecture options (:class:`SiTArgs`; the defaults are the REPA / REPA-E SiT above), each the
choice of LightningDiT (Yao et al. 2025, ``hustvl/LightningDiT`` ``models/lightningdit.py``), whose
key names they keep so its checkpoints load too:

- ``pos="rope2d"``: a 2-D rotary embedding of queries and keys in every block (RoPE, Su et al. 2021, in
  the axial 2-D form of EVA-02), on top of the fixed sin-cos embedding (LightningDiT keeps both);
  buffers ``feat_rope.freqs_cos/freqs_sin``.
- ``mlp="swiglu"``: ``W3 (silu(W1 x) * W2 x)`` (Shazeer 2020) with two thirds of the GELU MLP's hidden
  width, so the same parameter count; keys ``mlp.w12`` (W1 and W2 stacked) and ``mlp.w3``.
- ``norm="rmsnorm"``: RMSNorm with a learnt scale (Zhang & Sennrich 2019) in place of the LayerNorms of
  the blocks, the final layer and (with ``qk_norm``) the queries and keys; keys ``blocks.N.norm1/norm2``,
  ``final_layer.norm_final``, ``blocks.N.attn.q_norm/k_norm``.
- ``qk_norm``: a norm on each head's queries and keys before attention (timm's affine LayerNorm, or
  RMSNorm with ``norm="rmsnorm"``).

The ``LightningDiT-*`` presets turn on RoPE, SwiGLU and RMSNorm (LightningDiT's released XL/1 recipe,
QK-norm off). LightningDiT's checkpoints are trained with t = 0 as noise: they load with ``convention="sit"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from sendvae.errors import UserError

Convention = Literal["repa", "sit"]
PositionKind = Literal["sincos", "rope2d"]
MlpKind = Literal["gelu", "swiglu"]
NormKind = Literal["layernorm", "rmsnorm"]


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


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding of queries or keys (RoPE, Su et al. 2021; EVA-02's axial 2-D form).

    Each head's channels are read in adjacent pairs ``(2j, 2j + 1)`` as complex numbers
    ``x_2j + i x_2j+1`` and multiplied by ``exp(i p w_k)``: the first half of the pairs turn with the
    token's row index, the second half with its column index, at ``w_k = theta^(-k / (head_dim / 4))``,
    k = 0 .. head_dim/4 - 1. Turning q and k by their tokens' positions makes ``q . k`` depend on the
    positions only through their offset. The angles' cosines and sines are the buffers ``freqs_cos`` and
    ``freqs_sin`` [grid*grid, head_dim] (each angle written for both channels of its pair): the names,
    layout and values of LightningDiT's ``feat_rope``.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise UserError(f"2-D rotary embedding needs a head width divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        omega = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], dim=1)
        angles = angles.repeat_interleave(2, dim=1)
        self.register_buffer("freqs_cos", angles.cos().float(), persistent=True)
        self.register_buffer("freqs_sin", angles.sin().float(), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Turn x [B, heads, grid*grid, head_dim] (tokens in row-major order) by its tokens' positions."""
        pairs = x.unflatten(-1, (-1, 2))
        quarter_turn = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # i * (a + i b)
        return x * self.freqs_cos.to(x.dtype) + quarter_turn * self.freqs_sin.to(x.dtype)


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


class RMSNorm(nn.RMSNorm):
    """``x / sqrt(mean(x^2) + eps) * weight`` computed in float32 and returned in the input's dtype.

    LightningDiT normalises in float32 too; it also lets PyTorch's fused kernel run under bf16 autocast,
    which hands a bf16 input to a float32 weight (a mix the kernel refuses).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def build_norm(kind: NormKind, dim: int, on_heads: bool = False) -> nn.Module:
    """The normalisation ``kind`` over the last ``dim`` features.

    ``layernorm``: in the blocks and the final layer without affine, eps 1e-6 (DiT / SiT, no state-dict
    keys); on queries and keys (``on_heads``, for ``qk_norm``) timm's affine LayerNorm (eps 1e-5).
    ``rmsnorm``: ``x / sqrt(mean(x^2) + 1e-6) * weight`` with ``weight`` starting at 1, everywhere
    (LightningDiT).
    """
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    if on_heads:
        return nn.LayerNorm(dim)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (keys ``attn.qkv``, ``attn.proj``).

    The qkv output is laid out [3, heads, head_dim] along the features, as in timm's ``Attention``.
    With ``qk_norm`` each head's queries and keys are normalised (``attn.q_norm``, ``attn.k_norm``),
    then turned by the rotary embedding when one is given (LightningDiT's order).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, norm: NormKind = "layernorm") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = build_norm(norm, self.head_dim, on_heads=True) if qk_norm else nn.Identity()
        self.k_norm = build_norm(norm, self.head_dim, on_heads=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
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


class SwiGLU(nn.Module):
    """Gated MLP ``W3 (silu(W1 x) * W2 x)`` (Shazeer 2020, "GLU Variants Improve Transformer").

    ``w12`` holds W1 (first ``hidden`` outputs) and W2 (the rest) as one Linear, ``w3`` projects back:
    LightningDiT's key names and layout.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SiTBlock(nn.Module):
    """adaLN-zero block: ``x += gate_a * attn(mod(norm1(x)))``, ``x += gate_m * mlp(mod(norm2(x)))``.

    ``adaLN_modulation`` (SiLU, Linear d -> 6d) maps the condition to the six shift/scale/gate vectors;
    it starts at zero so each block starts as the identity (adaLN-zero). The norms, MLP and
    position handling follow ``args.norm``, ``args.mlp`` and ``args.qk_norm`` (see the module docstring).
    """

    def __init__(self, args: SiTArgs) -> None:
        super().__init__()
        dim = args.hidden_size
        self.norm1 = build_norm(args.norm, dim)
        self.attn = Attention(dim, args.num_heads, qk_norm=args.qk_norm, norm=args.norm)
        self.norm2 = build_norm(args.norm, dim)
        mlp = SwiGLU if args.mlp == "swiglu" else Mlp
        self.mlp = mlp(dim, mlp_hidden_size(args))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        """``c_act`` is the condition after the SiLU (shared by all blocks, computed once)."""
        mod = self.adaLN_modulation[1](c_act)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        x = torch.addcmul(x, gate_a.unsqueeze(1), h)
        h = self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return torch.addcmul(x, gate_m.unsqueeze(1), h)


class FinalLayer(nn.Module):
    """Modulated norm then Linear d -> p*p*C_out (keys ``final_layer.linear``, ``.adaLN_modulation.1``)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm: NormKind = "layernorm") -> None:
        super().__init__()
        self.norm_final = build_norm(norm, dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](c_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


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
    qk_norm: bool = False  # normalise each head's queries and keys (the kind of norm follows `norm`)
    pos: PositionKind = "sincos"  # sincos: fixed 2D sin-cos only; rope2d: plus 2-D RoPE on q and k
    mlp: MlpKind = "gelu"  # gelu: Linear-GELU-Linear; swiglu: gated MLP with 2/3 of the hidden width
    norm: NormKind = "layernorm"  # layernorm (no affine) or rmsnorm (learnt scale) in blocks and final layer
    latent_bn: bool = False  # REPA-E: non-affine BatchNorm buffers holding the latent statistics
    convention: Convention = "repa"  # time convention of the weights; the forward always speaks ours


def mlp_hidden_size(args: SiTArgs) -> int:
    """Hidden width of a block's MLP: ``int(d * mlp_ratio)``, two thirds of it for SwiGLU (LightningDiT).

    SwiGLU has three matrices to the GELU MLP's two, so two thirds of the width keeps the parameter count.
    """
    width = int(args.hidden_size * args.mlp_ratio)
    return 2 * width // 3 if args.mlp == "swiglu" else width


def check_options(args: SiTArgs) -> None:
    """Raise :class:`UserError` naming an architecture option whose value is not one of its choices."""
    for name, kind in (("pos", PositionKind), ("mlp", MlpKind), ("norm", NormKind)):
        value = getattr(args, name)
        if value not in get_args(kind):
            raise UserError(f"SiT option {name}={value!r} is not one of {list(get_args(kind))}")


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
        check_options(args)
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
        self.feat_rope = RotaryEmbedding2D(d // args.num_heads, self.grid) if args.pos == "rope2d" else None
        self.blocks = nn.ModuleList([SiTBlock(args) for _ in range(args.depth)])
        self.projectors = nn.ModuleList([build_projector(d, args.projector_dim, dim) for dim in args.teacher_dims])
        self.final_layer = FinalLayer(d, args.patch_size, self.out_channels, args.norm)
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
            h = block(h, c_act, self.feat_rope)
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
    hidden = mlp_hidden_size(args)
    mlp_matrices = 3 if args.mlp == "swiglu" else 2  # SwiGLU: W1, W2 and W3, each d x hidden
    out_c = 2 * args.in_channels if args.learn_sigma else args.in_channels
    attention_flops = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    per_block = attention_flops + mlp_matrices * 2 * n * d * hidden + 2 * d * 6 * d
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
_FAMILIES: dict[str, dict[str, str]] = {  # name -> architecture options
    "SiT": {},  # the SiT / REPA / REPA-E block
    "LightningDiT": {"pos": "rope2d", "mlp": "swiglu", "norm": "rmsnorm"},  # LightningDiT-XL/1's released recipe
}

PRESETS: tuple[str, ...] = tuple(
    f"{family}-{size}/{p}" for family in _FAMILIES for size in _SIZES for p in (1, 2, 4)
)


def preset_args(name: str, **overrides: Any) -> SiTArgs:
    """Arguments of preset ``{SiT,LightningDiT}-{XL,L,B,S,M,T}/{1,2,4}``; overrides apply on top.

    Official sizes: XL 28 blocks / 1152 / 16 heads, L 24 / 1024 / 16, B 12 / 768 / 12, S 12 / 384 / 6;
    REPA's projector depth: 8 for XL and L, 4 for B (and S). T (4 / 128 / 4) and M (6 / 192 / 3) are
    tiny CPU presets. ``SiT-*`` is the SiT / REPA block; ``LightningDiT-*`` the same sizes with 2-D RoPE,
    SwiGLU and RMSNorm (LightningDiT's XL/1 recipe; its own code names XL/1, XL/2, L/2, B/1 and B/2).
    Overrides (input_size, in_channels, pos, mlp, norm, ...) replace any of these values.
    """
    match = re.fullmatch(rf"({'|'.join(_FAMILIES)})-({'|'.join(_SIZES)})/(\d+)", name)
    if not match:
        raise UserError(f"unknown SiT preset {name!r}; choose one of {', '.join(PRESETS)}")
    family, size, patch = match.group(1), match.group(2), int(match.group(3))
    depth, width, heads = _SIZES[size]
    values: dict[str, Any] = {
        "patch_size": patch, "hidden_size": width, "depth": depth, "num_heads": heads,
        "encoder_depth": _ENCODER_DEPTH[size], **_FAMILIES[family],
    }
    values.update(overrides)
    return SiTArgs(**values)


def build_sit(name: str, **overrides: Any) -> SiT:
    """A freshly initialised SiT of preset ``name`` (see :func:`preset_args`)."""
    return SiT(preset_args(name, **overrides))


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
