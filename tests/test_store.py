"""The uint8 store: round trips, bad-file policy, interrupted and killed preparation, the reader."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from sendvae.data import store as store_lib
from sendvae.data.images import BadImageError, load_and_crop
from sendvae.data.shapes import ShapesDataset, attribute_vector, render_batch, sample_factors
from sendvae.data.store import ImageStore, open_image_dataset, prepare_store
from sendvae.errors import UserError


def noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(noise(40, 30, 0)).save(root / "a" / "1.png")
    Image.fromarray(noise(25, 50, 1)).save(root / "a" / "2.jpg", quality=90)
    (root / "a" / "empty.jpg").write_bytes(b"")
    rgba = np.concatenate([noise(33, 33, 2), np.full((33, 33, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(root / "b" / "3.png")
    (root / "b" / "garbage.png").write_bytes(b"\x89PNG not really" * 20)
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64, 3)).save(buffer, format="JPEG")
    (root / "b" / "trunc.jpg").write_bytes(buffer.getvalue()[:300])
    return root


def test_shapes_store_round_trip_and_hash_independent_of_sharding(tmp_path):
    m1 = prepare_store("shapes:50@3", tmp_path / "s1", 16, shard_size=7, workers=0, progress=False)
    m2 = prepare_store("shapes:50@3", tmp_path / "s2", 16, shard_size=16, workers=2, progress=False)
    assert m1["count"] == m2["count"] == 50 and len(m1["shards"]) == 8
    assert m1["content_hash"] == m2["content_hash"]
    store = ImageStore(tmp_path / "s1")
    images, factors = render_batch(np.arange(50), 16, seed=3)
    assert np.array_equal(store.images(0, 50).permute(0, 2, 3, 1).numpy(), images)
    item = store[33]
    assert torch.equal(item["image"], torch.from_numpy(images[33]).permute(2, 0, 1))
    assert item["label"].item() == factors[33, 0] and item["index"].item() == 33
    assert torch.equal(item["attributes"], torch.from_numpy(attribute_vector(factors[33])))
    assert store.num_classes == 6 and store.resolution == 16 and len(store.attribute_names) == 49
    assert store.verify() == m1["content_hash"]
    other_seed = prepare_store("shapes:50@4", tmp_path / "s3", 16, shard_size=7, progress=False)
    assert other_seed["content_hash"] != m1["content_hash"]


def test_folder_store_skips_bad_files_and_reports_them(folder_with_bad_files, tmp_path):
    manifest = prepare_store(folder_with_bad_files, tmp_path / "out", 16, shard_size=2, progress=False)
    assert manifest["count"] == 3 and manifest["class_names"] == ["a", "b"]
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"a/empty.jpg", "b/garbage.png", "b/trunc.jpg"}
    assert reasons["a/empty.jpg"] == "empty file"
    assert "not a decodable image" in reasons["b/garbage.png"]
    assert "truncated" in reasons["b/trunc.jpg"] or "corrupt" in reasons["b/trunc.jpg"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]
    store = ImageStore(tmp_path / "out")
    assert store.labels.tolist() == [0, 0, 1]
    for i, rel in enumerate(["a/1.png", "a/2.jpg", "b/3.png"]):
        expected = load_and_crop(folder_with_bad_files / rel, 16)
        assert np.array_equal(store[i]["image"].permute(1, 2, 0).numpy(), expected)
    assert "factors" not in store[0]


def test_strict_stops_at_the_first_bad_file(folder_with_bad_files, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(BadImageError, match="empty.jpg") as info:
        prepare_store(folder_with_bad_files, out, 16, shard_size=2, strict=True, progress=False)
    assert "empty file" in str(info.value)
    assert not (out / "manifest.json").exists()
    assert not list((out / "shards").glob("*.tmp*"))
    prepare_store(folder_with_bad_files, out, 16, shard_size=2, progress=False)  # a lenient run finishes it
    with pytest.raises(BadImageError, match="skipped by an earlier"):
        prepare_store(folder_with_bad_files, out, 16, shard_size=2, strict=True, progress=False)


def test_interrupted_prepare_resumes_without_redoing_shards(tmp_path, monkeypatch):
    reference = prepare_store("shapes:40", tmp_path / "ref", 16, shard_size=6, progress=False)
    calls = []
    original = store_lib._write_shard

    def interrupted(out, k, *args):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(out, k, *args)

    monkeypatch.setattr(store_lib, "_write_shard", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        prepare_store("shapes:40", out, 16, shard_size=6, progress=False)
    assert sorted(p.name for p in (out / "shards").glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="unfinished store"):
        ImageStore(out)

    rebuilt = []
    monkeypatch.setattr(store_lib, "_write_shard", lambda out, k, *a: (rebuilt.append(k), original(out, k, *a)))
    manifest = prepare_store("shapes:40", out, 16, shard_size=6, progress=False)
    assert rebuilt == [2, 3, 4, 5, 6]  # only the missing shards
    assert manifest["content_hash"] == reference["content_hash"] and manifest["count"] == 40
    assert torch.equal(ImageStore(out).images(0, 40), ImageStore(tmp_path / "ref").images(0, 40))


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from sendvae.data import store
    commits = [0]
    original = store._commit
    def dying(tmp, path):
        commits[0] += 1
        if commits[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # die between writing a temp file and renaming it
        original(tmp, path)
    store._commit = dying
    store.prepare_store(sys.argv[1], sys.argv[2], 16, shard_size=7, workers=0, progress=False)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_prepare_leaves_no_visible_half_shard_and_resumes(tmp_path):
    out = tmp_path / "killed"
    # commits: plan, then per shard images, labels, factors, record; the 7th is shard 1's labels
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "shapes:30@1", str(out), "7"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    shards = out / "shards"
    assert (shards / "shard_00000.json").exists() and not (shards / "shard_00001.json").exists()
    assert (shards / "images_00001.npy").exists()  # arrays without a record do not count as a shard
    assert list(shards.glob("*.tmp*"))  # the half-written file is still under its temporary name
    with pytest.raises(UserError, match="unfinished store"):
        open_image_dataset(out)
    manifest = prepare_store("shapes:30@1", out, 16, shard_size=7, progress=False)
    assert not list(shards.glob("*.tmp*"))
    reference = prepare_store("shapes:30@1", tmp_path / "ref", 16, shard_size=30, progress=False)
    assert manifest["content_hash"] == reference["content_hash"]
    assert ImageStore(out).verify() == manifest["content_hash"]


def test_rerun_of_a_complete_store_changes_nothing(tmp_path):
    first = prepare_store("shapes:12", tmp_path / "s", 16, shard_size=5, progress=False)
    stamp = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    again = prepare_store("shapes:12", tmp_path / "s", 16, shard_size=5, progress=False)
    assert again == first and (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == stamp


def test_different_settings_in_the_same_folder_are_refused(tmp_path):
    prepare_store("shapes:12", tmp_path / "s", 16, shard_size=5, progress=False)
    with pytest.raises(UserError, match="different settings.*resolution"):
        prepare_store("shapes:12", tmp_path / "s", 32, shard_size=5, progress=False)
    with pytest.raises(UserError, match="different settings.*source"):
        prepare_store("shapes:13", tmp_path / "s", 16, shard_size=5, progress=False)


def test_reader_refuses_what_is_not_a_whole_store(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageStore(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a sendvae store"):
        ImageStore(tmp_path / "plain")
    prepare_store("shapes:12", tmp_path / "s", 16, shard_size=5, progress=False)
    (tmp_path / "s" / "shards" / "labels_00001.npy").unlink()
    with pytest.raises(UserError, match="labels_00001.npy"):
        ImageStore(tmp_path / "s")
    prepare_store("shapes:12", tmp_path / "t", 16, shard_size=5, progress=False)
    np.save(tmp_path / "t" / "shards" / "images_00002.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="images_00002.npy has shape"):
        ImageStore(tmp_path / "t")


def test_verify_detects_a_changed_pixel(tmp_path):
    prepare_store("shapes:10", tmp_path / "s", 16, shard_size=4, progress=False)
    images = np.load(tmp_path / "s" / "shards" / "images_00001.npy", mmap_mode="r+")
    images[1, 5, 5, 0] ^= 1
    images.flush()
    del images
    with pytest.raises(UserError, match=r"image 5 .*does not match"):
        ImageStore(tmp_path / "s").verify()


def test_store_splits_across_ranks_and_dataloader_workers(tmp_path):
    prepare_store("shapes:20", tmp_path / "s", 16, shard_size=6, progress=False)
    store = ImageStore(tmp_path / "s")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(store, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen.extend(sampler)
    assert sorted(seen) == list(range(20))
    assert pickle.loads(pickle.dumps(store))._images is None  # workers open their own memory maps
    loader = DataLoader(store, batch_size=6, num_workers=2)
    batches = list(loader)
    indices = torch.cat([b["index"] for b in batches])
    assert indices.tolist() == list(range(20))
    assert torch.equal(torch.cat([b["image"] for b in batches]), store.images(0, 20))


def test_open_image_dataset_specs(tmp_path, folder_with_bad_files):
    shapes_ds = open_image_dataset("shapes:30@2", resolution=16)
    assert isinstance(shapes_ds, ShapesDataset) and len(shapes_ds) == 30 and shapes_ds.seed == 2
    with pytest.raises(UserError, match="needs a resolution"):
        open_image_dataset("shapes:30")
    with pytest.raises(UserError, match="shapes:N"):
        open_image_dataset("shapes:lots", 16)
    prepare_store("shapes:5", tmp_path / "s", 16, progress=False)
    assert len(open_image_dataset(tmp_path / "s")) == 5
    with pytest.raises(UserError, match="at 16px but 32px"):
        open_image_dataset(tmp_path / "s", resolution=32)
    with pytest.raises(UserError, match="sendvae data prepare"):
        open_image_dataset(folder_with_bad_files, resolution=16)


def test_lock_refuses_a_concurrent_prepare(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "s"
    (out / "shards").mkdir(parents=True)
    with open(out / ".lock", "w") as handle:  # flock locks belong to the open file: this one blocks
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another 'sendvae data prepare' is writing"):
            prepare_store("shapes:4", out, 16, progress=False)
    assert prepare_store("shapes:4", out, 16, progress=False)["count"] == 4


def test_a_variant_spec_prepares_the_variant_and_records_it(tmp_path):
    manifest = prepare_store("shapes-gen:20@3", tmp_path / "g", 16, progress=False)
    assert manifest["shapes"] == {"n": 20, "seed": 3, "variant": "shapes-gen"}
    store = ImageStore(tmp_path / "g")
    assert np.array_equal(store.factors, sample_factors(np.arange(20), 3, "shapes-gen"))
    assert np.array_equal(store.labels, store.factors[:, 0])
    dataset = open_image_dataset("shapes-gen:20@3", resolution=16)
    assert torch.equal(dataset.images(0, 20), store.images(0, 20))
