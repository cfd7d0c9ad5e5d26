"""The CPU thread / OpenMP wait policy chosen before torch starts (sendvae.threads, bench/bench_threads.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sendvae.threads import _cpu_times, apply_thread_policy, choose_thread_policy, others_cpu_use, physical_cores


def test_idle_cores_keep_torchs_defaults() -> None:
    policy = choose_thread_policy(cores=2, others=0.2)
    assert policy.threads is None and not policy.passive_wait
    assert "idle" in str(policy)


def test_busy_cores_are_left_to_the_others_and_waiting_threads_sleep() -> None:
    policy = choose_thread_policy(cores=2, others=1.0)
    assert policy.threads == 1 and policy.passive_wait
    assert choose_thread_policy(cores=2, others=3.5).threads == 1  # never below one thread
    assert choose_thread_policy(cores=16, others=2.2, physical=8).threads == 8  # no more than the physical cores
    assert choose_thread_policy(cores=16, others=10.0, physical=8).threads == 6


def test_unknown_load_changes_nothing() -> None:
    assert choose_thread_policy(cores=4, others=None).threads is None


def test_cpu_use_is_read_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert _cpu_times(stat) == (150, 1000)  # busy = total - idle - iowait
    assert others_cpu_use(0.0, tmp_path / "missing") is None


def test_physical_cores_count_distinct_package_core_pairs(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    blocks = [f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n" for i in range(4)]  # 2 cores x 2 threads
    info.write_text("\n".join(blocks))
    assert physical_cores(info) == 2


def test_the_users_variables_win() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    assert apply_thread_policy(env) is None and env == {"OMP_NUM_THREADS": "3"}


def test_the_command_line_sets_the_policy_before_torch_starts() -> None:
    """A fresh `sendvae` process decides before torch is imported, and torch then follows it."""
    probe = ("import os, sys\nfrom sendvae.threads import apply_thread_policy\n"
             "policy = apply_thread_policy()\nimport torch\n"
             "expected = policy.threads or torch.get_num_threads()\n"
             "print(policy is not None, torch.get_num_threads() == expected)")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
