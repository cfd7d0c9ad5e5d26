"""Stage-1 losses: reductions, LPIPS input range and weights, GAN terms, and the three alignment modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from sendvae.config import ConfigError
from sendvae.errors import UserError
from sendvae.losses import (
    NoAlignment,
    PerceptualLoss,
    SendAlignment,
    VFAlignment,
    adaptive_weight,
    alignment_loss,
    build_alignment,
    generator_loss,
    hinge_discriminator_loss,
    kl_loss,
    lpips_linear_weights_path,
    reconstruction_loss,
    vf_loss,
)
from sendvae.models.mapper import noise_injection
from sendvae.models.teachers import Teacher, build_teacher


@pytest.fixture(scope="module")
def lpips_random() -> PerceptualLoss:
    """LPIPS with a random VGG trunk: the VGG16 ImageNet file is not available offline."""
    return PerceptualLoss(weights_path="random")


@pytest.fixture(scope="module")
def effnet_teacher() -> Teacher:
    return build_teacher("effnet-lite0", grid=8)  # the real offline teacher, 8x8x112 tokens


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- reconstruction, KL, GAN


def test_reconstruction_loss_is_a_mean_over_pixels() -> None:
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.zeros(2, 3, 4, 4)
    recon[0, 0, 0, 0] = 3.0
    assert reconstruction_loss(x, recon, "l1").item() == pytest.approx(3.0 / 96)
    assert reconstruction_loss(x, recon, "mse").item() == pytest.approx(9.0 / 96)
    with pytest.raises(ConfigError, match="'l2'"):
        reconstruction_loss(x, recon, "l2")  # type: ignore[arg-type]


class GaussianPosterior:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def kl(self) -> torch.Tensor:  # the DiagonalGaussian contract: one sum over C, H, W per sample
        var = self.std**2
        return 0.5 * (self.mean**2 + var - 1 - var.log()).sum(dim=(1, 2, 3))


def test_kl_loss_sums_over_the_latent_and_averages_over_the_batch() -> None:
    mean, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2) + 0.5
    expected = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    assert kl_loss(GaussianPosterior(mean, std)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hinge_and_generator_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.75)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)
    assert generator_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_the_detached_gradient_norm_ratio() -> None:
    layer = torch.nn.Linear(3, 2)
    out = layer(torch.randn(4, 3))
    loss_a, loss_b = 3.0 * out.sum(), out.square().sum()
    grad_a = torch.autograd.grad(loss_a, layer.weight, retain_graph=True)[0]
    grad_b = torch.autograd.grad(loss_b, layer.weight, retain_graph=True)[0]
    weight = adaptive_weight(loss_a, loss_b, layer.weight)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx((grad_a.norm() / (grad_b.norm() + 1e-4)).item(), rel=1e-5)
    assert adaptive_weight(loss_a, 1e-12 * out.sum(), layer.weight).item() == pytest.approx(1e4)
    assert adaptive_weight(loss_a, 1e-12 * out.sum(), layer.weight, clamp=1e8).item() > 1e4


# ---------------------------------------------------------------- LPIPS


def test_lpips_identical_images_give_zero_and_distance_grows_with_distortion(lpips_random: PerceptualLoss) -> None:
    x = images(4)
    assert lpips_random(x, x).item() == 0.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    distances = [lpips_random(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.6)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_lpips_input_range_check_catches_mis_scaled_images(lpips_random: PerceptualLoss) -> None:
    x = images()
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\].*\[-3"):
        lpips_random(2 * x - 1, x)  # [-1, 1] images mapped again with 2x - 1: the REPA-E bug, [-3, 1]
    with pytest.warns(RuntimeWarning, match=r"\[0, 1\] images"):
        lpips_random((x + 1) / 2, (x + 1) / 2)  # [0, 1] images passed as if [-1, 1]: the RAE bug


def test_lpips_gradient_reaches_the_reconstruction_only(lpips_random: PerceptualLoss) -> None:
    x = images()
    recon = (0.9 * x).requires_grad_(True)
    lpips_random(x, recon).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_random.parameters())
    lpips_random.train()
    assert not lpips_random.lpips.training


def test_lpips_linear_layers_come_from_the_lpips_wheel(lpips_random: PerceptualLoss) -> None:
    wheel = torch.load(lpips_linear_weights_path(), map_location="cpu", weights_only=True)
    for i in range(5):
        linear = getattr(lpips_random.lpips, f"lin{i}").model[1]
        torch.testing.assert_close(linear.weight, wheel[f"lin{i}.model.1.weight"])


def test_lpips_loads_a_torchvision_vgg16_file(tmp_path) -> None:
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])  # torchvision's vgg16 `features`, random weights
    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, str(tmp_path / "vgg16.safetensors"))
    loss = PerceptualLoss(weights_path=tmp_path / "vgg16.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        relu5_3 = features[:30](x)
        torch.testing.assert_close(loss.lpips.net(x).relu5_3, relu5_3)


def test_lpips_round_trips_a_full_lpips_state_dict(tmp_path, lpips_random: PerceptualLoss) -> None:
    torch.save(lpips_random.lpips.state_dict(), tmp_path / "lpips_vgg.pth")
    loaded = PerceptualLoss(weights_path=tmp_path / "lpips_vgg.pth")
    x, y = images(seed=1), images(seed=2)
    assert loaded(x, y).item() == pytest.approx(lpips_random(x, y).item(), rel=1e-6)


def test_lpips_without_vgg_weights_names_the_file_and_never_downloads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"vgg16-397923af.pth does not exist.*https://download.pytorch.org"):
        PerceptualLoss()
    with pytest.raises(UserError, match="my_vgg.pth does not exist"):
        PerceptualLoss(weights_path=tmp_path / "my_vgg.pth")


# ---------------------------------------------------------------- alignment


def test_cosine_alignment_loss_is_zero_for_identical_and_one_for_orthogonal_tokens() -> None:
    tokens = torch.randn(2, 16, 8)
    assert alignment_loss(tokens, tokens).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(3.0 * tokens, tokens).item() == pytest.approx(0.0, abs=1e-6)
    eye = torch.eye(8)
    a, b = eye[:4].expand(2, 4, 8), eye[4:].expand(2, 4, 8)
    assert alignment_loss(a, b).item() == pytest.approx(1.0)
    assert alignment_loss(-tokens, tokens).item() == pytest.approx(2.0, abs=1e-6)


def vf_loss_by_loops(z: torch.Tensor, f: torch.Tensor, m_cos: float, m_dist: float) -> float:
    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))

    batch, n, _ = z.shape
    cos_terms, dist_terms = [], []
    for b in range(batch):
        for i in range(n):
            cos_terms.append(max(0.0, 1 - m_cos - cos(z[b, i], f[b, i])))
            for j in range(n):
                gap = abs(cos(z[b, i], z[b, j]) - cos(f[b, i], f[b, j]))
                dist_terms.append(max(0.0, gap - m_dist))
    return sum(cos_terms) / len(cos_terms) + sum(dist_terms) / len(dist_terms)


def test_vf_loss_matches_a_loop_implementation() -> None:
    z, f = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    cos_term, dist_term = vf_loss(z, f, 0.1, 0.05)
    assert (cos_term + dist_term).item() == pytest.approx(vf_loss_by_loops(z, f, 0.1, 0.05), rel=1e-5)
    module = VFAlignment(latent_channels=3, teacher_dim=5, margin_cos=0.1, margin_dist=0.05)
    latent = torch.randn(2, 3, 2, 2)
    loss, logs = module(latent, f.float())
    projected = torch.einsum("dc,bchw->bhwd", module.projection.weight[:, :, 0, 0], latent).reshape(2, 4, 5)
    assert loss.item() == pytest.approx(vf_loss_by_loops(projected.detach().double(), f, 0.1, 0.05), rel=1e-4)
    assert set(logs) == {"align_loss", "vf_cos", "vf_distmat"}


def test_alignment_losses_run_in_float32_under_autocast() -> None:
    """Inside bf16 autocast (as in training) the VF terms, the N x N cosine matrices included, and
    Eq. 2 are computed in float32: the same values as outside autocast. Tiny tensors: CPU bf16 is slow."""
    z, f = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    expected = (*vf_loss(z, f), alignment_loss(z, f))
    assert expected[1] > 0  # the distance-matrix term is active
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (*vf_loss(z, f), alignment_loss(z, f))
    for value, reference in zip(got, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference)


def test_vf_projection_is_pooled_to_a_coarser_teacher_grid() -> None:
    module = VFAlignment(latent_channels=4, teacher_dim=6)
    z = torch.randn(1, 4, 8, 8)
    expected = module.project(F.avg_pool2d(z, 2), grid=4)  # a 1x1 projection commutes with pooling
    torch.testing.assert_close(module.project(z, grid=4), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the teacher grid 3"):
        module.project(z, grid=3)


def test_send_alignment_is_noise_injection_then_mapper_then_eq2() -> None:
    align = build_alignment("sendvae", 4, 8, teacher_dim=16, teacher_grid=4, mapper_width=32, mlp_hidden=32)
    z, tokens = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    loss, logs = align(z, tokens, generator=torch.Generator().manual_seed(3))
    z_t, t = noise_injection(z, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(alignment_loss(align.mapper(z_t), tokens).item(), rel=1e-6)
    assert logs["align_t_mean"].item() == pytest.approx(t.mean().item())
    clean = build_alignment("sendvae", 4, 8, 16, 4, noise=False, mapper_width=32, mlp_hidden=32)
    loss_clean, _ = clean(z, tokens)
    assert loss_clean.item() == pytest.approx(alignment_loss(clean.mapper(z), tokens).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["vf", "sendvae"])
def test_alignment_gradients_reach_encoder_and_mapper_but_never_the_teacher(kind: str, effnet_teacher: Teacher) -> None:
    teacher = effnet_teacher
    encoder = torch.nn.Conv2d(3, 4, kernel_size=4, stride=4)  # a stand-in VAE encoder: 32 px -> 4x8x8
    align = build_alignment(kind, 4, 8, teacher.dim, teacher.grid, mapper_width=64, mlp_hidden=64)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = teacher(pixels)
    assert not tokens.requires_grad
    loss, _ = align(encoder(pixels.float() / 127.5 - 1), tokens)
    loss.backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in align.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_no_alignment_is_zero_without_a_teacher() -> None:
    align = build_alignment("none", 4, 8, 112, 8)
    assert isinstance(align, NoAlignment) and not align.needs_teacher
    loss, logs = align(torch.randn(2, 4, 8, 8), None)
    assert loss.item() == 0.0 and logs == {}


def test_build_alignment_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="'repa'"):
        build_alignment("repa", 4, 8, 16, 8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="latent grid 12 is not a multiple of the teacher grid 8"):
        build_alignment("sendvae", 4, 12, 16, 8)
    with pytest.raises(ConfigError, match="latent grid 12"):
        build_alignment("vf", 4, 12, 16, 8)
    assert isinstance(build_alignment("sendvae", 4, 8, 16, 8, mlp_hidden=8), SendAlignment)
    assert isinstance(build_alignment("vf", 4, 16, 16, 8), VFAlignment)
