"""Stage 1 (Send-VAE fine-tuning) on tiny shapes: every alignment mode learns, gradients go where
SPEC section 2 says, the GAN phase starts on time, resume is exact, RUN/vae is what was trained,
the command line works and the presets hold the paper's recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sendvae.cli import main
from sendvae.config import load_config
from sendvae.data.store import open_image_dataset
from sendvae.models.vae_formats import load_vae
from sendvae.pixels import to_model
from sendvae.train.checkpoint import load_latest
from sendvae.train.stage import StepContext
from sendvae.train.vae import TrainVAEConfig, build_vae_stage, train_vae

ROOT = Path(__file__).resolve().parents[1]
# 16 px shapes, tiny-f4c4 (4x4x4 latent), EfficientNet-Lite0 tokens on a 4x4 grid (64 px input), fp32.
TINY = ["data.source=shapes:256", "data.resolution=16", "teacher.grid=4", "alignment.mapper_width=64",
        "alignment.mapper_heads=2", "alignment.mlp_hidden=128", "model.stats_images=64", "optim.lr=1e-3",
        "train.batch_size=16", "train.num_workers=0", "train.device=cpu", "train.precision=fp32"]


def tiny(*overrides: str) -> TrainVAEConfig:
    return load_config(TrainVAEConfig, None, [*TINY, *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["none", "vf", "sendvae"])
def test_each_alignment_mode_trains_and_its_losses_fall(tmp_path: Path, kind: str) -> None:
    run = tmp_path / kind
    train_vae(tiny(f"alignment.kind={kind}", "alignment.vf_adaptive=false", "train.total_images=480",
                   "train.log_every=160", "train.checkpoint_every=480"), run)
    first, last = metrics(run)[0], metrics(run)[-1]
    assert last["vae/rec"] < 0.9 * first["vae/rec"]  # 30 steps at 16 px: about 0.8 for every mode
    if kind == "none":
        assert "vae/align_loss" not in last
    else:
        assert last["vae/align_loss"] < first["vae/align_loss"] - 0.02
    assert load_vae(run / "vae").latent_channels == 4


def test_alignment_gradients_reach_encoder_and_mapper_never_decoder_or_teacher(tmp_path: Path) -> None:
    """With only the alignment term, one step moves the encoder and the mapper; decoder and teacher stay."""
    cfg = tiny("alignment.kind=sendvae", "loss.reconstruction_weight=0", "loss.kl_weight=0", "train.total_images=16")
    stage, _ = build_vae_stage(cfg)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in {**stage.modules(), **stage.frozen_modules()}.items()}
    from sendvae.train.loop import train

    train(stage, open_image_dataset(cfg.data.source, cfg.data.resolution), cfg.train, tmp_path / "run")
    vae = stage.vae.autoencoder
    changed = {k for k, v in stage.vae.state_dict().items() if not torch.equal(v, before["vae"][k])}
    assert any(k.startswith("autoencoder.encoder.") for k in changed)
    assert any(k.startswith("autoencoder.quant_conv.") for k in changed)
    assert not any(k.startswith(("autoencoder.decoder.", "autoencoder.post_quant_conv.")) for k in changed)
    assert all(p.grad is None for p in vae.decoder.parameters())
    mapper = stage.alignment.mapper.state_dict()
    assert all(not torch.equal(v, before["alignment"]["mapper." + k]) for k, v in mapper.items() if "weight" in k)
    teacher = stage.teacher
    assert all(torch.equal(v, before["teacher"][k]) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_logvar_init_applies_to_a_preset_and_is_refused_for_a_trained_vae(tmp_path: Path) -> None:
    from sendvae.config import ConfigError
    from sendvae.train.vae import initial_vae

    x = torch.zeros(1, 3, 16, 16)
    assert initial_vae(tiny("model.logvar_init=-8")).encode(x).logvar.mean().item() < -7
    train_vae(tiny("alignment.kind=none", "train.total_images=16"), tmp_path / "base")
    with pytest.raises(ConfigError, match=r"logvar_init=-8 only applies to a random init.*model.logvar_init=0"):
        initial_vae(tiny(f"model.init={tmp_path / 'base' / 'vae'}", "model.logvar_init=-8"))


def test_disc_settings_that_contradict_disc_init_are_refused(tmp_path: Path) -> None:
    """With loss.disc_init the architecture comes from the file: a non-default disc_channels / disc_layers /
    disc_norm the file contradicts stops with both values; defaults (ndf 64, 3 layers, batch norm here
    all differ from the file) and agreeing values load the file."""
    from safetensors.torch import save_file

    from sendvae.config import ConfigError
    from sendvae.models.discriminator import PatchDiscriminator
    from sendvae.train.vae import initial_discriminator

    disc = PatchDiscriminator(3, ndf=32, n_layers=2, norm="act")
    save_file(disc.state_dict(), str(tmp_path / "disc.safetensors"))
    init = f"loss.disc_init={tmp_path / 'disc.safetensors'}"
    for setting, message in (("loss.disc_layers=4", "loss.disc_layers=4 contradicts .* disc_layers=2"),
                             ("loss.disc_channels=48", "loss.disc_channels=48 contradicts .* disc_channels=32"),
                             ("loss.disc_norm=act", None), ("loss.disc_layers=2", None), ("loss.disc_channels=64", None)):
        loss = tiny(init, setting).loss
        if message:
            with pytest.raises(ConfigError, match=message):
                initial_discriminator(loss)
        else:
            loaded = initial_discriminator(loss)
            assert (loaded.ndf, loaded.n_layers, loaded.norm) == (32, 2, "act")
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), disc.state_dict().values()))
    save_file(PatchDiscriminator(3, ndf=32, n_layers=2).state_dict(), str(tmp_path / "batch.safetensors"))
    with pytest.raises(ConfigError, match="loss.disc_norm=act contradicts .* disc_norm=batch"):
        initial_discriminator(tiny(f"loss.disc_init={tmp_path / 'batch.safetensors'}", "loss.disc_norm=act").loss)


def test_gan_phase_starts_at_gan_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny("alignment.kind=none", "loss.gan_weight=0.1", "loss.gan_start=32", "loss.disc_channels=32",
               "loss.disc_layers=2", "train.total_images=64", "train.log_every=16", "train.checkpoint_every=16",
               "train.keep_last=5")
    stage, _ = build_vae_stage(cfg)
    initial = {k: v.clone() for k, v in stage.discriminator.state_dict().items()}
    train_vae(cfg, run)
    records = {r["images"]: r for r in metrics(run)}
    assert "disc/loss" not in records[32] and "vae/gan_g" not in records[32]
    assert "disc/loss" in records[48] and "vae/gan_g" in records[48]
    ckpts = run / "checkpoints"
    at_32 = load_latest(ckpts).path.parent / "ckpt-000000000032"
    from sendvae.train.checkpoint import load_checkpoint

    disc_32 = load_checkpoint(at_32).tensors("model.disc")
    weights = [k for k in initial if k.endswith("weight")]
    assert all(torch.equal(disc_32[k], initial[k]) for k in weights)  # untouched before gan_start
    disc_64 = load_latest(ckpts).tensors("model.disc")
    assert any(not torch.equal(disc_64[k], initial[k]) for k in weights)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Stop at 32 images and continue to 64: every tensor of the final checkpoint equals a straight run
    (Send-VAE with noise, posterior sampling, GAN and its BatchNorm buffers, both optimisers)."""
    common = ["alignment.kind=sendvae", "loss.gan_weight=0.1", "loss.disc_channels=32", "loss.disc_layers=2",
              "train.checkpoint_every=32"]
    train_vae(tiny(*common, "train.total_images=64"), tmp_path / "straight")
    train_vae(tiny(*common, "train.total_images=32"), tmp_path / "resumed")
    summary = train_vae(tiny(*common, "train.total_images=64"), tmp_path / "resumed")
    assert summary["images_seen"] == 64 and summary["steps"] == 4
    a, b = load_latest(tmp_path / "straight" / "checkpoints"), load_latest(tmp_path / "resumed" / "checkpoints")
    for group in ("model.vae", "model.alignment", "model.disc"):
        ta, tb = a.tensors(group), b.tensors(group)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{group}/{key}"
    for key in ("optim.vae", "optim.disc"):
        sa, sb = a.torch_state(key)["state"], b.torch_state(key)["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_published_vae_holds_the_ema_weights_and_fresh_latent_stats(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny("alignment.kind=none", "train.total_images=48", "train.ema=true", "train.ema_decay=0.5")
    train_vae(cfg, run)
    published = load_vae(run / "vae")
    checkpoint = load_latest(run / "checkpoints")
    ema, raw = checkpoint.tensors("ema.vae"), checkpoint.tensors("model.vae")
    own = published.state_dict()
    assert all(torch.equal(own[k], ema[k]) for k in ema if not k.startswith("latent_"))
    assert any(not torch.equal(own[k], raw[k]) for k in raw if not k.startswith("latent_"))
    # Statistics of the posterior samples on the 64 images drawn by train.seed (0) from the 256: mean of the
    # means, and population std from the variance of the means plus the mean posterior variance.
    data = open_image_dataset(cfg.data.source, cfg.data.resolution)
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.train.seed))[:64]
    images = torch.stack([data[int(i)]["image"] for i in chosen.sort().values])
    with torch.no_grad():
        posterior = published.encode(to_model(images))
    z, s = posterior.mean.double(), posterior.std.double()
    std = (z.var(dim=(0, 2, 3), unbiased=False) + s.pow(2).mean(dim=(0, 2, 3))).sqrt()
    torch.testing.assert_close(published.latent_mean.double(), z.mean(dim=(0, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(published.latent_std.double(), std, rtol=0, atol=1e-5)


def test_cli_trains_base_preset_then_fine_tunes_from_its_vae(tmp_path: Path, capsys) -> None:
    base, send = tmp_path / "base", tmp_path / "send"
    shrink = [*TINY, "train.total_images=32", "train.log_every=16", "train.checkpoint_every=32"]
    assert main(["train-vae", "--config", str(ROOT / "configs/shapes/base.yaml"), "--out", str(base), *shrink]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["vae"] == str(base / "vae")
    assert (base / "vae" / "model.safetensors").is_file() and (base / "config.yaml").is_file()
    args = ["train-vae", "--config", str(ROOT / "configs/shapes/sendvae.yaml"), "--out", str(send), *shrink]
    assert main(args) == 2
    assert "model.init is empty" in capsys.readouterr().err
    assert main([*args, f"model.init={base / 'vae'}"]) == 0
    tuned = load_file(str(send / "vae" / "model.safetensors"))
    start = load_file(str(base / "vae" / "model.safetensors"))
    assert any(not torch.equal(tuned[k], start[k]) for k in start)
    assert main(["train-vae", "--out", str(tmp_path / "empty"), "--resume", *TINY]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train-vae", "--out", str(tmp_path / "x"), "alignment.kind=mapper"]) == 2
    assert "alignment.kind" in capsys.readouterr().err


def test_presets_load_and_hold_the_paper_recipe() -> None:
    presets = sorted((ROOT / "configs/shapes").glob("*.yaml")) + sorted((ROOT / "configs/imagenet256").glob("*.yaml"))
    stage1 = [p for p in presets if not p.name.startswith("sit")]
    assert len(stage1) >= 20
    for path in stage1:
        load_config(TrainVAEConfig, path)
    paper = load_config(TrainVAEConfig, ROOT / "configs/imagenet256/sendvae_vavae_f16c32.yaml")
    assert paper.data.resolution == 256 and paper.teacher.name == "dinov2-b" and paper.teacher.grid == 16
    assert (paper.alignment.kind, paper.alignment.weight, paper.alignment.noise, paper.alignment.mapper_depth) == (
        "sendvae", 1.0, True, 1)
    assert paper.train.total_images == 80 * 1_281_167 and paper.train.batch_size == 1024
    assert (paper.optim.lr, paper.optim.beta1, paper.optim.beta2, paper.optim.weight_decay) == (3e-4, 0.9, 0.999, 0.0)
    assert paper.train.grad_clip == 1.0 and paper.loss.reconstruction == "l1"
    assert (paper.loss.lpips_weight, paper.loss.kl_weight, paper.loss.gan_weight) == (1.0, 1e-6, 0.1)
    vf = load_config(TrainVAEConfig, ROOT / "configs/imagenet256/vf_vavae_f16c32.yaml")
    assert (vf.alignment.kind, vf.alignment.weight, vf.alignment.vf_adaptive) == ("vf", 0.1, True)
    for path in (ROOT / "configs/imagenet256/vf_vavae_f16c32.yaml", ROOT / "configs/shapes/vf.yaml"):
        assert load_config(TrainVAEConfig, path).alignment.normalize_latent is False  # VA-VAE: the raw latent
    depths = {load_config(TrainVAEConfig, ROOT / f"configs/shapes/{n}.yaml").alignment.mapper_depth
              for n in ("sendvae_depth0", "sendvae", "sendvae_depth2")}
    assert depths == {0, 1, 2}
    assert load_config(TrainVAEConfig, ROOT / "configs/shapes/sendvae_nonoise.yaml").alignment.noise is False


@pytest.mark.parametrize("normalize", [False, True])
def test_alignment_sees_the_raw_or_the_normalised_posterior_sample(normalize: bool) -> None:
    """alignment.normalize_latent=false hands the alignment head the raw posterior sample (VA-VAE's VF
    loss), true the sample normalised with the VAE's latent statistics (Send-VAE, SPEC step 2)."""
    stage, data = build_vae_stage(tiny("alignment.kind=vf", "alignment.vf_adaptive=false",
                                       f"alignment.normalize_latent={normalize}", "train.total_images=16"))
    stage.vae.set_latent_stats(torch.full((4,), 0.5), torch.full((4,), 3.0))
    seen: list[torch.Tensor] = []
    stage.alignment.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    ctx = StepContext(device=torch.device("cpu"), rank=0, world=1, images_seen=0, step=0,
                      generator=torch.Generator().manual_seed(3), precision="fp32",
                      _modules={**stage.modules(), **stage.frozen_modules()})
    batch = stage.prepare_batch(torch.utils.data.default_collate([data[i] for i in range(4)]), ctx)
    stage.vae_loss(batch, ctx)
    with torch.no_grad():
        z = stage.vae.encode(batch["x"]).sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(seen[0], stage.vae.normalize(z) if normalize else z)


@pytest.mark.parametrize("folder, suffix", [("shapes", ""), ("imagenet256", "_vavae_f16c32")])
def test_depth_ablation_presets_run_without_noise(folder: str, suffix: str) -> None:
    """The paper's mapper-depth ablation (Table 2) runs without noise injection: its depth-1 row is
    Table 3's no-noise row. So each depth preset is the no-noise preset with another depth."""
    nonoise = load_config(TrainVAEConfig, ROOT / f"configs/{folder}/sendvae_nonoise{suffix}.yaml")
    assert nonoise.alignment.noise is False and nonoise.alignment.mapper_depth == 1
    for depth in (0, 2):
        preset = load_config(TrainVAEConfig, ROOT / f"configs/{folder}/sendvae_depth{depth}{suffix}.yaml")
        assert preset.alignment.mapper_depth == depth
        preset.alignment.mapper_depth = 1
        assert preset == nonoise


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes (micro-batch 8) against 1 process (batch 16), deterministic settings
    (posterior mean, no noise, no GAN: BatchNorm statistics would differ per process by design).

    Tolerance 2e-4 (5% of lr x steps): all-reducing and splitting the batch change float32 rounding
    only, but Adam divides each gradient by its running RMS, so a weight whose gradient is ~0 can
    move by up to lr per step either way (one process with 2 x 8 accumulation differs from 1 x 16
    by the same 4.6e-5 here). Gradients that were not synchronised would differ by ~lr x steps = 4e-3."""
    common = [*TINY, "alignment.kind=sendvae", "alignment.noise=false", "model.sample_posterior=false",
              "train.total_images=64", "model.export_stats=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "sendvae.cli", "train-vae", "--out", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "sendvae.cli", "train-vae", "--out", str(tmp_path / "two"), *common,
                          "train.micro_batch=8"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_latest(tmp_path / "one" / "checkpoints"), load_latest(tmp_path / "two" / "checkpoints")
    assert b.state["world_size"] == 2
    for group in ("model.vae", "model.alignment"):
        ta, tb = a.tensors(group), b.tensors(group)
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], rtol=0, atol=2e-4, msg=f"{group}/{key}")
