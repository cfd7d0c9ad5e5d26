"""Broken input files, bad configuration values and mismatched checkpoints, through the command line.

- ``sendvae data prepare`` on a folder mixing good images with broken files (zero bytes, truncated
  PNG / JPEG, text with an image extension, a decompression bomb) and unusual ones (1x1, CMYK,
  16-bit grey, RGBA, palette, a JPEG named .png, an upper-case extension): the broken ones are
  skipped and reported with their reason, the unusual ones converted as the data layer's policy
  says, and nothing crashes, with or without worker processes; ``--strict`` stops at the first.
- Every user mistake (a value out of range, a wrong type, an unknown key, a missing file, a VAE or
  checkpoint of another architecture, a latent cache made by another VAE) ends the command with
  exit status 2 and one line naming the key, file or fingerprint, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sendvae.data.images import center_crop_arr
from sendvae.data.store import ImageStore

from ._cli import Reference, cache_args, prepare_args, run_cli, sample_args, sit_args, vae_args
from ._files import broken_files, unusual_good_files, write_image_folder

RES = 16


def _store_records(store: Path) -> dict[str, int]:
    """Source path (relative, POSIX) -> index in the store, from the shards' commit records."""
    index, out = 0, {}
    manifest = json.loads((store / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for path in json.loads((store / shard["record"]).read_text())["paths"]:
            out[path] = index
            index += 1
    return out


def _expected_pixels(path: Path) -> np.ndarray:
    """The policy, written out with PIL: RGB (CMYK via PIL, 16-bit grey / 257, alpha over white), ADM crop."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "I;16":
            grey = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
            rgb = Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
        elif image.mode == "RGBA":
            rgb = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
        else:
            rgb = image.convert("RGB")
    return center_crop_arr(rgb, RES)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_prepare_skips_broken_files_converts_unusual_ones_and_finishes(workers: str, tmp_path: Path, capsys) -> None:
    src = write_image_folder(tmp_path / "src", classes=3, per_class=4)
    out = tmp_path / "store"
    code, stdout = run_cli(["data", "prepare", src, out, "--resolution", str(RES), "--shard-size", "5",
                            "--workers", workers, "--no-progress"])
    assert code == 0, capsys.readouterr().err[-3000:]
    broken, unusual = broken_files(), unusual_good_files()
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == sorted(broken)
    assert skipped["zero_bytes.png"] == "empty file"
    assert skipped["truncated.jpg"].startswith(("truncated image", "corrupt image"))
    assert skipped["truncated.png"].startswith(("truncated image", "corrupt image"))
    assert skipped["text_named_as.png"] == "not a decodable image (unknown or corrupt format)"
    assert skipped["bomb.png"].startswith("decompression bomb")
    assert f"skipped files: {len(broken)}" in stdout and all(name in stdout for name in broken)
    assert manifest["count"] == 3 * 4 + len(unusual)
    store = ImageStore(out)
    assert store.verify() == manifest["content_hash"]
    where = _store_records(out)
    for name in unusual:
        rel = next(p for p in where if Path(p).name == name)
        stored = store[where[rel]]["image"].permute(1, 2, 0).numpy()
        assert np.array_equal(stored, _expected_pixels(src / rel)), name
    one_pixel = store[where[next(p for p in where if p.endswith("one_pixel.png"))]]["image"]
    assert (one_pixel == torch.tensor([200, 30, 60], dtype=torch.uint8).view(3, 1, 1)).all()


def test_prepare_strict_stops_at_the_first_broken_file_naming_it(tmp_path: Path, capsys) -> None:
    src = write_image_folder(tmp_path / "src", classes=3, per_class=2, unusual=False)
    code, _ = run_cli(["data", "prepare", src, tmp_path / "store", "--resolution", str(RES), "--strict",
                       "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    first = sorted(broken_files())[0]  # files go in class order; the first broken one is in class0
    assert code == 2 and len([line for line in err if "error:" in line]) == 1
    assert err[-1].startswith("sendvae data: error: ") and err[-1].endswith("(--strict stops at the first bad file)")
    assert str(src / "class0" / first) in err[-1]


def test_prepare_of_only_broken_files_is_one_clear_error(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in broken_files().items():
        (src / name).write_bytes(data)
    code, _ = run_cli(["data", "prepare", src, tmp_path / "store", "--resolution", str(RES), "--workers", "0",
                       "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sendvae data: error: every image of ") and "was skipped" in err[-1]


def test_prepare_with_a_dangling_symlink_skips_it(tmp_path: Path, capsys) -> None:
    src = write_image_folder(tmp_path / "src", classes=2, per_class=2, broken=False, unusual=False)
    (src / "class1" / "gone.png").symlink_to(tmp_path / "deleted.png")
    code, _ = run_cli(["data", "prepare", src, tmp_path / "store", "--resolution", str(RES), "--workers", "0",
                       "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == ["class1/gone.png"] and manifest["count"] == 4


# ----------------------------------------------------------------------------------------------
# Bad configuration values and mismatched checkpoints: exit 2, one line naming the key / file / hash


@dataclass
class Inputs:
    """What the cases below point at (built once, see the ``inputs`` fixture)."""

    tmp: Path
    stage2_vae: Path
    other_vae: Path
    wrong_arch_vae: Path
    cache: Path
    sit_run: Path
    store: Path
    images: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stage2_vae: Path, cache_reference: Reference, sit_reference: Reference,
           store_reference: Reference, image_folder: Path) -> Inputs:
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import save_vae

    tmp = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(1)
    other = save_vae(build_vae("tiny-f4c4", resolution=32), tmp / "other-vae")  # same architecture, other weights
    wrong = Path(shutil.copytree(stage2_vae, tmp / "wrong-arch-vae"))
    torch.manual_seed(2)
    eight = build_vae("tiny-f4c8", resolution=32).autoencoder.state_dict()  # 8 latent channels, not 4
    save_file({k: v.contiguous() for k, v in eight.items()}, str(wrong / "model.safetensors"))
    (tmp / "bad.yaml").write_text("optim: {lr: [unclosed\n")
    return Inputs(tmp, stage2_vae, other, wrong, cache_reference.path, sit_reference.path, store_reference.path,
                  image_folder)


def _sit_run_with_another_vae(i: Inputs) -> Path:
    run = i.tmp / "sit-run-other-vae"
    if not run.exists():
        shutil.copytree(i.sit_run, run)
        config = json.loads((run / "sit" / "config.json").read_text())
        config["vae"]["path"] = str(i.other_vae)  # the run now names a VAE it was not trained with
        (run / "sit" / "config.json").write_text(json.dumps(config))
    return run


def _vae_run_with_checkpoint(i: Inputs) -> Path:
    """A finished tiny stage-1 run (tiny-f4c4) to resume with another architecture."""
    run = i.tmp / "vae-run"
    if not run.exists():
        code, _ = run_cli(vae_args(run, "train.total_images=8", "train.checkpoint_every=8"))
        assert code == 0
    return run


def _sit_run_copy(i: Inputs) -> Path:
    run = i.tmp / "sit-run-copy"
    if not run.exists():
        shutil.copytree(i.sit_run, run)
    return run


def _cache_of_another_vae(i: Inputs) -> Path:
    out = i.tmp / "cache-copy"
    if not out.exists():
        shutil.copytree(i.cache, out)
    return out


Case = Callable[[Inputs], list]

CASES: list = [
    # train-vae: values, types, keys, files
    ("vae-range", lambda i: vae_args(i.tmp / "r1", "train.batch_size=0"),
     "train.batch_size: 0 is below the minimum 1"),
    ("vae-type", lambda i: vae_args(i.tmp / "r2", "optim.lr=fast"), "optim.lr: expected a number, got 'fast'"),
    ("vae-choice", lambda i: vae_args(i.tmp / "r3", "alignment.kind=mapper"),
     "alignment.kind: 'mapper' is not one of ['none', 'vf', 'sendvae']"),
    ("vae-unknown-key", lambda i: vae_args(i.tmp / "r4", "optim.lrr=1"), "unknown key optim.lrr"),
    ("vae-micro-batch", lambda i: vae_args(i.tmp / "r5", "train.batch_size=10", "train.micro_batch=4"),
     "train.batch_size=10 is not a multiple of world size 1 x train.micro_batch=4"),
    ("vae-resolution", lambda i: vae_args(i.tmp / "r6", "data.resolution=18"),
     "data.resolution=18 is not a multiple of the VAE's downsampling factor 4"),
    ("vae-missing-config", lambda i: ["train-vae", "--out", i.tmp / "r7", "--config", i.tmp / "nope.yaml"],
     "config file {tmp}/nope.yaml does not exist"),
    ("vae-invalid-yaml", lambda i: ["train-vae", "--out", i.tmp / "r8", "--config", i.tmp / "bad.yaml"],
     "config file {tmp}/bad.yaml is not valid YAML"),
    ("vae-missing-init", lambda i: vae_args(i.tmp / "r9", f"model.init={i.tmp}/nothing"),
     "model.init: '{tmp}/nothing' is neither a VAE preset"),
    ("vae-unknown-teacher", lambda i: vae_args(i.tmp / "r10", "teacher.name=dinov9"), "unknown teacher 'dinov9'"),
    ("vae-bad-shapes-spec", lambda i: vae_args(i.tmp / "r11", "data.source=shapes:many"),
     "bad shapes spec 'shapes:many'"),
    ("vae-folder-not-a-store", lambda i: vae_args(i.tmp / "r12", f"data.source={i.images}"),
     "{images} is not a prepared store"),
    ("vae-wrong-architecture-init", lambda i: vae_args(i.tmp / "r13", f"model.init={i.wrong_arch_vae}",
                                                       "data.resolution=32"),
     "{wrong_arch_vae}/model.safetensors: the weights do not match the architecture"),
    ("vae-disc-init-not-a-discriminator",
     lambda i: vae_args(i.tmp / "r14", f"loss.disc_init={i.stage2_vae}/model.safetensors"),
     "discriminator weights {stage2_vae}/model.safetensors: no NLayerDiscriminator tensors"),
    ("vae-resume-other-architecture",
     lambda i: vae_args(_vae_run_with_checkpoint(i), "model.init=tiny-f4c8", "train.total_images=16"),
     "ckpt-000000000008: model.vae does not fit this run's module 'vae'"),
    # train-sit: the cache, its VAE, the model
    ("sit-no-cache", lambda i: ["train-sit", "--out", i.tmp / "s1"],
     "data.cache: the latent cache folder is required"),
    ("sit-not-a-cache", lambda i: sit_args(i.tmp / "s2", i.images), "{images} is not a complete latent cache"),
    ("sit-cache-of-another-vae", lambda i: sit_args(i.tmp / "s3", i.cache, f"data.vae={i.other_vae}"),
     "latent cache {cache} was encoded by VAE {stage2_vae} (fingerprint "),
    ("sit-unknown-preset", lambda i: sit_args(i.tmp / "s4", i.cache, "model.preset=SiT-Q/1"), "SiT-Q/1"),
    ("sit-resume-other-architecture",
     lambda i: sit_args(_sit_run_copy(i), i.cache, "model.preset=SiT-M/1", "train.total_images=112"),
     "model.sit does not fit this run's module 'sit'"),
    # cache-latents
    ("cache-shard-size", lambda i: [*cache_args(i.tmp / "c1", i.stage2_vae), "--shard-size", "0"],
     "shard_size and batch_size must be positive"),
    ("cache-missing-vae", lambda i: cache_args(i.tmp / "c2", i.tmp / "no-vae"), "VAE path {tmp}/no-vae does not exist"),
    ("cache-folder-of-another-vae", lambda i: cache_args(_cache_of_another_vae(i), i.other_vae),
     "already holds a latent cache with a different vae"),
    # sample
    ("sample-reversed-interval", lambda i: [*sample_args(i.tmp / "x1.npz", i.sit_run), "--interval", "0.8,0.2"],
     "guidance_interval: [0.8, 0.2] must satisfy 0 <= low <= high <= 1"),
    ("sample-out-not-npz", lambda i: sample_args(i.tmp / "x2.png", i.sit_run), "must end in .npz"),
    ("sample-sde-one-step", lambda i: [*sample_args(i.tmp / "x3.npz", i.sit_run), "--steps", "1"],
     "steps: the SDE sampler needs at least 2 steps, got 1"),
    ("sample-not-a-run", lambda i: sample_args(i.tmp / "x4.npz", i.tmp), "holds no trained SiT"),
    ("sample-run-whose-vae-changed", lambda i: sample_args(i.tmp / "x5.npz", _sit_run_with_another_vae(i)),
     "VAE {other_vae} is not the one {tmp}/sit-run-other-vae was trained on (fingerprint "),
    # data prepare
    ("prepare-resolution", lambda i: ["data", "prepare", "shapes:8", i.tmp / "p1", "--resolution", "4"],
     "resolution 4 is out of range [8, 4096]"),
    ("prepare-missing-source", lambda i: ["data", "prepare", i.tmp / "no-images", i.tmp / "p2"],
     "image folder {tmp}/no-images does not exist"),
    ("prepare-other-settings", lambda i: [*prepare_args(i.images, i.store), "--resolution", "32"],
     "holds a store prepared with different settings (resolution: 16 there, 32 now)"),
]


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c.values[0] if hasattr(c, "values") else c[0]
                                                              for c in CASES])
def test_user_mistake_is_exit_2_and_one_line(name: str, argv: Case, expected: str, inputs: Inputs, capsys) -> None:
    args = [str(a) for a in argv(inputs)]
    code, _ = run_cli(args)
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    errors = [k for k, line in enumerate(err) if line.startswith("sendvae ") and ": error: " in line]
    assert code == 2 and errors, "\n".join(err[-20:])
    assert errors[-1] == len(err) - 1, "the error message spans several lines:\n" + "\n".join(err[errors[-1]:][:8])
    assert "Traceback" not in "\n".join(err)
    wanted = expected.format(**{k: str(v) for k, v in vars(inputs).items()})
    assert wanted in err[-1], err[-1]
