"""The VAE: presets, posterior, latent statistics, and every import / export path (tiny models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fixtures.ldm_reference import ldm_decode, ldm_encode, ldm_shapes, random_ldm_state_dict
from safetensors.torch import load_file, save_file

from sendvae.cli import main
from sendvae.errors import UserError
from sendvae.models.latent_stats import compute_latent_stats
from sendvae.models.vae import DiagonalGaussian, VAEArch, VAE_PRESETS, build_vae, count_parameters, vae_fingerprint
from sendvae.models.vae_formats import (
    diffusers_to_ldm,
    export_diffusers,
    ldm_to_diffusers,
    load_latent_stats,
    load_vae,
    save_vae,
)

# A tiny LDM layout with attention inside its last level (like f16c32's 16x16 level): f2, 4 channels.
TINY_ATTN = VAEArch(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                    attention=(False, True), resolution=16)


def _images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _randomize(module, seed: int = 0):
    """Non-trivial norm weights and biases (defaults are 1 and 0), so a mapping slip shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _outputs(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(x)
        return posterior.mean, posterior.logvar, vae.decode(posterior.mean)


def _assert_same_outputs(a, b, x, atol=1e-6):
    for left, right in zip(_outputs(a, x), _outputs(b, x)):
        torch.testing.assert_close(left, right, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# presets


def test_f16c32_has_the_ldm_f16d32_parameter_count():
    with torch.device("meta"):
        vae = build_vae("f16c32")
    counts = count_parameters(vae)
    assert counts["total"] == 69_836_067
    assert counts["tensors"] == 342
    assert vae.downsample_factor == 16 and vae.latent_channels == 32


@pytest.mark.parametrize("name, latent", [
    ("f8c4", (4, 32, 32)), ("f16c32", (32, 16, 16)), ("f16c16", (16, 16, 16)), ("f16c64", (64, 16, 16)),
    ("tiny-f4c4", (4, 8, 8)), ("tiny-f8c4", (4, 8, 8)), ("tiny-f4c8", (8, 8, 8)),
])
def test_presets_give_their_latent_shape(name, latent):
    arch = VAE_PRESETS[name]
    assert all(w % 32 == 0 for w in arch.block_out_channels)  # bf16 fast path, GroupNorm(32)
    with torch.device("meta"):
        vae = build_vae(name)
    assert vae.preset == name
    x = torch.empty(1, 3, arch.resolution, arch.resolution, device="meta")
    assert tuple(vae.encode(x).mean.shape[1:]) == latent


def test_sd_vae_preset_is_the_known_f8_size():
    with torch.device("meta"):
        assert count_parameters(build_vae("f8c4"))["total"] == 83_653_863  # stabilityai/sd-vae-ft-ema


def test_logvar_init_sets_the_posterior_noise_of_a_random_vae():
    """The bias of the log-variance half of the moments: 0 keeps diffusers' posterior (std about 1), -8 starts it
    at std about exp(-4) for any image (it replaces a random bias of at most 1 / sqrt(8) = 0.35), while the means
    and the decoder stay those of the same seed."""
    x = _images(4, 32)
    torch.manual_seed(0)
    default = build_vae("tiny-f4c4").encode(x)
    torch.manual_seed(0)
    sharp = build_vae("tiny-f4c4", logvar_init=-8.0).encode(x)
    assert abs(default.logvar.mean().item()) < 0.5
    torch.testing.assert_close(sharp.logvar - default.logvar, torch.full_like(default.logvar, -8.0), atol=0.36, rtol=0)
    torch.testing.assert_close(sharp.mean, default.mean)
    assert 0.01 < sharp.std.median().item() < 0.04


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="tiny-f4c4"):
        build_vae("f32c1")


# ----------------------------------------------------------------------------------------------
# posterior, normalisation, precision


def test_kl_matches_independent_formula():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    posterior = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)


def test_sample_is_mean_plus_std_times_seeded_noise():
    posterior = DiagonalGaussian(torch.full((2, 4, 3, 3), 0.5), torch.full((2, 4, 3, 3), -2.0))
    z = posterior.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, 0.5 + torch.exp(torch.tensor(-1.0)) * eps)
    from_pair = DiagonalGaussian.from_mean_std(posterior.mean, posterior.std)
    torch.testing.assert_close(from_pair.logvar, posterior.logvar)


def test_forward_returns_recon_posterior_and_z():
    vae = build_vae("tiny-f4c4")
    x = _images(2, 32)
    recon, posterior, z = vae(x, sample=False)
    assert recon.shape == x.shape and z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, posterior.mean)
    _, _, z1 = vae(x, generator=torch.Generator().manual_seed(3))
    _, _, z2 = vae(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z1, z2)
    assert not torch.allclose(z1, posterior.mean)


def test_normalize_denormalize_round_trip():
    vae = build_vae("tiny-f4c4")
    mean, std = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 1.5, 4.0])
    vae.set_latent_stats(mean, std)
    z = torch.randn(3, 4, 8, 8)
    normalized = vae.normalize(z)
    torch.testing.assert_close(normalized[:, 2], (z[:, 2] - 2.0) / 1.5)
    torch.testing.assert_close(vae.denormalize(normalized), z, rtol=1e-6, atol=1e-6)


def test_latent_stats_are_validated():
    vae = build_vae("tiny-f4c4")
    with pytest.raises(UserError, match="4 latent channels"):
        vae.set_latent_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(UserError, match="std > 0"):
        vae.set_latent_stats(torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_bf16_autocast_on_cpu_trains_both_last_layers():
    vae = _randomize(build_vae("tiny-f4c4"))
    x = _images(2, 32)
    with torch.no_grad():
        reference, _, _ = vae(x, sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, posterior, _ = vae(x, sample=False)
        loss = (recon.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
    assert posterior.mean.dtype == torch.float32 and posterior.kl().dtype == torch.float32
    assert torch.isfinite(loss)
    rel = (recon.float() - reference).norm() / reference.norm()
    # bf16 keeps 8 mantissa bits; through ~20 random layers the relative error measured 0.04-0.053 over
    # seeds. 0.15 leaves room for that and still catches a broken cast (garbage, overflow, NaN).
    assert rel < 0.15, f"bf16 relative error {rel:.3f}"
    loss.backward()
    assert vae.encoder_last_layer().grad is not None and vae.encoder_last_layer().grad.abs().sum() > 0
    assert vae.decoder_last_layer().grad is not None and vae.decoder_last_layer().grad.abs().sum() > 0
    assert vae.encoder_last_layer() is vae.autoencoder.encoder.conv_out.weight
    assert vae.decoder_last_layer() is vae.autoencoder.decoder.conv_out.weight


# ----------------------------------------------------------------------------------------------
# LDM-format checkpoints


def test_ldm_key_mapping_covers_every_f16c32_tensor():
    """LDM f16d32 names (from the LDM architecture, fixtures/ldm_reference.py) all map, shapes agree."""
    shapes = ldm_shapes(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=32)
    ldm = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    arch, converted = ldm_to_diffusers(ldm)
    assert arch == VAE_PRESETS["f16c32"]
    with torch.device("meta"):
        expected = build_vae("f16c32").autoencoder.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    level_attention = [k for k in shapes if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
    assert len(level_attention) == 50
    assert sum(".attentions." in k and "mid_block" not in k for k in converted) == 50


def test_ldm_checkpoint_matches_an_independent_ldm_forward(tmp_path):
    shapes = ldm_shapes(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=4)
    ldm = random_ldm_state_dict(shapes, seed=3, dtype=torch.float32)
    path = tmp_path / "vavae.ckpt"
    # Lightning-style nesting with a prefix, other models beside it, and a non-tensor entry.
    torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in ldm.items()},
                               "model.diffusion_model.out.weight": torch.zeros(2)}, "global_step": 12}, path)
    vae = load_vae(path).double()
    assert vae.arch == TINY_ATTN and vae.source["prefix"] == "state_dict.first_stage_model."
    reference = {k: v.double() for k, v in ldm.items()}
    x = _images(2, 16).double()
    moments = ldm_encode(reference, x)
    with torch.no_grad():
        posterior = vae.encode(x)
        torch.testing.assert_close(posterior.mean, moments[:, :4], atol=1e-10, rtol=0)
        torch.testing.assert_close(posterior.logvar, moments[:, 4:].clamp(-30, 20), atol=1e-10, rtol=0)
        z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(vae.decode(z), ldm_decode(reference, z), atol=1e-10, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_ldm_round_trip_through_the_inverse_mapping(tmp_path, suffix):
    vae = _randomize(build_vae(TINY_ATTN))
    ldm = diffusers_to_ldm(vae)
    assert ldm["encoder.down.1.attn.0.q.weight"].shape == (64, 64, 1, 1)
    path = tmp_path / f"vae{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
    else:
        torch.save({"vae": ldm}, path)  # REPA-E full checkpoints keep the VAE under "vae"
    loaded = load_vae(path)
    assert vae_fingerprint(loaded) == vae_fingerprint(vae)
    _assert_same_outputs(vae, loaded, _images())


def test_bare_diffusers_weight_file_loads(tmp_path):
    vae = _randomize(build_vae(TINY_ATTN))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = {f"first_stage_model.{k}": v.contiguous() for k, v in vae.autoencoder.state_dict().items()}
    save_file({**weights, "first_stage_model.encoder.down_blocks.0.resnets.0.extra.weight": torch.zeros(1)},
              str(path))
    with pytest.raises(UserError, match=r"1 unexpected keys: encoder\.down_blocks\.0\.resnets\.0\.extra\.weight"):
        load_vae(path)
    save_file(weights, str(path))
    loaded = load_vae(path)
    assert loaded.source["format"] == "diffusers-weights"
    assert vae_fingerprint(loaded) == vae_fingerprint(vae)


def test_import_lists_missing_and_unexpected_keys(tmp_path):
    ldm = diffusers_to_ldm(build_vae(TINY_ATTN))
    del ldm["decoder.up.1.attn.1.proj_out.bias"]
    ldm["encoder.down.0.block.0.extra_conv.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
    with pytest.raises(UserError) as info:
        load_vae(path)
    message = str(info.value)
    assert "1 missing keys: decoder.up.1.attn.1.proj_out.bias" in message
    assert "1 unexpected keys: encoder.down.0.block.0.extra_conv.weight" in message
    assert str(path) in message


def test_wrong_shape_is_reported(tmp_path):
    ldm = diffusers_to_ldm(build_vae(TINY_ATTN))
    ldm["decoder.up.1.upsample.conv.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "shape.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
    with pytest.raises(UserError, match=r"wrong shape keys: decoder\.up\.1\.upsample\.conv\.weight \(64, 64, 1, 1\)"):
        load_vae(path)


def test_pickled_checkpoint_is_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": diffusers_to_ldm(build_vae(TINY_ATTN)), "hyper_parameters": Path("x")}, path)
    with pytest.raises(UserError) as info:
        load_vae(path)
    message = str(info.value)
    assert "weights_only=True" in message and "sendvae never unpickles code" in message
    assert f"sendvae convert-pickle {path} {tmp_path / 'lightning.safetensors'} --trust-pickle" in message


def test_several_autoencoders_need_a_prefix(tmp_path):
    ldm = diffusers_to_ldm(build_vae(TINY_ATTN))
    path = tmp_path / "two.safetensors"
    both = {**{f"vae.{k}": v for k, v in ldm.items()}, **{f"ema_vae.{k}": v.clone() for k, v in ldm.items()}}
    save_file({k: v.contiguous() for k, v in both.items()}, str(path))
    with pytest.raises(UserError, match=r"\['ema_vae\.', 'vae\.'\]"):
        load_vae(path)
    assert load_vae(path, prefix="ema_vae.").source["prefix"] == "ema_vae."


def test_repae_stats_file_gives_mean_and_inverse_scale(tmp_path):
    bias, scale = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 4.0, 0.5, 1.0])
    stats = tmp_path / "sdvae-latents-stats.pt"
    torch.save({"latents_bias": bias.view(1, 4, 1, 1), "latents_scale": scale.view(1, 4, 1, 1)}, stats)
    mean, std = load_latent_stats(stats)
    torch.testing.assert_close(mean, bias)
    torch.testing.assert_close(std, 1 / scale)
    ckpt = tmp_path / "sdvae.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(build_vae(TINY_ATTN)).items()}, str(ckpt))
    vae = load_vae(ckpt, stats=stats)
    torch.testing.assert_close(vae.latent_std, 1 / scale)


# ----------------------------------------------------------------------------------------------
# diffusers folders and sendvae folders


def _diffusers_model():
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    model = AutoencoderKL(**build_vae(TINY_ATTN).config)
    return _randomize(model, seed=5)


def test_diffusers_folder_gives_the_same_outputs(tmp_path):
    model = _diffusers_model()
    model.register_to_config(scaling_factor=0.25)
    model.save_pretrained(tmp_path / "ft-ema")
    vae = load_vae(tmp_path / "ft-ema")
    assert vae.source["format"] == "diffusers"
    torch.testing.assert_close(vae.latent_std, torch.full((4,), 4.0))  # std = 1 / scaling_factor
    x = _images()
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        torch.testing.assert_close(vae.encode(x).mean, dist.mean)
        torch.testing.assert_close(vae.decode(dist.mean), model.decode(dist.mean).sample)


def test_diffusers_folder_with_old_attention_names(tmp_path):
    model = _diffusers_model()
    folder = tmp_path / "old"
    model.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    old = {}
    for key, value in load_file(str(weights)).items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{legacy}.")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(weights))
    vae = load_vae(folder)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).mean, model.encode(x).latent_dist.mean)


def test_export_loads_in_diffusers_with_same_outputs(tmp_path):
    from diffusers import AutoencoderKL

    vae = _randomize(build_vae(TINY_ATTN))
    vae.set_latent_stats(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.5, 2.5, 3.5, 4.5]))
    folder = export_diffusers(vae, tmp_path / "export")
    model = AutoencoderKL.from_pretrained(folder)
    x = _images()
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        torch.testing.assert_close(dist.mean, vae.encode(x).mean)
        torch.testing.assert_close(model.decode(dist.mean).sample, vae.decode(dist.mean))
    assert model.config.latents_mean == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert model.config.scaling_factor == 1.0
    assert json.loads((folder / "latent_stats.json").read_text())["std"] == pytest.approx([1.5, 2.5, 3.5, 4.5])
    assert vae_fingerprint(load_vae(folder)) == vae_fingerprint(vae)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_sendvae_folder_round_trip_and_fingerprint(tmp_path):
    vae = _randomize(build_vae("tiny-f4c8"))
    vae.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    folder = save_vae(vae, tmp_path / "vae")
    assert json.loads((folder / "config.json").read_text())["format"] == "sendvae-vae"
    loaded = load_vae(folder)
    assert loaded.preset == "tiny-f4c8"
    assert vae_fingerprint(loaded) == vae_fingerprint(vae)
    torch.testing.assert_close(loaded.latent_std, vae.latent_std, rtol=0, atol=0)
    _assert_same_outputs(vae, loaded, _images(2, 32), atol=0)
    loaded.set_latent_stats(torch.zeros(8), torch.ones(8))
    assert vae_fingerprint(loaded) != vae_fingerprint(vae)
    assert vae_fingerprint(loaded, include_stats=False) == vae_fingerprint(vae, include_stats=False)
    save_vae(loaded, folder)  # overwriting an existing folder replaces it
    assert vae_fingerprint(load_vae(folder)) == vae_fingerprint(loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_unknown_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vae(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model": "unet"}')
    with pytest.raises(UserError, match="neither a sendvae VAE config"):
        load_vae(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_vae(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------------------------
# latent statistics of a dataset


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(2),
                                    dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": torch.tensor(0), "index": torch.tensor(i)}


def test_latent_stats_on_a_known_dataset():
    vae = _randomize(build_vae("tiny-f4c4"))
    data = _Images(7, 32)
    with torch.no_grad():
        posterior = vae.encode(data.images.float() / 127.5 - 1)
    z, s = posterior.mean.double(), posterior.std.double()
    mean, std = compute_latent_stats(vae, data, num_images=7, batch_size=3, latent="mean")
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, z.std(dim=(0, 2, 3), unbiased=False).float(), atol=1e-5, rtol=1e-5)
    vae.set_latent_stats(mean, std)
    normalized = vae.normalize(z.float())
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    # default: the posterior samples stage 2 trains on; variance of the means plus the mean posterior variance
    post_mean, post_std = compute_latent_stats(vae, data, num_images=7, batch_size=3)
    torch.testing.assert_close(post_mean, mean)
    expected = (z.var(dim=(0, 2, 3), unbiased=False) + s.pow(2).mean(dim=(0, 2, 3))).sqrt().float()
    torch.testing.assert_close(post_std, expected, atol=1e-5, rtol=1e-5)
    # ... which is what many drawn samples give
    draws = torch.cat([posterior.mean + posterior.std * torch.randn(posterior.mean.shape) for _ in range(400)])
    torch.testing.assert_close(post_std, draws.std(dim=(0, 2, 3)), atol=0, rtol=0.02)
    with pytest.raises(UserError, match="posterior, mean or sample"):
        compute_latent_stats(vae, data, num_images=7, latent="mode")


def test_latent_stats_draw_from_the_whole_dataset_not_its_first_images():
    """A class-sorted store: the first half dark, the second half bright. Statistics on half of the
    images must describe both halves (a random subset), not the first half's (a prefix)."""
    vae = _randomize(build_vae("tiny-f4c4"))
    data = _Images(64, 16)
    data.images[:32] = data.images[:32] // 16
    data.images[32:] = 255 - data.images[32:] // 16

    def stats(dataset, n, seed=0):
        return torch.cat(compute_latent_stats(vae, dataset, num_images=n, latent="mean", subset_seed=seed))

    whole, drawn = stats(data, 64), stats(data, 32)
    first_half = stats(torch.utils.data.Subset(data, range(32)), 32)
    assert (drawn - whole).norm() < 0.3 * (first_half - whole).norm()
    assert not torch.equal(stats(data, 32, seed=1), drawn)


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_convert_info_export(tmp_path, capsys):
    vae = _randomize(build_vae(TINY_ATTN))
    ckpt = tmp_path / "ldm.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(vae).items()}, str(ckpt))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": [0, 1, 2, 3], "std": [1, 2, 3, 4]}))
    assert main(["vae", "convert", str(ckpt), str(tmp_path / "conv"), "--stats", str(stats)]) == 0
    capsys.readouterr()
    assert main(["vae", "info", str(tmp_path / "conv"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "sendvae-vae" and info["preset"] == "custom"
    assert info["parameters"]["total"] == sum(p.numel() for p in vae.parameters())
    assert info["latent_stats"]["std"] == [1, 2, 3, 4]
    assert info["fingerprint"] != vae_fingerprint(vae)  # the statistics are part of the fingerprint
    assert main(["vae", "export", str(tmp_path / "conv"), str(tmp_path / "diff")]) == 0
    assert (tmp_path / "diff" / "diffusion_pytorch_model.safetensors").is_file()
    _assert_same_outputs(vae, load_vae(tmp_path / "diff"), _images())


def test_cli_reports_a_bad_path_as_a_user_error(tmp_path, capsys):
    assert main(["vae", "info", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_stats_writes_a_folder_carrying_the_statistics(tmp_path):
    from sendvae.data.store import open_image_dataset

    vae = _randomize(build_vae("tiny-f4c4"))
    save_vae(vae, tmp_path / "base")
    code = main(["vae", "stats", str(tmp_path / "base"), "--data", "shapes:10", "--num-images", "10",
                 "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "with-stats")])
    assert code == 0
    loaded = load_vae(tmp_path / "with-stats")
    images = torch.stack([open_image_dataset("shapes:10", 32)[i]["image"] for i in range(10)])
    with torch.no_grad():
        posterior = vae.encode(images.float() / 127.5 - 1)
    z, s = posterior.mean.double(), posterior.std.double()
    torch.testing.assert_close(loaded.latent_mean, z.mean(dim=(0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
    sample_std = (z.var(dim=(0, 2, 3), unbiased=False) + s.pow(2).mean(dim=(0, 2, 3))).sqrt().float()
    torch.testing.assert_close(loaded.latent_std, sample_std, atol=1e-5, rtol=1e-5)
    record = json.loads((tmp_path / "with-stats" / "latent_stats.json").read_text())
    assert record["num_images"] == 10 and record["data"] == "shapes:10" and record["latent"] == "posterior"
    assert record["seed"] == 0
    assert main(["vae", "stats", str(tmp_path / "base"), "--data", "shapes:10", "--num-images", "10",
                 "--device", "cpu", "--latent", "mean", "--out", str(tmp_path / "of-means")]) == 0
    means_only = load_vae(tmp_path / "of-means")
    torch.testing.assert_close(means_only.latent_std, z.std(dim=(0, 2, 3), unbiased=False).float(), atol=1e-5,
                               rtol=1e-5)
    copy = json.loads((save_vae(loaded, tmp_path / "copy") / "latent_stats.json").read_text())
    assert copy["num_images"] == 10  # the provenance of the statistics survives a re-save
    # only the statistics changed: same weights
    assert all(torch.equal(a, b) for a, b in zip(loaded.autoencoder.state_dict().values(),
                                                 vae.autoencoder.state_dict().values()))
