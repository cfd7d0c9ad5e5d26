"""PSNR and SSIM against independent float64 computations; reconstruction metrics invariant to the batch size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sendvae.eval.generation import ImageSource
from sendvae.eval.reconstruction import evaluate_reconstruction, gaussian_window, psnr, ssim, vae_reconstructor


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(
        torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear"
    )
    return (smooth * 200 + torch.rand(n, 3, size, size, generator=g) * 55).round().to(torch.uint8)


def test_psnr_per_image_on_uint8():
    a = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 5  # MSE 25
    b[1, 0, 0, 0] = 116  # one pixel off by 16 -> MSE 256 / 192
    expected = [10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / (256 / 192))]
    torch.testing.assert_close(psnr(a, b), torch.tensor(expected, dtype=torch.float64))
    assert torch.isinf(psnr(a, a)).all()


def _ssim_reference(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004) window by window: Gaussian-weighted moments of every valid 11x11 patch."""
    taps = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(taps, taps)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for c in range(x.shape[0]):
        values = []
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                px, py = x[c, i : i + size, j : j + size], y[c, i : i + size, j : j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_ssim_matches_a_window_by_window_reference():
    x = _images(2, 16, seed=0)
    noise = torch.randint(-40, 41, x.shape, generator=torch.Generator().manual_seed(1))
    y = (x.int() + noise).clamp(0, 255).to(torch.uint8)
    values = ssim(x, y)
    for k in range(2):
        assert values[k].item() == pytest.approx(
            _ssim_reference(x[k].double().numpy(), y[k].double().numpy()), rel=1e-10
        )
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert gaussian_window().sum().item() == pytest.approx(1.0) and len(gaussian_window()) == 11
    assert 0 < values.min() < values.max() < 1


def test_ssim_refuses_images_smaller_than_the_window():
    from sendvae.errors import UserError

    small = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(UserError, match="11x11"):
        ssim(small, small)


class FakeInception:
    name = "inception"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.projection = torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)
        return {"pool": torch.tanh(x @ self.projection)}


def _blur(images: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.avg_pool2d(images.double(), 3, stride=1, padding=1, count_include_pad=False)
    return x.round().to(torch.uint8)


class MeanAbsolute(torch.nn.Module):
    """A stand-in perceptual distance (batch mean of a per-image distance, like PerceptualLoss)."""

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        assert x.min() >= -1 and x.max() <= 1  # the [-1, 1] convention
        return (x - recon).abs().flatten(1).mean(1).pow(0.5).mean()


def test_reconstruction_metrics_do_not_depend_on_batch_size(tmp_path):
    images = _images(9, 16, seed=3)
    path = tmp_path / "real.npz"
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    runs = [
        evaluate_reconstruction(_blur, ImageSource(str(path)), FakeInception(), MeanAbsolute(), batch_size=b)
        for b in (2, 9)
    ]
    a, b = runs[0].to_json(), runs[1].to_json()
    for key in ("psnr", "ssim"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    # The Frechet distance of near-singular covariances (9 images, 8 features) carries float64
    # round-off of order sqrt(eps) through the square roots of its tiny eigenvalues.
    assert a["rfid"] == pytest.approx(b["rfid"], abs=1e-7)
    assert a["lpips"] == pytest.approx(b["lpips"], rel=1e-6)  # LPIPS runs in float32
    blurred = _blur(images)
    assert a["psnr"] == pytest.approx(psnr(images, blurred).mean().item(), rel=1e-12)
    assert a["ssim"] == pytest.approx(ssim(images, blurred).mean().item(), rel=1e-12)
    per_image = [
        (images[i : i + 1].double() / 127.5 - (blurred[i : i + 1].double() / 127.5)).abs().mean().sqrt().item()
        for i in range(9)
    ]
    assert a["lpips"] == pytest.approx(np.mean(per_image), rel=1e-6)
    assert a["rfid"] > 0 and a["num_images"] == 9
    identity = evaluate_reconstruction(lambda x: x.clone(), ImageSource(str(path)), FakeInception(), batch_size=4)
    assert identity.rfid == pytest.approx(0.0, abs=1e-7) and identity.ssim == pytest.approx(1.0)


def test_vae_posterior_samples_are_seeded_per_image():
    from sendvae.models.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae("tiny-f4c4").eval()
    images = _images(3, 32, seed=4)
    together = vae_reconstructor(vae, sample_posterior=True, seed=1)(images)
    one_by_one = vae_reconstructor(vae, sample_posterior=True, seed=1)
    apart = torch.cat([one_by_one(images[i : i + 1]) for i in range(3)])
    assert (together.int() - apart.int()).abs().max() <= 1  # same noise per image; float round-off only
    mean = vae_reconstructor(vae)(images)
    assert mean.shape == images.shape and mean.dtype == torch.uint8


def test_eval_vae_command(tmp_path, monkeypatch, capsys):
    import json

    import sendvae.eval.inception as inception_module
    from sendvae.cli import main
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import load_vae, save_vae

    monkeypatch.setattr(
        inception_module, "InceptionFeatures", lambda weights=None, device="cpu", dtype=None: FakeInception()
    )
    torch.manual_seed(0)
    save_vae(build_vae("tiny-f4c4"), tmp_path / "vae")
    out = tmp_path / "recon.json"
    assert (
        main(
            [
                "eval-vae",
                "--vae",
                str(tmp_path / "vae"),
                "--data",
                "shapes:6",
                "--batch-size",
                "4",
                "--lpips",
                "random",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 6 and math.isfinite(metrics["psnr"]) and 0 < metrics["lpips"]
    assert -1 <= metrics["ssim"] <= 1 and metrics["rfid"] > 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "sample (seed 0)" in printed
    # the published rFID protocol by default: a posterior sample seeded per image, recorded as such
    assert (metrics["posterior"], metrics["seed"]) == ("sample", 0)
    vae = load_vae(tmp_path / "vae").eval()
    sampled = evaluate_reconstruction(vae_reconstructor(vae, sample_posterior=True, seed=0),
                                      ImageSource("shapes:6", resolution=vae.resolution), None)
    assert metrics["psnr"] == pytest.approx(sampled.psnr, rel=1e-6)
    assert main(["eval-vae", "--vae", str(tmp_path / "vae"), "--data", "shapes:6", "--lpips", "none",
                 "--device", "cpu", "--posterior", "mean", "--json", str(out)]) == 0
    of_mean = json.loads(out.read_text())
    assert (of_mean["posterior"], of_mean["seed"]) == ("mean", None) and of_mean["psnr"] != metrics["psnr"]
    assert "decoded  mean" in capsys.readouterr().out
    assert main(["eval-vae", "--vae", str(tmp_path / "missing"), "--data", "shapes:6"]) == 2
    assert "missing" in capsys.readouterr().err
