"""Shared tiny runs for the reliability suite: one uninterrupted reference run per command.

Every fault test compares what a faulty-then-resumed run leaves behind with these references, so
each command runs uninterrupted only once per test session (package-scoped fixtures). All runs are
tiny (16-32 px, a few steps, CPU, fp32) and use the command line as a user does (``sendvae.cli.main``).

The suite runs torch on one thread (restored afterwards), and so do the child processes it kills:
on a busy 2-core machine two spinning OpenMP threads per process slow tiny models down 5-10x, and
one thread keeps CPU fp32 results bitwise reproducible between the test process and its children.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ._cli import Reference, cache_args, prepare_args, run_cli_ok, sample_args, sit_args, vae_args
from ._files import write_image_folder


def _training_seconds(args: list[str]) -> float:
    """Run a training command; the duration of its loop (the summary's ``seconds``)."""
    return float(json.loads(run_cli_ok(args).strip().splitlines()[-1])["seconds"])


def _between(first: Path, last: Path) -> float:
    """Seconds between the writes of two files of a run: the duration of its work."""
    return max(last.stat().st_mtime - first.stat().st_mtime, 0.05)


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def workspace(tmp_path_factory, one_thread: None) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="package")
def vae_reference(workspace: Path) -> Reference:
    args = vae_args(workspace / "vae-ref")
    return Reference(workspace / "vae-ref", args, _training_seconds(args))


@pytest.fixture(scope="package")
def stage2_vae(workspace: Path) -> Path:
    """A tiny-f4c4 VAE at 32 px with an informative posterior (std ~ 0.02) and its latent statistics."""
    from sendvae.data.store import open_image_dataset
    from sendvae.models.latent_stats import compute_latent_stats
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import save_vae

    torch.manual_seed(0)
    vae = build_vae("tiny-f4c4", resolution=32)
    with torch.no_grad():
        vae.autoencoder.quant_conv.bias[4:] = -8.0  # log-variance channels: a random VAE is mostly noise otherwise
    vae.set_latent_stats(*compute_latent_stats(vae, open_image_dataset("shapes:48", 32), 48))
    return save_vae(vae, workspace / "stage2-vae")


@pytest.fixture(scope="package")
def cache_reference(workspace: Path, stage2_vae: Path) -> Reference:
    out = workspace / "cache-ref"
    args = cache_args(out, stage2_vae)
    run_cli_ok(args)
    return Reference(out, args, _between(out / "plan.json", out / "manifest.json"))


@pytest.fixture(scope="package")
def sit_reference(workspace: Path, cache_reference: Reference) -> Reference:
    args = sit_args(workspace / "sit-ref", cache_reference.path)
    return Reference(workspace / "sit-ref", args, _training_seconds(args))


@pytest.fixture(scope="package")
def sample_reference(workspace: Path, sit_reference: Reference) -> Reference:
    out = workspace / "samples-ref" / "samples.npz"
    args = sample_args(out, sit_reference.path, workspace / "samples-ref" / "png")
    run_cli_ok(args)  # from the first chunk's PNG (the parts folder with the start time is gone) to the npz
    return Reference(out, args, _between(workspace / "samples-ref" / "png" / "000000.png", out))


@pytest.fixture(scope="package")
def image_folder(workspace: Path) -> Path:
    """90 noise images in 3 classes plus 5 broken and 7 unusual files."""
    return write_image_folder(workspace / "images")


@pytest.fixture(scope="package")
def store_reference(workspace: Path, image_folder: Path) -> Reference:
    out = workspace / "store-ref"
    args = prepare_args(image_folder, out)
    run_cli_ok(args)
    return Reference(out, args, _between(out / "plan.json", out / "manifest.json"))
