"""The Send-VAE mapper h_phi and the noise injection of SPEC Eq. 1."""

from __future__ import annotations

import math

import pytest
import torch

from sendvae.models.mapper import Mapper, noise_injection, sincos_pos_embed_2d


@pytest.mark.parametrize(
    ("channels", "latent_grid", "teacher_grid", "patch"),
    [(32, 16, 16, 1), (4, 32, 16, 2), (4, 8, 8, 1)],  # f16d32 and f8d4 at 256 px vs DINOv2; the shapes demo
)
def test_token_grid_equals_teacher_grid(channels: int, latent_grid: int, teacher_grid: int, patch: int) -> None:
    mapper = Mapper(channels, latent_grid, teacher_dim=40, teacher_grid=teacher_grid, width=32, mlp_hidden=16)
    assert mapper.patch == patch
    out = mapper(torch.randn(2, channels, latent_grid, latent_grid))
    assert out.shape == (2, teacher_grid**2, 40)


def test_grid_that_does_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="latent grid 12 is not a multiple of the teacher grid 8"):
        Mapper(4, 12, teacher_dim=16, teacher_grid=8)


def test_heads_default_to_width_over_64_as_in_the_paper() -> None:
    assert Mapper(32, 16, 768, 16, mlp_hidden=8).blocks[0].attn.num_heads == 12
    assert Mapper(32, 16, 1024, 16, mlp_hidden=8).blocks[0].attn.num_heads == 16
    assert Mapper(4, 8, 112, 8, mlp_hidden=8).heads == 1


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_depth_counts_vit_blocks_and_the_projector_is_repa_shaped(depth: int) -> None:
    mapper = Mapper(4, 8, teacher_dim=24, teacher_grid=8, depth=depth, width=32, mlp_hidden=64)
    assert len(mapper.blocks) == depth
    layers = [type(m).__name__ for m in mapper.projector]
    assert layers == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    shapes = [tuple(m.weight.shape) for m in mapper.projector if isinstance(m, torch.nn.Linear)]
    assert shapes == [(64, 32), (64, 64), (24, 64)]
    assert mapper(torch.randn(1, 4, 8, 8)).shape == (1, 64, 24)


def test_tokens_follow_row_major_patches() -> None:
    """A change in latent pixel (row 3, col 5) with patch 2 moves only token (1, 2) when depth = 0."""
    mapper = Mapper(4, 8, teacher_dim=8, teacher_grid=4, depth=0, width=16, mlp_hidden=16)
    z = torch.randn(1, 4, 8, 8)
    bumped = z.clone()
    bumped[0, :, 3, 5] += 1.0
    with torch.no_grad():
        changed = (mapper(bumped) - mapper(z)).abs().sum(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_sincos_position_embedding_formula_and_it_is_not_trained() -> None:
    dim, grid = 16, 5
    pe = sincos_pos_embed_2d(dim, grid)
    row, col, q = 3, 1, dim // 4
    for k in range(q):
        w = 10000 ** (-k / q)
        token = pe[row * grid + col]
        assert token[k].item() == pytest.approx(math.sin(row * w), abs=1e-6)
        assert token[q + k].item() == pytest.approx(math.cos(row * w), abs=1e-6)
        assert token[2 * q + k].item() == pytest.approx(math.sin(col * w), abs=1e-6)
        assert token[3 * q + k].item() == pytest.approx(math.cos(col * w), abs=1e-6)
    mapper = Mapper(4, 8, 8, 8, width=16, mlp_hidden=8)
    assert "pos_embed" not in mapper.state_dict()
    assert all(p is not mapper.pos_embed for p in mapper.parameters())


def test_noise_injection_is_eq1_with_t_equal_one_meaning_noise() -> None:
    z = torch.randn(6, 4, 8, 8)
    z_t, t = noise_injection(z, generator=torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    t_ref = torch.rand(6, generator=replay)
    eps = torch.randn(z.shape, generator=replay)
    a = (1 - t_ref).view(-1, 1, 1, 1)  # the paper's a = 1 - t
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(z_t, (1 - a) * eps + a * z)


def test_noise_injection_draws_uniform_times_per_sample_and_can_be_switched_off() -> None:
    z = torch.zeros(4000, 1, 1, 1)
    z_t, t = noise_injection(z, generator=torch.Generator().manual_seed(0))
    assert 0.0 < t.min() and t.max() < 1.0 and abs(t.mean().item() - 0.5) < 0.02
    assert z_t.std().item() == pytest.approx(math.sqrt(1 / 3), rel=0.05)  # E[t^2] = 1/3 with z = 0
    same, t0 = noise_injection(z, enabled=False)
    assert same is z and torch.equal(t0, torch.zeros(4000))


def test_mapper_is_trainable_end_to_end() -> None:
    mapper = Mapper(4, 8, 16, 8, width=32, mlp_hidden=32)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    mapper(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mapper.parameters())
