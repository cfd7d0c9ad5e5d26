"""The linear interpolant between data and noise, with t = 1 meaning pure noise (DESIGN.md section 2).

``x_t = (1 - t) x + t eps`` and the velocity ``d x_t / d t = eps - x``. Samplers integrate from t = 1
to 0. Send-VAE's noise injection (SPEC Eq. 1, ``z_t = (1 - a) eps + a z`` with ``a ~ U(0, 1)``) is
the same interpolant with ``t = 1 - a``; SiT training (stage 2) uses it with the velocity target.
Other code bases (SiT, LightningDiT, RAE) use t = 0 for noise: convert with ``t_ours = 1 - t_theirs``
and ``v_ours = -v_theirs``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

TimeSampling = Literal["uniform", "lognormal", "logit-normal"]


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x + t noise``, with one t per sample (shape [B])."""
    t = _broadcast(t, x)
    return (1.0 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the linear path, ``noise - x`` (what the model learns to predict)."""
    return noise - x


def velocity_cosine_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """LightningDiT's velocity-direction term ``1 - cos(v_pred, v_target)``, in float32.

    As in LightningDiT's transport (``use_cosine_loss``): the cosine is taken over the channels
    (dim 1) at each latent position, and ``1 - cos`` is averaged over the positions of a sample and then
    over the batch. It penalises the direction of the predicted velocity only, not its length.
    """
    cos = F.cosine_similarity(v_pred.float(), v_target.float(), dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def velocity_to_data(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean-data estimate ``x = x_t - t v`` implied by a velocity at time t."""
    return x_t - _broadcast(t, x_t) * v


def velocity_to_score(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The score ``grad log p_t(x_t) = -eps / t`` with ``eps = x_t + (1 - t) v`` (valid for t > 0)."""
    t = _broadcast(t, x_t)
    eps = x_t + (1.0 - t) * v
    return -eps / t


def sample_time(
    batch: int,
    mode: TimeSampling = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training times t in (0, 1) (t = 1 is noise), shape [batch].

    - ``uniform``: t ~ U(0, 1) (SiT, REPA, Send-VAE's noise injection).
    - ``lognormal``: log sigma ~ N(mean, std), t = sigma / (1 + sigma) (REPA's ``--weighting
      lognormal``; EDM uses mean -1.2, std 1.2).
    - ``logit-normal``: t = sigmoid(n), n ~ N(mean, std) (SD3, LightningDiT). In a t = 0-noise code
      base the same law has mean -mean; LightningDiT's N(0, 1) is the same in both.
    ``shift`` > 1 moves mass toward noise: ``t' = shift t / (1 + (shift - 1) t)`` (SD3 / RAE shift).
    """
    if mode == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif mode == "lognormal":
        log_sigma = torch.randn(batch, generator=generator, device=device) * std + mean
        sigma = log_sigma.exp()
        t = sigma / (1.0 + sigma)
    elif mode == "logit-normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    else:
        raise ValueError(f"unknown time sampling {mode!r}; expected uniform, lognormal or logit-normal")
    return shift_time(t, shift)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The resolution shift ``shift t / (1 + (shift - 1) t)`` (identity for shift = 1).

    In a t = 0-noise code base the same formula with shift ``s`` is this one with ``1 / s``: e.g.
    LightningDiT's sampling ``timestep_shift`` 0.3 is a shift of 1 / 0.3 here (toward noise).
    """
    if math.isclose(shift, 1.0):
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)
