"""The time convention (t = 1 is noise) and the identities between velocity, data and score."""

from __future__ import annotations

import torch

from sendvae.transport import (
    interpolate, sample_time, shift_time, velocity_cosine_loss, velocity_target, velocity_to_data,
    velocity_to_score,
)


def test_endpoints_follow_t_equals_one_is_noise():
    x, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.equal(interpolate(x, eps, torch.zeros(4)), x)
    assert torch.equal(interpolate(x, eps, torch.ones(4)), eps)


def test_velocity_is_the_time_derivative_of_the_path():
    x, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t, h = torch.full((3,), 0.3, dtype=torch.float64), 1e-6
    finite_difference = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, velocity_target(x, eps))


def test_velocity_conversions_recover_data_and_noise():
    x, eps = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    x_t, v = interpolate(x, eps, t), velocity_target(x, eps)
    torch.testing.assert_close(velocity_to_data(x_t, v, t), x)
    torch.testing.assert_close(velocity_to_score(x_t, v, t), -eps / t[:, None])


def test_gaussian_score_matches_closed_form():
    # Data N(0, s^2): x_t ~ N(0, (1-t)^2 s^2 + t^2), score = -x_t / var; velocity E[eps - x | x_t].
    s, t = 0.5, torch.tensor([0.4], dtype=torch.float64)
    var = (1 - t) ** 2 * s**2 + t**2
    x_t = torch.tensor([[0.7]], dtype=torch.float64)
    v = x_t * (t - (1 - t) * s**2) / var  # E[eps - x | x_t] for jointly Gaussian (x, eps)
    torch.testing.assert_close(velocity_to_score(x_t, v, t), -x_t / var)


def test_time_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "lognormal", "logit-normal"):
        t = sample_time(10_000, mode, generator=g)
        assert t.shape == (10_000,) and t.min() > 0 and t.max() < 1
    uniform = sample_time(10_000, "uniform", generator=torch.Generator().manual_seed(1))
    shifted = sample_time(10_000, "uniform", generator=torch.Generator().manual_seed(1), shift=3.0)
    assert shifted.mean() > uniform.mean() + 0.1  # a shift > 1 moves mass toward noise
    torch.testing.assert_close(shifted, shift_time(uniform, 3.0))
    assert shift_time(0.5, 1.0) == 0.5


def test_logit_normal_time_is_the_sigmoid_of_a_normal():
    t = sample_time(20_000, "logit-normal", generator=torch.Generator().manual_seed(2), mean=0.5, std=0.7)
    n = torch.logit(t.double())
    assert abs(n.mean().item() - 0.5) < 0.02 and abs(n.std().item() - 0.7) < 0.02


def test_velocity_cosine_loss_is_one_minus_the_channel_cosine_per_position():
    v, u = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    cos = (v * u).sum(1) / (v.norm(dim=1) * u.norm(dim=1))  # over channels, at each of the 5 x 6 positions
    torch.testing.assert_close(velocity_cosine_loss(v, u), (1 - cos).mean())
    assert velocity_cosine_loss(2 * u, u).item() < 1e-6  # the length of the prediction does not matter
    assert abs(velocity_cosine_loss(-u, u).item() - 2.0) < 1e-6
