"""SiT + REPA projector: released key layouts, block maths, time conventions, loading, FLOP count."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Mlp as TimmMlp
from torch.utils.flop_counter import FlopCounterMode

from sendvae.errors import UserError
from sendvae.models.sit import (
    SiT,
    SiTArgs,
    build_sit,
    drop_labels,
    forward_flops,
    preset_args,
    repa_loss,
)
from sendvae.models.sit_formats import infer_args, load_sit
from sendvae.transport import velocity_to_data


def _meta_shapes(name: str, **kw) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_sit(name, **kw)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _official_sit_xl2_layout(learn_sigma: bool, teacher_dim: int | None) -> dict[str, tuple[int, ...]]:
    """The key set of the released SiT-XL/2 (256 px, 4x32x32 latents), written out from its layout."""
    d, c, p = 1152, 4, 2
    out = p * p * c * (2 if learn_sigma else 1)
    keys = {
        "pos_embed": (1, 256, d),
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    if teacher_dim:
        keys.update({
            "projectors.0.0.weight": (2048, d), "projectors.0.0.bias": (2048,),
            "projectors.0.2.weight": (2048, 2048), "projectors.0.2.bias": (2048,),
            "projectors.0.4.weight": (teacher_dim, 2048), "projectors.0.4.bias": (teacher_dim,),
        })
    return keys


def test_official_sit_xl2_key_set_and_parameter_count():
    shapes = _meta_shapes("SiT-XL/2", input_size=32, learn_sigma=True)
    assert shapes == _official_sit_xl2_layout(learn_sigma=True, teacher_dim=None)
    # DiT-XL/2 / SiT-XL/2 report 675,129,632 parameters (pos_embed included).
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 675_129_632


def test_repa_sit_xl2_key_set():
    shapes = _meta_shapes("SiT-XL/2", input_size=32, teacher_dims=[768])
    assert shapes == _official_sit_xl2_layout(learn_sigma=False, teacher_dim=768)


def test_repae_sit_xl1_has_latent_batchnorm_buffers():
    shapes = _meta_shapes("SiT-XL/1", input_size=16, in_channels=32, teacher_dims=[768], latent_bn=True)
    assert shapes["bn.running_mean"] == (32,) and shapes["bn.running_var"] == (32,)
    assert shapes["bn.num_batches_tracked"] == ()
    assert shapes["x_embedder.proj.weight"] == (1152, 32, 1, 1)
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)


@pytest.mark.parametrize("name,depth,width,heads,enc", [
    ("SiT-XL/1", 28, 1152, 16, 8), ("SiT-L/2", 24, 1024, 16, 8),
    ("SiT-B/1", 12, 768, 12, 4), ("SiT-S/4", 12, 384, 6, 4),
])
def test_presets_have_official_sizes(name, depth, width, heads, enc):
    args = preset_args(name)
    assert (args.depth, args.hidden_size, args.num_heads, args.encoder_depth) == (depth, width, heads, enc)
    assert args.patch_size == int(name.split("/")[1])


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="SiT-Q/2"):
        preset_args("SiT-Q/2")


def _randomise(model: SiT, seed: int = 0) -> SiT:
    """Non-zero values everywhere (the zero-initialised layers would hide layout errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.01))
    return model


def test_block_matches_timm_attention_and_mlp():
    """Our block loads into timm's Attention / Mlp (the modules of the official code) and agrees with them."""
    model = _randomise(build_sit("SiT-T/2", input_size=8))
    block = model.blocks[0]
    attn = TimmAttention(128, num_heads=4, qkv_bias=True)
    attn.load_state_dict(block.attn.state_dict())  # strict: same key names and shapes
    mlp = TimmMlp(128, 512, act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    mlp.load_state_dict(block.mlp.state_dict())
    x = torch.randn(2, 16, 128)
    c = torch.randn(2, 128)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=-1)
    ln = torch.nn.LayerNorm(128, elementwise_affine=False, eps=1e-6)
    ref = x + gate_a[:, None] * attn(ln(x) * (1 + scale_a[:, None]) + shift_a[:, None])
    ref = ref + gate_m[:, None] * mlp(ln(ref) * (1 + scale_m[:, None]) + shift_m[:, None])
    torch.testing.assert_close(block(x, F.silu(c)), ref, rtol=1e-5, atol=1e-5)


def test_patch_embedding_equals_the_strided_convolution_and_unpatchify_inverts_it():
    model = _randomise(build_sit("SiT-T/2", input_size=8))
    x = torch.randn(3, 4, 8, 8)
    conv = model.x_embedder.proj
    ref = F.conv2d(x, conv.weight, conv.bias, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.x_embedder(x), ref, rtol=1e-5, atol=1e-5)
    # unpatchify of the patch features (p_row, p_col, C order) gives the image back
    patches = x.reshape(3, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, 16)
    torch.testing.assert_close(model.unpatchify(patches), x)


def test_fresh_model_predicts_zero_and_positions_follow_the_mae_layout():
    model = build_sit("SiT-T/1", input_size=8, num_classes=6, teacher_dims=[112])
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 6])
    v, tokens = model(x, t, y, return_tokens=True)
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # zero-initialised final layer
    assert len(tokens) == 1 and tokens[0].shape == (2, 64, 112)
    pos = model.pos_embed[0]
    d = pos.shape[1]
    assert torch.allclose(pos[0], torch.cat([torch.zeros(d // 4), torch.ones(d // 4)] * 2))
    # token 1 is (row 0, col 1): only the first half (the column code) differs from token 0
    assert torch.equal(pos[1, d // 2:], pos[0, d // 2:]) and not torch.equal(pos[1, : d // 2], pos[0, : d // 2])
    # token 8 is (row 1, col 0): only the second half differs
    assert torch.equal(pos[8, : d // 2], pos[0, : d // 2])


def test_tiny_forward_backward_reaches_every_parameter():
    model = _randomise(build_sit("SiT-T/1", input_size=8, num_classes=6, teacher_dims=[16]))
    v, (tok,) = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 6]), return_tokens=True)
    (v.square().mean() + tok.square().mean()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_sit_convention_gives_the_same_clean_estimate():
    """A t = 0-noise checkpoint, wrapped, predicts the same clean latent as the raw model in its own terms."""
    args = preset_args("SiT-T/2", input_size=8, learn_sigma=True)
    raw = _randomise(SiT(args))
    wrapped = SiT(SiTArgs(**{**args.__dict__, "convention": "sit"}))
    wrapped.load_state_dict(raw.state_dict())
    x_t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 1000])
    t_ours = torch.tensor([0.1, 0.5, 0.9])
    ours = velocity_to_data(x_t, wrapped(x_t, t_ours, y), t_ours)
    t_theirs = 1 - t_ours  # SiT: x_t = t x + (1 - t) eps, u = x - eps, so x = x_t + (1 - t) u
    theirs = x_t + (1 - t_theirs).view(-1, 1, 1, 1) * raw(x_t, t_theirs, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert raw(x_t, t_ours, y).shape == x_t.shape  # learn_sigma: the first C of 2C channels are kept


def _save_torch(path, state, **extra):
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT", **extra)}, path)


def test_load_official_sit_checkpoint_guesses_its_convention(tmp_path):
    raw = _randomise(SiT(preset_args("SiT-T/2", input_size=8, learn_sigma=True)))
    path = tmp_path / "SiT-T-2.pt"
    _save_torch(path, raw.state_dict())
    model = load_sit(path)
    assert model.args.convention == "sit" and model.args.learn_sigma
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7]), torch.tensor([3, 5])
    torch.testing.assert_close(model(x, t, y), -raw(x, 1 - t, y))


def test_load_repae_checkpoint_with_batchnorm_stats(tmp_path):
    args = preset_args("SiT-T/1", input_size=4, in_channels=8, teacher_dims=[24], latent_bn=True)
    ref = _randomise(SiT(args))
    ref.bn.running_mean.copy_(torch.arange(8.0))
    ref.bn.running_var.copy_(torch.full((8,), 4.0))
    path = tmp_path / "repae.pt"
    _save_torch(path, ref.state_dict(), bn_momentum=0.1)
    model = load_sit(path, encoder_depth=2)
    assert model.args.convention == "repa" and model.args.teacher_dims == [24]
    mean, std = model.latent_statistics()
    torch.testing.assert_close(mean, torch.arange(8.0))
    torch.testing.assert_close(std, torch.full((8,), 2.0))
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([0, 2])
    (v, tok), (v_ref, tok_ref) = model(x, t, y, True), ref(x, t, y, True)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(tok[0], tok_ref[0])


def test_load_safetensors_and_reject_foreign_files(tmp_path):
    from safetensors.torch import save_file

    ref = _randomise(build_sit("SiT-T/4", input_size=8, teacher_dims=[10]))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "sit.safetensors"))
    model = load_sit(tmp_path / "sit.safetensors", convention="repa")
    assert infer_args(model.state_dict()).patch_size == 4
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="x_embedder.proj.weight"):
        load_sit(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_sit(tmp_path / "missing.pt")


def test_repa_loss_is_negative_mean_token_cosine():
    h, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    cos = (h * y).sum(-1) / (h.norm(dim=-1) * y.norm(dim=-1))
    torch.testing.assert_close(repa_loss([h], [y]), -cos.mean())
    assert repa_loss([h], [3 * h]).item() == pytest.approx(-1.0)


def test_drop_labels_rate_and_null_class():
    y = torch.zeros(20000, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    dropped = drop_labels(y, 0.1, 1000, g)
    assert set(dropped.unique().tolist()) == {0, 1000}
    assert (dropped == 1000).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(drop_labels(y, 0.0, 1000, g), y)


def _math_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_forward_flops_match_torch_flop_counter(monkeypatch):
    args = preset_args("SiT-T/2", input_size=16, teacher_dims=[32], num_classes=10)
    model = _randomise(SiT(args))
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([1, 2, 3])
    fused = model(x, t, y)
    # the CPU flop counter does not see inside fused SDPA: count the same attention written as matmuls
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_attention)
    torch.testing.assert_close(model(x, t, y), fused, rtol=1e-4, atol=1e-5)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y, return_tokens=True)
    assert forward_flops(args) * 3 == counter.get_total_flops()


def test_cpu_bf16_attention_path_matches_fused_sdpa():
    """The matmul attention used for bf16 on CPU computes the same softmax attention as SDPA."""
    from sendvae.models.sit import attention

    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.03, atol=0.03)
    torch.testing.assert_close(attention(q, k, v), ref)  # float32: the fused kernel itself


# --------------------------------------------------------------------------------------------------
# Architecture options (pos / mlp / norm / qk_norm) and the LightningDiT presets
# --------------------------------------------------------------------------------------------------

OPTIONS = [
    {"pos": "rope2d"}, {"mlp": "swiglu"}, {"norm": "rmsnorm"}, {"qk_norm": True},
    {"qk_norm": True, "norm": "rmsnorm"}, {"pos": "rope2d", "mlp": "swiglu", "norm": "rmsnorm"},
]


def _lightningdit_xl1_layout() -> dict[str, tuple[int, ...]]:
    """The key set of LightningDiT-XL/1 on 32x16x16 latents (RoPE, SwiGLU, RMSNorm), written out from its layout."""
    d, c, hidden, head_dim = 1152, 32, 3072, 72
    keys = {
        "pos_embed": (1, 256, d), "feat_rope.freqs_cos": (256, head_dim), "feat_rope.freqs_sin": (256, head_dim),
        "x_embedder.proj.weight": (d, c, 1, 1), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.norm_final.weight": (d,),
        "final_layer.linear.weight": (c, d), "final_layer.linear.bias": (c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (d,), b + "norm2.weight": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
            b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return keys


def test_lightningdit_xl1_preset_has_the_lightningdit_key_set():
    args = preset_args("LightningDiT-XL/1")
    assert (args.pos, args.mlp, args.norm, args.qk_norm) == ("rope2d", "swiglu", "rmsnorm", False)
    assert (args.depth, args.hidden_size, args.num_heads, args.patch_size) == (28, 1152, 16, 1)
    assert _meta_shapes("LightningDiT-XL/1", input_size=16, in_channels=32) == _lightningdit_xl1_layout()


def test_preset_overrides_replace_the_family_options():
    args = preset_args("LightningDiT-T/1", pos="sincos")
    assert (args.pos, args.mlp, args.norm) == ("sincos", "swiglu", "rmsnorm")
    assert preset_args("SiT-T/1", mlp="swiglu").mlp == "swiglu"
    with pytest.raises(UserError, match="norm='batchnorm'"):
        SiT(preset_args("SiT-T/1", norm="batchnorm"))


def test_rmsnorm_matches_its_formula():
    model = _randomise(build_sit("SiT-T/1", input_size=4, norm="rmsnorm"))
    norm = model.blocks[0].norm1
    x = torch.randn(2, 16, 128) * 3 + 1
    ref = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(norm.weight, torch.ones(128))  # the learnt scale is applied, not just ones
    assert build_sit("SiT-T/1", input_size=4, norm="rmsnorm").final_layer.norm_final.weight.eq(1).all()


def test_swiglu_matches_explicit_gated_mlp():
    model = _randomise(build_sit("SiT-T/1", input_size=4, mlp="swiglu"))
    mlp = model.blocks[1].mlp
    h = 2 * 512 // 3  # two thirds of the GELU MLP's 4 x 128
    w1, w2 = mlp.w12.weight[:h], mlp.w12.weight[h:]
    b1, b2 = mlp.w12.bias[:h], mlp.w12.bias[h:]
    x = torch.randn(2, 16, 128)
    ref = (F.silu(x @ w1.T + b1) * (x @ w2.T + b2)) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)
    assert mlp.w3.weight.shape == (128, h)


def test_qk_norm_matches_timm_attention_with_qk_norm():
    """qk_norm=True is timm's Attention(qk_norm=True) (the REPA SiT's option): same keys, same output."""
    model = _randomise(build_sit("SiT-T/1", input_size=4, qk_norm=True))
    attn = model.blocks[0].attn
    ref = TimmAttention(128, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 16, 128)
    torch.testing.assert_close(attn(x), ref(x), rtol=1e-5, atol=1e-5)
    # with norm=rmsnorm the heads get RMSNorm (LightningDiT): only a scale, no bias
    rms = build_sit("SiT-T/1", input_size=4, qk_norm=True, norm="rmsnorm").blocks[0].attn
    assert set(rms.q_norm.state_dict()) == {"weight"} and rms.q_norm.weight.shape == (32,)


def _complex_rope(x: torch.Tensor, grid: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE written directly: pair j of token (r, c) times exp(i r w_j) (first half) or exp(i c w_j') (second)."""
    n, head_dim = x.shape[-2], x.shape[-1]
    quarter = head_dim // 4
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    angles = torch.zeros(n, head_dim // 2, dtype=torch.float64)
    for token in range(n):
        r, c = divmod(token, grid)
        for j in range(head_dim // 2):
            position, k = (r, j) if j < quarter else (c, j - quarter)
            angles[token, j] = position * theta ** (-k / quarter)
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def test_rope_matches_the_complex_number_formulation():
    model = build_sit("SiT-T/1", input_size=6, pos="rope2d", num_heads=8)  # head width 16, 6x6 tokens
    x = torch.randn(2, 8, 36, 16)
    torch.testing.assert_close(model.feat_rope(x), _complex_rope(x, grid=6), rtol=1e-5, atol=1e-5)


def test_rope_makes_scores_depend_on_the_relative_offset_only():
    rope = build_sit("SiT-T/1", input_size=5, pos="rope2d").feat_rope  # head width 32, 5x5 tokens
    q0, k0 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    rope = rope.double()
    q, k = rope(q0.expand(1, 1, 25, 32)), rope(k0.expand(1, 1, 25, 32))
    scores = (q @ k.transpose(-2, -1))[0, 0]
    by_offset: dict[tuple[int, int], list[float]] = {}
    for m in range(25):
        for n in range(25):
            (rm, cm), (rn, cn) = divmod(m, 5), divmod(n, 5)
            by_offset.setdefault((rm - rn, cm - cn), []).append(scores[m, n].item())
    for offset, values in by_offset.items():
        assert max(values) - min(values) < 1e-5, offset  # the angles' cos / sin are stored in float32
    assert by_offset[(0, 0)][0] == pytest.approx((q0 @ k0).item(), rel=1e-5)  # the same position: no change
    firsts = [values[0] for values in by_offset.values()]
    assert max(firsts) - min(firsts) > 0.1  # and the offset does matter


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_option_forward_backward_and_run_folder_round_trip(options, tmp_path):
    from sendvae.models.sit_formats import load_sit_run, save_sit_folder

    model = _randomise(build_sit("SiT-T/1", input_size=4, num_classes=5, teacher_dims=[24], **options))
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 4, 5])
    v, (tokens,) = model(x, t, y, return_tokens=True)
    assert v.shape == x.shape and tokens.shape == (3, 16, 24)
    (v.square().mean() + tokens.square().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # the options are read back from the weights alone and from a run folder
    inferred = infer_args(model.state_dict(), num_heads=4, encoder_depth=2)
    assert inferred == model.args
    save_sit_folder(tmp_path / "sit", model, model, {"num_classes": 5})
    run = load_sit_run(tmp_path)
    assert run.model.args == model.args
    torch.testing.assert_close(run.model(x, t, y), v.detach())


def test_lightningdit_checkpoint_loads_in_the_sit_convention(tmp_path):
    """A LightningDiT-layout checkpoint (t = 0 noise, no projector) loads with its options and convention."""
    raw = _randomise(build_sit("LightningDiT-T/1", input_size=4, num_heads=8, num_classes=5))
    state = raw.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "config": {"model": {"model_type": "tiny"}}},
               tmp_path / "0080000.pt")
    model = load_sit(tmp_path / "0080000.pt")
    args = model.args
    assert (args.pos, args.mlp, args.norm, args.convention) == ("rope2d", "swiglu", "rmsnorm", "sit")
    assert args.num_heads == 8 and args.mlp_ratio == 4.0  # heads from the RoPE buffer's head width
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([0.2, 0.7]), torch.tensor([3, 5])
    torch.testing.assert_close(model(x, t, y), -raw(x, 1 - t, y))
    shift_free = {**state, "blocks.0.adaLN_modulation.1.weight": torch.zeros(4 * 128, 128)}
    with pytest.raises(UserError, match="wo_shift"):
        infer_args(shift_free)


def test_load_sit_asks_for_encoder_depth_when_the_default_exceeds_the_depth(tmp_path):
    """Issue 14: a 2-block REPA SiT without encoder_depth is a UserError naming the argument, not a ValueError."""
    ref = _randomise(SiT(SiTArgs(input_size=4, hidden_size=64, depth=2, num_heads=4, teacher_dims=[8],
                                 projector_dim=16, encoder_depth=1)))
    path = tmp_path / "shallow.pt"
    _save_torch(path, ref.state_dict())
    with pytest.raises(UserError, match=r"encoder_depth=K .* \[1, 2\]"):
        load_sit(path, num_heads=4)
    with pytest.raises(UserError, match="encoder_depth=3"):
        load_sit(path, num_heads=4, encoder_depth=3)
    model = load_sit(path, num_heads=4, encoder_depth=1)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 1])
    torch.testing.assert_close(model(x, t, y, True)[1][0], ref(x, t, y, True)[1][0])


def test_forward_flops_of_a_lightningdit_preset_match_torch_flop_counter(monkeypatch):
    args = preset_args("LightningDiT-T/2", input_size=16, teacher_dims=[32], num_classes=10)
    model = _randomise(SiT(args))
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([1, 2, 3])
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_attention)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y, return_tokens=True)
    assert forward_flops(args) * 3 == counter.get_total_flops()


def test_run_config_without_the_options_reads_as_the_sit_block():
    """config.json of runs written before the options existed still loads, as the SiT / REPA block."""
    from sendvae.models.sit import args_from_dict, args_to_dict

    old = {k: v for k, v in args_to_dict(preset_args("SiT-T/1")).items() if k not in ("pos", "mlp", "norm")}
    args = args_from_dict(old)
    assert (args.pos, args.mlp, args.norm) == ("sincos", "gelu", "layernorm")
    with pytest.raises(UserError, match="pos='alibi'"):
        SiT(args_from_dict({**old, "pos": "alibi"}))
