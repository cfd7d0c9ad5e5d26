"""Stage 2 on the shared loop: the loss falls, resume is exact, two processes equal one, runs reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sendvae.config import ConfigError, load_config
from sendvae.data.latents import LatentDataset, cache_latents, draw_latents
from sendvae.data.store import open_image_dataset
from sendvae.errors import UserError
from sendvae.models.sit import repa_loss
from sendvae.models.sit_formats import load_sit, load_sit_run
from sendvae.models.latent_stats import compute_latent_stats
from sendvae.models.vae import build_vae
from sendvae.models.vae_formats import save_vae
from sendvae.train.stage import StepContext
from sendvae.train.sit import TrainSiTConfig, build_sit_stage, train_sit
from sendvae.transport import interpolate, velocity_target

RES = 32
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "sit_tiny.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sit")
    torch.manual_seed(0)
    vae = build_vae("tiny-f4c4", resolution=RES)
    with torch.no_grad():  # an informative posterior (std ~ 0.02): a random VAE's latents are mostly noise
        vae.autoencoder.quant_conv.bias[4:] = -8.0
    vae.set_latent_stats(*compute_latent_stats(vae, open_image_dataset("shapes:64", RES), 64))
    vae_dir = save_vae(vae, root / "vae")
    out = root / "latents"
    cache_latents(vae_dir, "shapes:64", out, batch_size=32, resolution=RES, shard_size=32, teacher="effnet-lite0",
                  device="cpu", num_workers=0)
    return vae_dir, out


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(cache_dir: Path, **extra) -> list[str]:
    base = {
        "data.cache": str(cache_dir), "model.projector_dim": 64, "train.precision": "fp32", "train.device": "cpu",
        "train.batch_size": 16, "train.total_images": 128, "train.log_every": 16, "train.checkpoint_every": 64,
        "train.num_workers": 0, "train.seed": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(cache_dir: Path, **extra) -> TrainSiTConfig:
    return load_config(TrainSiTConfig, CONFIG, overrides(cache_dir, **extra))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _held_out_losses(model, cache_dir: Path, vae_dir: Path) -> tuple[float, float]:
    """Velocity MSE and REPA loss on 64 fixed draws (latent, flip, t, noise), independent of training."""
    data = LatentDataset(cache_dir, vae_dir, teacher=True)
    batch = torch.utils.data.default_collate([data[i] for i in range(64)])
    g = torch.Generator().manual_seed(123)
    z, flip = draw_latents(batch["mean"], batch["std"], g)
    noise, t = torch.randn(z.shape, generator=g), torch.rand(64, generator=g)
    with torch.no_grad():
        v, tokens = model(interpolate(z, noise, t), t, batch["label"], return_tokens=True)
    teacher = batch["teacher"][torch.arange(64), flip]
    return (v - velocity_target(z, noise)).square().mean().item(), repa_loss(tokens, [teacher]).item()


def test_sit_loss_falls_on_shapes_latents(cache, tmp_path):
    vae_dir, cache_dir = cache
    cfg = config(cache_dir, **{"train.total_images": 640, "train.log_every": 160, "optim.lr": 1e-3})
    summary = train_sit(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["images_seen"] == 640
    assert {"sit/denoise", "sit/repa", "sit/loss"} <= set(metrics(tmp_path / "run")[-1])
    run = load_sit_run(tmp_path / "run", weights="model")
    assert run.latent_shape == (4, 8, 8) and run.num_classes == 6 and run.vae_path == str(vae_dir)
    assert run.model.args.teacher_dims == [112] and run.model.args.encoder_depth == 2
    start = build_sit_stage(cfg)[0].model.eval()
    denoise_0, repa_0 = _held_out_losses(start, cache_dir, vae_dir)
    denoise_1, repa_1 = _held_out_losses(run.model, cache_dir, vae_dir)
    assert denoise_0 == pytest.approx(2.0, abs=0.3)  # zero velocity at init: E|eps - z|^2 = 1 + Var z
    assert denoise_1 < 0.85 * denoise_0
    assert repa_1 < repa_0 - 0.05  # the projected tokens turn toward the teacher's
    ema = load_sit(tmp_path / "run")  # a run folder loads its EMA weights
    assert torch.equal(ema.pos_embed, run.model.pos_embed)
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), run.model.state_dict().values()))


def test_resume_matches_uninterrupted(cache, tmp_path, caplog):
    _, cache_dir = cache
    train_sit(config(cache_dir), tmp_path / "ref")
    train_sit(config(cache_dir, **{"train.total_images": 64}), tmp_path / "run")  # stops at the first checkpoint
    with caplog.at_level("INFO", logger="sendvae.train.loop"):
        summary = train_sit(config(cache_dir), tmp_path / "run")
    assert "resuming from" in caplog.text and summary["images_seen"] == 128
    for name in ("model", "ema"):
        ref = load_file(str(tmp_path / "ref" / "sit" / f"{name}.safetensors"))
        got = load_file(str(tmp_path / "run" / "sit" / f"{name}.safetensors"))
        for key, value in ref.items():
            assert torch.equal(got[key], value), (name, key)


def test_gradient_accumulation_matches_one_micro_batch(cache, tmp_path):
    """Micro-batches of 4 (accumulation 4) take the same draws and reach the same weights as one of 16."""
    _, cache_dir = cache
    train_sit(config(cache_dir, **{"train.total_images": 32}), tmp_path / "full")
    train_sit(config(cache_dir, **{"train.total_images": 32, "train.micro_batch": 4}), tmp_path / "micro")
    full = load_file(str(tmp_path / "full" / "sit" / "model.safetensors"))
    micro = load_file(str(tmp_path / "micro" / "sit" / "model.safetensors"))
    for key, value in full.items():
        torch.testing.assert_close(micro[key], value, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(cache, tmp_path):
    """torchrun with 2 gloo processes x 2 micro-batches of 4 equals 1 process with batch 16 (same draws)."""
    _, cache_dir = cache
    cli = [sys.executable, "-m", "sendvae.cli", "train-sit", "--config", str(CONFIG)]
    one = subprocess.run(cli + ["--out", str(tmp_path / "one")] + overrides(cache_dir, **{"train.total_images": 64}),
                         check=False, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sendvae.cli",
         "train-sit", "--config", str(CONFIG), "--out", str(tmp_path / "two")]
        + overrides(cache_dir, **{"train.total_images": 64, "train.micro_batch": 4}),
        check=False, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["world_size"] == 2
    w1 = load_file(str(tmp_path / "one" / "sit" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "sit" / "model.safetensors"))
    start = build_sit_stage(config(cache_dir))[0].model.state_dict()
    for key, value in w1.items():
        if key != "pos_embed":
            assert not torch.equal(value, start[key]), key  # it trained
        torch.testing.assert_close(w2[key], value, rtol=0, atol=2e-5)


def test_cache_of_another_vae_is_refused(cache, tmp_path):
    vae_dir, cache_dir = cache
    torch.manual_seed(1)
    other = save_vae(build_vae("tiny-f4c4", resolution=RES), tmp_path / "other")
    with pytest.raises(UserError) as info:
        build_sit_stage(config(cache_dir, **{"data.vae": str(other)}))
    assert str(other) in str(info.value) and str(vae_dir) in str(info.value)


def test_cached_tokens_of_another_teacher_resize_are_refused(cache, tmp_path):
    """The cache records the teacher's resize (plain bicubic by default, as REPA); tokens made with the
    other resize are refused, and a cache that does not say (made when the resize was antialiased) counts
    as antialiased."""
    import shutil

    _, cache_dir = cache
    assert json.loads((cache_dir / "manifest.json").read_text())["teacher"]["resize"] == "bicubic"
    with pytest.raises(ConfigError, match="teacher.antialias=True: .* holds tokens of bicubic-resized"):
        build_sit_stage(config(cache_dir, **{"teacher.antialias": "true"}))
    legacy = tmp_path / "legacy"
    shutil.copytree(cache_dir, legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["teacher"]["resize"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="holds tokens of bicubic-antialias-resized images"):
        build_sit_stage(config(legacy))
    stage, _ = build_sit_stage(config(legacy, **{"teacher.antialias": "true"}))
    assert stage.teacher is None  # the cached tokens are used


def test_online_teacher_gives_the_cached_tokens(cache):
    """repa.source=online runs the teacher on the (flipped) images and matches the tokens in the cache."""
    _, cache_dir = cache
    stage_c, data_c = build_sit_stage(config(cache_dir))
    stage_o, data_o = build_sit_stage(config(cache_dir, **{"repa.source": "online", "teacher.name": "effnet-lite0"}))
    assert "image" in data_o[0] and "teacher" in data_c[0]
    collate = torch.utils.data.default_collate
    idx = list(range(16))
    ctx = StepContext(device=torch.device("cpu"), rank=0, world=1, images_seen=32, step=2,
                      generator=torch.Generator(), precision="fp32",
                      _modules={"sit": stage_o.model, **stage_o.frozen_modules()})
    cached = stage_c.prepare_batch(collate([data_c[i] for i in idx]), ctx)
    online = stage_o.prepare_batch(collate([data_o[i] for i in idx]), ctx)
    assert torch.equal(cached["latent"], online["latent"])
    torch.testing.assert_close(online["teacher"], cached["teacher"], rtol=2e-3, atol=2e-3)
    loss, logs = stage_o.loss(online, ctx)
    assert torch.isfinite(loss) and set(logs) == {"denoise", "repa"}


def test_flip_prob_sets_how_often_the_h_flip_is_drawn(cache):
    """data.flip_prob: 0 (REPA / REPA-E, the ImageNet presets) never trains on the flipped view, 1 always;
    the flip draw consumes the step's generator the same way whatever the probability, so the other
    draws (posterior eps, t, noise, label drop) stay those of (seed, images seen)."""
    _, cache_dir = cache
    _, data = build_sit_stage(config(cache_dir))
    batch = torch.utils.data.default_collate([data[i] for i in range(16)])
    ctx = StepContext(device=torch.device("cpu"), rank=0, world=1, images_seen=48, step=3,
                      generator=torch.Generator(), precision="fp32")
    draws, prepared = {}, {}
    for p in (0.0, 0.5, 1.0):
        stage, _ = build_sit_stage(config(cache_dir, **{"data.flip_prob": p}))
        draws[p] = stage.draws(16, tuple(batch["mean"].shape[2:]), ctx)
        prepared[p] = stage.prepare_batch(batch, ctx)
    assert draws[0.0]["flip"].sum() == 0 and draws[1.0]["flip"].sum() == 16
    assert 0 < draws[0.5]["flip"].sum() < 16
    for key in ("eps", "t", "noise", "drop"):
        assert torch.equal(draws[0.0][key], draws[1.0][key])
    for view, p in ((0, 0.0), (1, 1.0)):
        eps = draws[p]["eps"]
        torch.testing.assert_close(prepared[p]["latent"], batch["mean"][:, view] + batch["std"][:, view] * eps)
        assert torch.equal(prepared[p]["teacher"], batch["teacher"][:, view].float())
    root = Path(__file__).resolve().parents[1] / "configs" / "imagenet256"
    assert [load_config(TrainSiTConfig, path).data.flip_prob for path in sorted(root.glob("sit_*.yaml"))] == [0.0, 0.0]


def test_posterior_mean_trains_on_the_means_with_the_same_other_draws(cache):
    """data.posterior=mean (the demo's tiny VAEs) takes the posterior mean of the drawn view instead of a sample;
    time, noise and labels are the same draws as with posterior samples."""
    _, cache_dir = cache
    _, data = build_sit_stage(config(cache_dir))
    batch = torch.utils.data.default_collate([data[i] for i in range(16)])
    ctx = StepContext(device=torch.device("cpu"), rank=0, world=1, images_seen=64, step=4,
                      generator=torch.Generator(), precision="fp32")
    prepared = {}
    for kind in ("sample", "mean"):
        stage, _ = build_sit_stage(config(cache_dir, **{"data.posterior": kind, "data.flip_prob": 0.0}))
        prepared[kind] = stage.prepare_batch(batch, ctx)
    assert torch.equal(prepared["mean"]["latent"], batch["mean"][:, 0])
    assert not torch.equal(prepared["sample"]["latent"], batch["mean"][:, 0])
    for key in ("t", "noise", "label"):
        assert torch.equal(prepared["mean"][key], prepared["sample"][key])


def test_repa_off_trains_a_plain_sit(cache, tmp_path):
    _, cache_dir = cache
    stage, _ = build_sit_stage(config(cache_dir, **{"repa.weight": 0}))
    assert len(stage.model.projectors) == 0 and stage.frozen_modules() == {}


def test_train_sit_command_names_a_missing_cache(tmp_path, capsys):
    from sendvae.cli import main

    code = main(["train-sit", "--out", str(tmp_path / "run"), f"data.cache={tmp_path / 'nothing'}"])
    assert code == 2 and "nothing" in capsys.readouterr().err


def test_lightningdit_style_sit_trains_with_the_direction_term(cache, tmp_path):
    """LightningDiT-T/1 (RoPE, SwiGLU, RMSNorm) + QK-norm, logit-normal shifted t, cosine term: trains and reloads."""
    _, cache_dir = cache
    cfg = config(cache_dir, **{
        "model.preset": "LightningDiT-T/1", "model.qk_norm": True, "transport.time_sampling": "logit-normal",
        "transport.time_shift": 2.0, "transport.cosine_weight": 1.0, "train.total_images": 64, "optim.lr": 1e-3,
    })
    start = build_sit_stage(cfg)[0].model.state_dict()
    summary = train_sit(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["images_seen"] == 64
    last = metrics(tmp_path / "run")[-1]
    assert 0 < last["sit/cosine"] <= 2
    assert last["sit/loss"] == pytest.approx(last["sit/denoise"] + last["sit/cosine"] + 0.5 * last["sit/repa"], rel=1e-4)
    run = load_sit_run(tmp_path / "run", weights="model")
    args = run.model.args
    assert (args.pos, args.mlp, args.norm, args.qk_norm) == ("rope2d", "swiglu", "rmsnorm", True)
    trained = run.model.state_dict()
    assert set(trained) == set(start) and "feat_rope.freqs_cos" in trained and "blocks.0.mlp.w12.weight" in trained
    assert not torch.equal(trained["blocks.0.norm1.weight"], start["blocks.0.norm1.weight"])  # the RMSNorm scale learns
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_model_options_override_the_preset(cache):
    _, cache_dir = cache
    stage, _ = build_sit_stage(config(cache_dir, **{"model.preset": "LightningDiT-T/1", "model.norm": "layernorm"}))
    assert (stage.model.args.pos, stage.model.args.mlp, stage.model.args.norm) == ("rope2d", "swiglu", "layernorm")
    stage, _ = build_sit_stage(config(cache_dir, **{"model.pos": "rope2d"}))
    assert (stage.model.args.pos, stage.model.args.mlp) == ("rope2d", "gelu")
    with pytest.raises(UserError, match="model.mlp"):
        config(cache_dir, **{"model.mlp": "relu"})
