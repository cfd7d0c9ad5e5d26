"""Two processes writing the same output folder: the second must refuse, the first must finish intact.

The first process runs the real command in a child and is held inside its work (a hook waits for a
``go`` file), so the second one, run in this process, certainly meets a live owner. After the
refusal the first one continues and its result must equal an uninterrupted run's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ._cli import (
    SIT_PUBLISHED,
    Reference,
    cache_args,
    prepare_args,
    run_cli,
    sample_args,
    sit_args,
    vae_args,
)
from ._compare import assert_same_cache, assert_same_samples, assert_same_store, assert_same_training_run
from ._run import Child, blocked_until, sendvae_argv


def _second_is_refused(args: list[str], capsys) -> str:
    code, _ = run_cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err), "\n".join(err[-10:])
    return err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("second", ["train-sit", "train-vae"])
def test_second_training_process_on_a_run_directory_is_refused(second: str, sit_reference: Reference,
                                                               cache_reference: Reference, tmp_path: Path,
                                                               capsys) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    args = sit_args(run_dir, cache_reference.path)
    hook = blocked_until(go, "sendvae.train.sit", "SiTStage.loss")
    with Child(sendvae_argv(args, hook), tmp_path / "logs") as first:
        first.wait_until(lambda: (run_dir / "config.yaml").exists())  # lock taken, blocked in its first step
        config = (run_dir / "config.yaml").read_bytes()
        other = args if second == "train-sit" else vae_args(run_dir)
        line = _second_is_refused(other, capsys)
        assert line == (f"sendvae {second}: error: run directory {run_dir} is in use by process {first.pid} on "
                        f"{socket.gethostname()} (lock file {run_dir / '.lock'}); wait for it to finish, or delete "
                        "the lock file if that process is gone")
        assert first.alive() and (run_dir / "config.yaml").read_bytes() == config
        go.touch()
        outcome = first.finish()
    assert outcome.returncode == 0, outcome.describe()
    assert_same_training_run(sit_reference.path, run_dir, SIT_PUBLISHED)
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_second_data_prepare_on_a_store_is_refused(store_reference: Reference, image_folder: Path, tmp_path: Path,
                                                   capsys) -> None:
    out, go = tmp_path / "store", tmp_path / "go"
    args = [*prepare_args(image_folder, out), "--workers", "0"]  # decode in the process the hook holds
    with Child(sendvae_argv(args, blocked_until(go, "sendvae.data.store", "_build_shard")), tmp_path / "logs") as first:
        first.wait_until(lambda: (out / "plan.json").exists())
        line = _second_is_refused(args, capsys)
        assert line == (f"sendvae data: error: another 'sendvae data prepare' is writing {out}; wait for it or use "
                        "another folder")
        assert first.alive() and not (out / "manifest.json").exists()
        go.touch()
        outcome = first.finish()
    assert outcome.returncode == 0, outcome.describe()
    assert_same_store(store_reference.path, out)


@pytest.mark.slow
def test_second_cache_latents_on_a_cache_folder_is_refused(cache_reference: Reference, stage2_vae: Path,
                                                          tmp_path: Path, capsys) -> None:
    out, go = tmp_path / "cache", tmp_path / "go"
    args = cache_args(out, stage2_vae)
    with Child(sendvae_argv(args, blocked_until(go, "sendvae.data.latents", "encode_flips")),
               tmp_path / "logs") as first:
        first.wait_until(lambda: (out / "plan.json").exists())
        line = _second_is_refused(args, capsys)
        assert str(out) in line and str(first.pid) in line
        go.touch()
        assert first.finish().returncode == 0
    assert_same_cache(cache_reference.path, out)


@pytest.mark.slow
def test_second_sample_job_on_the_same_output_is_refused(sample_reference: Reference, sit_reference: Reference,
                                                        tmp_path: Path, capsys) -> None:
    out, go = tmp_path / "samples.npz", tmp_path / "go"
    args = sample_args(out, sit_reference.path)
    with Child(sendvae_argv(args, blocked_until(go, "sendvae.sampling", "generate_latents")),
               tmp_path / "logs") as first:
        first.wait_until(lambda: Path(f"{out}.parts/settings.json").exists())
        line = _second_is_refused(args, capsys)
        assert str(out) in line and str(first.pid) in line
        go.touch()
        assert first.finish().returncode == 0
    assert_same_samples(sample_reference.path, out)


def test_stale_lock_of_a_dead_process_is_taken_over(sit_reference: Reference, cache_reference: Reference,
                                                    tmp_path: Path, caplog) -> None:
    """A lock left by a killed run (its pid is gone) does not block the rerun; a warning says so."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _ = run_cli(sit_args(run_dir, cache_reference.path))
    assert code == 0 and f"taking over stale lock {run_dir / '.lock'} (process {dead.pid} is gone)" in caplog.text
    assert not (run_dir / ".lock").exists() and os.path.isdir(run_dir / "sit")
    assert_same_training_run(sit_reference.path, run_dir, SIT_PUBLISHED)
