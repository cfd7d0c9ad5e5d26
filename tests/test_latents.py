"""Latent cache: posterior of image and h-flip, normalisation at load, fingerprints, resume, ranks."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sendvae.data import latents as latents_lib
from sendvae.data.latents import (
    LatentDataset,
    cache_latents,
    draw_latents,
    images_hash,
    open_cache,
    shard_name,
)
from sendvae.data.store import open_image_dataset
from sendvae.errors import UserError
from sendvae.models.vae import build_vae
from sendvae.models.vae_formats import load_vae, save_vae
from sendvae.pixels import to_model

N, RES = 24, 32
SPEC = f"shapes:{N}"


def _vae(tmp_path, name="vae", seed=0):
    torch.manual_seed(seed)
    vae = build_vae("tiny-f4c4", resolution=RES)
    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 0.5, 1.0, 4.0]))
    return save_vae(vae, tmp_path / name)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    vae_dir = _vae(root)
    out = root / "latents"
    cache_latents(vae_dir, SPEC, out, batch_size=5, resolution=RES, shard_size=10, device="cpu", num_workers=0)
    return vae_dir, out


def test_cache_holds_normalised_posterior_of_image_and_flip(cached):
    vae_dir, out = cached
    vae = load_vae(vae_dir)
    info = open_cache(out)
    assert info.count == N and info.latent_shape == (4, 8, 8)
    assert [s["count"] for s in info.manifest["shards"]] == [10, 10, 4]
    data = LatentDataset(out, vae_dir)
    images = open_image_dataset(SPEC, RES)
    mu, sigma = vae.latent_mean.view(1, -1, 1, 1), vae.latent_std.view(1, -1, 1, 1)
    for i in (0, 13, 23):
        item = data[i]
        image = images[i]["image"][None]
        with torch.no_grad():
            plain, flipped = vae.encode(to_model(image)), vae.encode(to_model(image.flip(-1)))
        torch.testing.assert_close(item["mean"][0], ((plain.mean - mu) / sigma)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["std"][0], (plain.std / sigma)[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(item["mean"][1], ((flipped.mean - mu) / sigma)[0], rtol=1e-4, atol=1e-5)
        assert int(item["index"]) == i and int(item["label"]) == int(images[i]["label"])
    raw = LatentDataset(out)[13]  # without a VAE: the raw posterior
    torch.testing.assert_close(raw["mean"] , data[13]["mean"] * sigma[0] + mu[0], rtol=1e-4, atol=1e-5)


def test_dataset_hash_is_the_hash_of_the_images(cached):
    _, out = cached
    images = open_image_dataset(SPEC, RES)
    digest = hashlib.sha256()
    for start, stop in ((0, 10), (10, 20), (20, 24)):
        batch = [images[i] for i in range(start, stop)]
        images_k, labels_k = torch.stack([b["image"] for b in batch]), torch.stack([b["label"] for b in batch])
        digest.update(images_hash(images_k, labels_k).encode())
    assert open_cache(out).manifest["data"]["hash"] == digest.hexdigest()


def test_cache_made_by_another_vae_is_refused_naming_both(cached, tmp_path):
    vae_dir, out = cached
    other = _vae(tmp_path, "other", seed=1)
    with pytest.raises(UserError) as info:
        LatentDataset(out, other)
    message = str(info.value)
    assert str(vae_dir) in message and str(other) in message
    assert open_cache(out).vae_fingerprint in message
    with pytest.raises(UserError, match="different vae"):  # nor can a cache folder be extended by it
        cache_latents(other, SPEC, out, batch_size=5, resolution=RES, shard_size=10, device="cpu", num_workers=0)


def test_new_latent_statistics_need_no_re_encoding(cached, tmp_path):
    vae_dir, out = cached
    vae = load_vae(vae_dir)
    vae.set_latent_stats(torch.zeros(4), torch.full((4,), 3.0))
    restated = save_vae(vae, tmp_path / "restated")
    item = LatentDataset(out, restated)[5]  # same weights, new statistics: the cache is still valid
    raw = LatentDataset(out)[5]
    torch.testing.assert_close(item["mean"], raw["mean"] / 3.0)


def test_draw_latents_picks_each_flip_and_is_reproducible():
    mean = torch.stack([torch.zeros(500, 2, 2, 2), torch.ones(500, 2, 2, 2)], dim=1)
    std = torch.zeros_like(mean)
    z, flip = draw_latents(mean, std, torch.Generator().manual_seed(0))
    assert torch.equal(z[:, 0, 0, 0], flip.float())
    assert 0.4 < flip.float().mean().item() < 0.6
    again, _ = draw_latents(mean, torch.full_like(mean, 2.0), torch.Generator().manual_seed(0))
    first, _ = draw_latents(mean, torch.full_like(mean, 2.0), torch.Generator().manual_seed(0))
    assert torch.equal(again, first) and again.std().item() == pytest.approx(2.0, rel=0.1)


def test_interrupted_cache_resumes_without_redoing_shards(tmp_path, monkeypatch):
    vae_dir = _vae(tmp_path)
    out = tmp_path / "latents"
    real_write = latents_lib._write_shard
    calls = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args[1])
        real_write(*args, **kwargs)

    monkeypatch.setattr(latents_lib, "_write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(vae_dir, SPEC, out, batch_size=5, resolution=RES, shard_size=10, device="cpu", num_workers=0)
    with pytest.raises(UserError, match="interrupted"):
        open_cache(out)
    first = out / shard_name(0)
    stamp = first.stat().st_mtime_ns
    (out / ".shard-000001.999.tmp").write_bytes(b"half written")
    monkeypatch.setattr(latents_lib, "_write_shard", lambda *a, **k: (calls.append(a[1]), real_write(*a, **k)))
    cache_latents(vae_dir, SPEC, out, batch_size=5, resolution=RES, shard_size=10, device="cpu", num_workers=0)
    assert calls == [0, 1, 2] and first.stat().st_mtime_ns == stamp
    assert not list(out.glob(".shard-*"))
    indices = torch.cat([LatentDataset(out)[i]["index"][None] for i in range(N)])
    assert torch.equal(indices, torch.arange(N))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_encode_every_index_once_and_match_one_process(cached, tmp_path):
    vae_dir, single = cached
    out = tmp_path / "ddp"
    port = _free_port()
    code = (
        "from sendvae.data.latents import cache_latents; import torch; torch.set_num_threads(1); "
        f"cache_latents({str(vae_dir)!r}, {SPEC!r}, {str(out)!r}, batch_size=5, resolution={RES}, shard_size=10, "
        "device='cpu', num_workers=0)"
    )
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    owners = {}
    for k in range(3):
        with safe_open(str(out / shard_name(k)), framework="pt") as f:
            owners[k] = f.get_tensor("index")
    assert torch.equal(torch.cat(list(owners.values())), torch.arange(N))
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((single / "manifest.json").read_text())
    assert a["data"]["hash"] == b["data"]["hash"] and a["vae"]["fingerprint"] == b["vae"]["fingerprint"]
    for i in (3, 17):
        torch.testing.assert_close(LatentDataset(out)[i]["mean"], LatentDataset(single)[i]["mean"])


def test_teacher_tokens_are_cached_for_both_flips(cached, tmp_path):
    from sendvae.models.teachers import build_teacher

    vae_dir, without_teacher = cached
    out = tmp_path / "with_teacher"
    cache_latents(vae_dir, "shapes:6", out, batch_size=3, resolution=RES, shard_size=4, teacher="effnet-lite0",
                  device="cpu", num_workers=0)
    info = open_cache(out)
    assert info.teacher["name"] == "effnet-lite0" and info.teacher["grid"] == 8 and info.teacher["resize"] == "bicubic"
    item = LatentDataset(out, vae_dir, teacher=True)[5]
    teacher = build_teacher("effnet-lite0", grid=8)
    image = open_image_dataset("shapes:6", RES)[5]["image"][None]
    with torch.no_grad():
        plain, flipped = teacher(image)[0], teacher(image.flip(-1))[0]
    assert item["teacher"].shape == (2, 64, teacher.dim)
    torch.testing.assert_close(item["teacher"][0], plain, rtol=2e-3, atol=2e-3)  # stored as float16
    torch.testing.assert_close(item["teacher"][1], flipped, rtol=2e-3, atol=2e-3)
    with pytest.raises(UserError, match="no teacher tokens"):
        LatentDataset(without_teacher, teacher=True)


def test_cache_latents_command_writes_a_cache(cached, tmp_path, capsys):
    from sendvae.cli import main

    vae_dir, _ = cached
    out = tmp_path / "cli"
    code = main(["cache-latents", "--vae", str(vae_dir), "--data", "shapes:6", "--resolution", str(RES),
                 "--batch-size", "3", "--num-workers", "0", "--device", "cpu", "--dtype", "float16", str(out)])
    assert code == 0 and str(out / "manifest.json") in capsys.readouterr().out
    info = open_cache(out)
    assert info.count == 6 and info.manifest["dtype"] == "float16"
    assert LatentDataset(out, vae_dir)[5]["mean"].dtype == torch.float32  # stored half, read as float32
    smooth = tmp_path / "smooth"
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", "shapes:6", "--resolution", str(RES),
                 "--num-workers", "0", "--device", "cpu", "--teacher", "effnet-lite0", "--teacher-antialias",
                 str(smooth)]) == 0
    assert open_cache(smooth).teacher["resize"] == "bicubic-antialias"  # the default, plain bicubic: "bicubic"
