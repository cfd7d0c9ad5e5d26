"""Samplers: Gaussian data with the exact velocity, guidance on all channels and its interval, seeds, ranks, resume."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sendvae.errors import UserError
from sendvae.sampling import (
    Guidance,
    PerSampleNoise,
    SampleJob,
    SamplingConfig,
    balanced_labels,
    euler_maruyama_sde,
    euler_ode,
    evaluations_per_sample,
    generate_latents,
    parts_dir,
    random_labels,
    sample_labels,
    sample_to_npz,
    velocity,
)

# Data x ~ N(m, s^2) independently per channel. With x_t = (1 - t) x + t eps the exact velocity is
# E[eps - x | x_t] = -m + (t - (1 - t) s^2) / var_t * (x_t - (1 - t) m), var_t = (1 - t)^2 s^2 + t^2,
# and the exact ODE flow maps the noise x_1 = z to x_0 = m + s z.
MEAN = torch.tensor([-1.0, 0.5, 2.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.5, 1.5, 0.2, 1.0], dtype=torch.float64).view(1, 4, 1, 1)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float64).view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * STD**2 + t**2
    return -MEAN + (t - (1 - t) * STD**2) / var * (x.to(torch.float64) - (1 - t) * MEAN)


NO_GUIDANCE = Guidance(scale=1.0, null_label=10)


def test_ode_recovers_gaussian_data_with_the_exact_velocity():
    z = torch.randn(64, 4, 2, 2, dtype=torch.float64)
    target = MEAN + STD * z
    y = torch.zeros(64, dtype=torch.long)
    errors = {}
    for heun in (False, True):
        for steps in (20, 40):
            x0 = euler_ode(gaussian_velocity, z, y, steps, NO_GUIDANCE, heun=heun, dtype=torch.float64)
            errors[heun, steps] = (x0 - target).abs().max().item()
    assert errors[True, 40] < 5e-3 and errors[False, 40] < 0.2
    # Euler is first order (halving the step halves the error), Heun second order (a quarter).
    assert 1.8 < errors[False, 20] / errors[False, 40] < 2.2
    assert 3.5 < errors[True, 20] / errors[True, 40] < 4.5
    assert errors[True, 40] < errors[False, 40] / 10


def test_sde_agrees_in_distribution_with_gaussian_data():
    n = 2000
    z = torch.randn(n, 4, 2, 2, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    generator = torch.Generator().manual_seed(1)
    x0 = euler_maruyama_sde(
        gaussian_velocity,
        z,
        y,
        80,
        NO_GUIDANCE,
        noise=lambda: torch.randn(n, 4, 2, 2, dtype=torch.float64, generator=generator),
        dtype=torch.float64,
    )
    per_channel = x0.transpose(0, 1).reshape(4, -1)
    # The SDE keeps the marginals N((1 - t) m, var_t) down to t = 0.04; the final noiseless step
    # x + (0 - t) (v - t score) is affine in x and maps them to N(m, (a sigma_t)^2), with
    # a = 1 - t (k + t / var_t), k = (t - (1 - t) s^2) / var_t. For s = 0.2 that is 6% below s.
    t, m, s = 0.04, MEAN.flatten(), STD.flatten()
    var = (1 - t) ** 2 * s**2 + t**2
    final_std = var.sqrt() * (1 - t * ((t - (1 - t) * s**2) / var + t / var))
    torch.testing.assert_close(per_channel.mean(1), m, atol=0.05 * s.max().item(), rtol=0)
    torch.testing.assert_close(per_channel.std(1), final_std, rtol=0.03, atol=0)
    torch.testing.assert_close(final_std, s, rtol=0.07, atol=0)
    # The SDE is stochastic: the result is not the deterministic flow of the same initial noise.
    assert (x0 - (MEAN + STD * z)).abs().mean() > 0.1 * STD.mean()


def constant_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Velocity (k + 1) on channel k for a class, -(k + 1) / 2 for the null class (10)."""
    per_channel = torch.arange(1, 5, dtype=torch.float64).view(1, 4, 1, 1)
    conditional = (y != 10).to(torch.float64).view(-1, 1, 1, 1)
    return (conditional * per_channel - (1 - conditional) * 0.5 * per_channel).expand_as(x).to(x.dtype)


def test_guidance_applies_to_all_channels():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 4, 7])
    scale = 2.5
    v = velocity(constant_velocity, x, 0.5, y, Guidance(scale, 0.0, 1.0, 10), True, torch.float64)
    cond = torch.arange(1, 5, dtype=torch.float64)
    expected = -0.5 * cond + scale * (cond + 0.5 * cond)  # v_u + s (v_c - v_u), channel by channel
    torch.testing.assert_close(v, expected.view(1, 4, 1, 1).expand_as(x))
    # one Euler step from t = 1 to 0 moves every channel by -v
    x0 = euler_ode(constant_velocity, x, y, 1, Guidance(scale, 0.0, 1.0, 10), dtype=torch.float64)
    torch.testing.assert_close(x0, x - v)


class RecordingModel:
    """Counts forward passes and records (batch size, t, labels) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, list[int]]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert torch.all(t == t[0])
        self.calls.append((x.shape[0], float(t[0]), y.tolist()))
        return constant_velocity(x, t, y)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_guidance_interval_gates_steps_and_costs_nothing_when_off(sampler):
    batch, steps = 3, 8
    y = torch.tensor([1, 2, 3])
    for scale, interval in [(1.0, (0.0, 1.0)), (3.0, (0.25, 0.5)), (3.0, (0.0, 1.0))]:
        config = SamplingConfig(sampler=sampler, steps=steps, cfg_scale=scale, guidance_interval=interval)
        model = RecordingModel()
        generate_latents(model, [0, 1, 2], y, (4, 2, 2), config, null_label=10, dtype=torch.float64)
        passes = sum(size for size, _, _ in model.calls) // batch
        assert passes == evaluations_per_sample(config)
        for size, _, labels in model.calls:
            if size == 2 * batch:
                assert labels == [1, 2, 3, 10, 10, 10]  # the duplicated half carries the null label
            else:
                assert size == batch and labels == [1, 2, 3]
        starts = model.calls[::2] if sampler == "heun" else model.calls
        if sampler == "heun":  # a Heun correction is guided exactly when its step is
            assert [c[0] for c in model.calls[1::2]] == [c[0] for c in starts[:-1]]
        grid = np.linspace(1, 0.04, steps) if sampler == "sde" else np.linspace(1, 0, steps + 1)[:-1]
        np.testing.assert_allclose([c[1] for c in starts], grid, atol=1e-7)
        for (size, _, _), t in zip(starts, grid):
            guided = scale != 1.0 and interval[0] <= t <= interval[1]
            assert size == (2 * batch if guided else batch)
        if scale == 1.0:
            assert passes == (2 * steps - 1 if sampler == "heun" else steps)


def test_guided_steps_in_the_interval_only():
    config = SamplingConfig(sampler="euler", steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.6))
    model = RecordingModel()
    generate_latents(model, [0], torch.tensor([3]), (4, 1, 1), config, null_label=10, dtype=torch.float64)
    assert [(size, round(t, 6)) for size, t, _ in model.calls] == [(1, 1.0), (1, 0.75), (2, 0.5), (2, 0.25)]


class TinyVelocityNet(torch.nn.Module):
    """A per-sample nonlinear velocity model with a class embedding (float64 so batching cannot change rounding)."""

    def __init__(self, channels: int = 4, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.5)
        self.embed = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.weight, x) + self.embed[y][:, :, None, None] * t[:, None, None, None]
        return torch.tanh(h) - x


@pytest.mark.parametrize("sampler", ["sde", "heun"])
def test_samples_do_not_depend_on_batch_size(sampler):
    model = TinyVelocityNet()
    config = SamplingConfig(sampler=sampler, steps=6, cfg_scale=2.0, guidance_interval=(0.2, 0.9), seed=3)
    labels = sample_labels(7, 5, config.seed, "random")
    whole = generate_latents(model, list(range(7)), labels, (4, 3, 3), config, null_label=5)
    pieces = [
        generate_latents(model, list(range(s, min(s + 3, 7))), labels[s : s + 3], (4, 3, 3), config, null_label=5)
        for s in range(0, 7, 3)
    ]
    # Equal up to float64 round-off (BLAS may block a matmul differently for another batch size);
    # a noise or label stream tied to batch positions would differ by O(1).
    torch.testing.assert_close(whole, torch.cat(pieces), rtol=0, atol=1e-12)
    other_seed = generate_latents(
        model, [0], labels[:1], (4, 3, 3), SamplingConfig(sampler=sampler, steps=6, seed=4), 5
    )
    assert not torch.equal(other_seed, whole[:1])


def test_per_sample_noise_depends_on_seed_and_index_only():
    a = PerSampleNoise(7, [4, 9], (2, 2))
    b = PerSampleNoise(7, [9], (2, 2))
    first_a, first_b = a(), b()
    assert torch.equal(first_a[1], first_b[0])
    assert torch.equal(a()[1], b()[0])  # later draws (SDE increments) too
    assert not torch.equal(first_a[0], first_a[1])
    assert not torch.equal(PerSampleNoise(8, [9], (2, 2))()[0], first_b[0])


def test_labels_balanced_and_random():
    labels = balanced_labels(50, 10, seed=0)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    assert not torch.equal(labels, balanced_labels(50, 10, seed=1))
    assert torch.equal(labels, balanced_labels(50, 10, seed=0))
    assert torch.equal(random_labels([3, 5], 10, 2), random_labels(range(6), 10, 2)[[3, 5]])
    counts = torch.bincount(random_labels(range(2000), 4, 0), minlength=4)
    assert counts.min() > 400  # uniform over the classes
    assert torch.bincount(sample_labels(7, 3, 0, "balanced"), minlength=3).tolist() == [3, 2, 2]


class GaussianClasses:
    """The exact velocity for data N(means[y], std^2 I): the Gaussian above with a class-dependent mean."""

    def __init__(self, means: torch.Tensor, std: float) -> None:
        self.means, self.std = means, std

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).view(-1, 1, 1, 1)
        m = self.means[y].view(len(y), -1, 1, 1)
        var = (1 - t) ** 2 * self.std**2 + t**2
        return -m + (t - (1 - t) * self.std**2) / var * (x.to(torch.float64) - (1 - t) * m)


CLASS_MEANS = torch.tensor([[-1.0, 0.5, 2.0, 0.0], [1.0, -1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)


def _autoguided(sampler: str, scale: float, guide, n: int = 600, model=None) -> torch.Tensor:
    config = SamplingConfig(
        sampler=sampler, steps=32, cfg_scale=scale, guidance="autoguidance", guide_model="guide", seed=1
    )
    labels = torch.arange(n) % 3
    model = model or GaussianClasses(CLASS_MEANS, 0.5)
    return generate_latents(model, range(n), labels, (4, 2, 2), config, 3, dtype=torch.float64, guide_model=guide)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_autoguidance_by_the_model_itself_changes_nothing(sampler):
    model = GaussianClasses(CLASS_MEANS, 0.5)
    plain = generate_latents(
        model, range(30), torch.arange(30) % 3, (4, 2, 2), SamplingConfig(sampler=sampler, steps=32, seed=1), 3,
        dtype=torch.float64,
    )
    assert torch.equal(_autoguided(sampler, 3.0, model, n=30, model=model), plain)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_autoguidance_by_a_blurrier_model_pulls_samples_to_the_class_mean(sampler):
    labels = torch.arange(600) % 3
    spreads = {}
    for scale in (1.0, 1.5, 2.5):
        x = _autoguided(sampler, scale, GaussianClasses(CLASS_MEANS, 1.0))  # the guide: same means, std 1 > 0.5
        deviation = x - CLASS_MEANS[labels].view(-1, 4, 1, 1)
        assert deviation.mean().abs() < 0.02  # centred on the class mean at every scale
        spreads[scale] = deviation.std().item()
    assert spreads[1.0] == pytest.approx(0.5, rel=0.06)  # w = 1: the good model's own distribution
    assert spreads[1.0] > 1.2 * spreads[1.5] and spreads[1.5] > 1.2 * spreads[2.5]
    assert spreads[2.5] < 0.6 * spreads[1.0]


def test_autoguidance_calls_both_models_on_guided_steps_only():
    model, guide = RecordingModel(), RecordingModel()
    config = SamplingConfig(sampler="euler", steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.6),
                            guidance="autoguidance", guide_model="guide")
    generate_latents(model, [0, 1], torch.tensor([3, 4]), (4, 1, 1), config, null_label=10, dtype=torch.float64,
                     guide_model=guide)
    assert [(size, round(t, 6), y) for size, t, y in model.calls] == [
        (2, 1.0, [3, 4]), (2, 0.75, [3, 4]), (2, 0.5, [3, 4]), (2, 0.25, [3, 4])]
    assert [(size, round(t, 6), y) for size, t, y in guide.calls] == [(2, 0.5, [3, 4]), (2, 0.25, [3, 4])]
    with pytest.raises(UserError, match="guide model"):
        generate_latents(model, [0], torch.tensor([3]), (4, 1, 1), config, null_label=10)


def test_guidance_scale_below_one_is_refused_naming_the_setting():
    from sendvae.config import ConfigError, from_dict

    # SiT / REPA guide only for scale > 1; a scale of 0.5 used to extrapolate toward the unconditional model here.
    with pytest.raises(ConfigError, match="cfg_scale: 0.5 is below 1"):
        from_dict(SamplingConfig, {"cfg_scale": 0.5})
    with pytest.raises(ConfigError, match="cfg_scale"):
        generate_latents(constant_velocity, [0], torch.tensor([1]), (4, 1, 1), SamplingConfig(cfg_scale=0.5), 10)
    with pytest.raises(ConfigError, match="guide_model"):
        from_dict(SamplingConfig, {"guidance": "autoguidance"})


def test_config_rejects_a_reversed_interval():
    from sendvae.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="guidance_interval"):
        from_dict(SamplingConfig, {"guidance_interval": [0.8, 0.2]})


# --------------------------------------------------------------------------------------------------
# Whole jobs: ranks, batch sizes, resume
# --------------------------------------------------------------------------------------------------

JOB = SampleJob(
    num_samples=11,
    num_classes=5,
    latent_shape=(4, 3, 3),
    sampling=SamplingConfig(sampler="sde", steps=4, cfg_scale=1.5, guidance_interval=(0.0, 0.7), seed=5),
    chunk_size=3,
)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """A fixed 'decoder': 3 of the 4 channels, upsampled 2x, squashed to uint8."""
    x = torch.nn.functional.interpolate(torch.tanh(latents[:, :3]), scale_factor=2, mode="nearest")
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory) -> Path:
    """A train-sit run folder: a tiny random SiT (non-zero output layer) on the latents of a tiny random VAE."""
    from sendvae.models.sit import build_sit
    from sendvae.models.vae import build_vae, vae_fingerprint
    from sendvae.models.vae_formats import save_vae
    from sendvae.models.sit_formats import save_sit_folder

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vae = build_vae("tiny-f4c4")  # 32 px <-> 4 x 8 x 8
    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.0, 0.3]), torch.tensor([0.5, 1.0, 2.0, 0.8]))
    save_vae(vae, root / "vae")
    sit = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=3)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    info = {
        "num_classes": 3,
        "latent_shape": [4, 8, 8],
        "vae": {"path": str(root / "vae"), "fingerprint": vae_fingerprint(vae)},
    }
    save_sit_folder(root / "sit", sit, sit, info)
    return root


def _cli_sample(run: Path, out: Path, batch_size: int, *extra: str) -> int:
    from sendvae.cli import main

    return main(
        [
            "sample",
            "--sit",
            str(run),
            "--num-samples",
            "7",
            "--out",
            str(out),
            "--sampler",
            "heun",
            "--steps",
            "3",
            "--cfg",
            "2.0",
            "--interval",
            "0,0.7",
            "--labels",
            "random",
            "--seed",
            "1",
            "--batch-size",
            str(batch_size),
            "--chunk-size",
            "3",
            "--dtype",
            "float64",
            "--device",
            "cpu",
            *extra,
        ]
    )


def _cli_worker(rank: int, world: int, port: int, run: str, out: str, batch_size: int, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    # As many threads as the single-process run: the float32 VAE decoder may round differently with
    # another thread count (the sampler itself is exact).
    torch.set_num_threads(threads)
    assert _cli_sample(Path(run), Path(out), batch_size, "--png-dir", str(Path(out).parent / "png")) == 0


@pytest.mark.slow  # two spawned processes import torch, diffusers and sendvae
def test_sample_command_gives_the_same_npz_for_one_or_two_processes_and_any_batch_size(tmp_path, sit_run):
    single = tmp_path / "one" / "samples.npz"
    assert _cli_sample(sit_run, single, 4) == 0
    double = tmp_path / "two" / "samples.npz"
    mp.start_processes(
        _cli_worker,
        args=(2, _free_port(), str(sit_run), str(double), 2, torch.get_num_threads()),
        nprocs=2,
        start_method="spawn",
    )
    a, b = np.load(single), np.load(double)
    assert a["arr_0"].shape == (7, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(a["arr_1"], random_labels(range(7), 3, 1).numpy())
    assert len(np.unique(a["arr_0"].reshape(7, -1), axis=0)) == 7 and a["arr_0"].std() > 1
    pngs = sorted(p.name for p in (tmp_path / "two" / "png").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "png" / "000005.png")), a["arr_0"][5])
    meta = json.loads(single.with_suffix(".json").read_text())
    assert meta["num_samples"] == 7 and meta["sampling"]["guidance_interval"] == [0.0, 0.7]
    assert meta["source"]["vae"] == str(sit_run / "vae") and not parts_dir(single).exists()
    assert _cli_sample(sit_run, single, 4) == 2  # exists: refused without --overwrite


def test_decoding_uses_the_vae_latent_statistics(sit_run):
    from sendvae.models.vae_formats import load_vae
    from sendvae.generator import load_generator

    generator = load_generator(sit_run, dtype="float64")
    vae = load_vae(sit_run / "vae")
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    expected = (
        (
            (
                vae.decode(
                    latents.float() * vae.latent_std.view(1, -1, 1, 1) + vae.latent_mean.view(1, -1, 1, 1)
                ).float()
                + 1
            )
            * 127.5
        )
        .clamp(0, 255)
        .round()
        .to(torch.uint8)
    )
    assert torch.equal(generator.decode(latents), expected)
    assert generator.latent_shape == (4, 8, 8) and generator.num_classes == 3


def test_sample_command_refuses_a_vae_the_sit_was_not_trained_on(tmp_path, sit_run):
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import save_vae
    from sendvae.generator import load_generator

    other = save_vae(build_vae("tiny-f4c4"), tmp_path / "other-vae")
    run = tmp_path / "run"
    shutil.copytree(sit_run / "sit", run / "sit")
    config = json.loads((run / "sit" / "config.json").read_text())
    config["vae"]["path"] = str(other)
    (run / "sit" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not the one"):
        load_generator(run)
    load_generator(run, vae=other)  # named explicitly: a warning, not an error


def test_sample_command_records_its_protocol_and_draws_a_grid(tmp_path, sit_run):
    from PIL import Image

    from sendvae.sampling import read_sample_metadata

    plain, guided = tmp_path / "plain.npz", tmp_path / "guided.npz"
    assert _cli_sample(sit_run, plain, 4, "--cfg", "1", "--grid", "0") == 0
    assert not plain.with_suffix(".png").exists()
    # AutoGuidance of the run by itself: the same images as no guidance, at twice the cost on guided steps
    assert _cli_sample(sit_run, guided, 4, "--guidance", "autoguidance", "--guide-model", str(sit_run),
                       "--grid", "2x3") == 0
    a, b = np.load(plain), np.load(guided)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    meta = read_sample_metadata(guided)
    assert meta == json.loads(guided.with_suffix(".json").read_text())
    assert meta["sampling"]["guidance"] == "autoguidance" and meta["sampling"]["cfg_scale"] == 2.0
    assert meta["sampling"]["sampler"] == "heun" and meta["sampling"]["steps"] == 3 and meta["sampling"]["seed"] == 1
    assert meta["sampling"]["labels"] == "random" and meta["source"]["guide_model"]["path"] == str(sit_run)
    # Heun, 3 steps: t = 1 unguided (2 passes), t = 2/3 guided (2 x 2), t = 1/3 guided, no correction (2)
    heun = SamplingConfig(sampler="heun", steps=3, cfg_scale=2.0, guidance_interval=(0.0, 0.7))
    assert meta["nfe_per_sample"] == evaluations_per_sample(heun) == 8
    assert "round(clamp((x + 1) * 127.5, 0, 255))" in meta["pixels"]
    grid = np.asarray(Image.open(guided.with_suffix(".png")))
    present = sorted(set(b["arr_1"].tolist()))
    assert grid.shape == (len(present) * 34 + 2, 2 * 34 + 2, 3)  # a row per class, 2 columns, 2-pixel borders
    first = int(np.flatnonzero(b["arr_1"] == present[0])[0])
    assert np.array_equal(grid[2:34, 2:34], b["arr_0"][first])


def test_guide_model_must_share_the_latent_space(tmp_path, sit_run):
    from sendvae.models.sit import build_sit
    from sendvae.generator import load_generator
    from sendvae.models.sit_formats import save_sit_folder

    config = json.loads((sit_run / "sit" / "config.json").read_text())
    other = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=5)
    info = {"num_classes": 5, "latent_shape": config["latent_shape"], "vae": config["vae"]}
    save_sit_folder(tmp_path / "other" / "sit", other, other, info)
    with pytest.raises(UserError, match=r"--guide-model .*other.* --sit .*: classes 5 vs 3"):
        load_generator(sit_run, guide_model=tmp_path / "other")


def test_interrupted_job_resumes_and_skips_written_chunks(tmp_path):
    out = tmp_path / "samples.npz"
    calls = []

    def failing_decode(latents: torch.Tensor) -> torch.Tensor:
        calls.append(len(latents))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while sampling the third batch
        return decode(latents)

    with pytest.raises(KeyboardInterrupt):
        sample_to_npz(TinyVelocityNet(), failing_decode, JOB, out, null_label=5, batch_size=3)
    assert sorted(p.name for p in parts_dir(out).glob("*.npz")) == ["00000000-00000003.npz", "00000003-00000006.npz"]
    assert not out.exists()

    resumed_calls = []

    def counting_decode(latents: torch.Tensor) -> torch.Tensor:
        resumed_calls.append(len(latents))
        return decode(latents)

    sample_to_npz(TinyVelocityNet(), counting_decode, JOB, out, null_label=5, batch_size=2)
    assert sum(resumed_calls) == 11 - 6  # only the unwritten indices are sampled again
    reference = tmp_path / "reference.npz"
    sample_to_npz(TinyVelocityNet(), decode, JOB, reference, null_label=5, batch_size=11)
    assert np.array_equal(np.load(out)["arr_0"], np.load(reference)["arr_0"])


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "samples.npz"

    def interrupt(latents: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_to_npz(TinyVelocityNet(), interrupt, JOB, out, null_label=5)
    other = SampleJob(**{**JOB.__dict__, "sampling": SamplingConfig(sampler="sde", steps=4, cfg_scale=4.0, seed=5)})
    with pytest.raises(UserError, match="sampling"):
        sample_to_npz(TinyVelocityNet(), decode, other, out, null_label=5)
