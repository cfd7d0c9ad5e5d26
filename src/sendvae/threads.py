"""CPU threads and the OpenMP wait policy of a run, chosen before torch starts (torch-free module).

torch's OpenMP threads spin while they wait for work. On idle cores that is the fastest choice, but
when another process keeps a core busy a spinning thread takes the time slice the working one needs.
Measured with ``bench/bench_threads.py`` (tiny VAE train step, fp32, AMD EPYC, 2 cores):

=====================================  ===========  ====================================
setting                                idle cores   one other busy process
=====================================  ===========  ====================================
2 threads, spinning wait (torch's)     43.0 img/s   15.0 img/s
2 threads, ``OMP_WAIT_POLICY=PASSIVE``  34.9 img/s   23.0 img/s
1 thread                               26.7 img/s   27.8-28.8 img/s
=====================================  ===========  ====================================

So :func:`choose_thread_policy` looks at how much CPU other processes use right now (Linux
``/proc/stat``, sampled for a quarter of a second): on idle cores it keeps torch's defaults (one
thread per physical core, spinning wait); when others are busy it leaves their cores to them and
lets the waiting threads sleep. ``sendvae`` applies it through ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` before torch
is imported, unless the user set either variable (their choice wins).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_THRESHOLD = 0.5  # cores' worth of other processes' CPU use that counts as "busy"


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int | None  # None = torch's default (one per physical core)
    passive_wait: bool
    reason: str

    def __str__(self) -> str:
        threads = "torch's default" if self.threads is None else str(self.threads)
        wait = "passive" if self.passive_wait else "spinning (torch's default)"
        return f"CPU threads {threads}, OpenMP wait {wait}: {self.reason}"


def available_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """Distinct (package, core) pairs in ``/proc/cpuinfo``: the cores without their hyper-threads."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    cores, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def _cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from ``/proc/stat``; None where it does not exist."""
    try:
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user / nice
    return total - idle, total


def others_cpu_use(interval: float = 0.25, stat: Path = Path("/proc/stat")) -> float | None:
    """How many cores' worth of CPU the machine is using now (this process is idle while it measures)."""
    before = _cpu_times(stat)
    if before is None:
        return None
    time.sleep(interval)
    after = _cpu_times(stat)
    if after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def choose_thread_policy(cores: int, others: float | None, physical: int | None = None) -> ThreadPolicy:
    """Threads and wait policy for ``cores`` usable logical CPUs (``physical`` cores) when other
    processes use ``others`` cores' worth of CPU."""
    if others is None:
        return ThreadPolicy(None, False, "the machine's load is unknown here")
    if others < BUSY_THRESHOLD:
        return ThreadPolicy(None, False, f"the cores are idle (others use {others:.1f} of {cores})")
    threads = max(1, min(physical or cores, cores - math.floor(others + 0.5)))
    return ThreadPolicy(threads, True, f"other processes use {others:.1f} of {cores} cores; leaving them theirs")


def apply_thread_policy(environ: dict[str, str] | None = None) -> ThreadPolicy | None:
    """Set ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` for this process before torch is imported.

    Does nothing (returns None) when the user set either variable, or when torch is already imported
    (its OpenMP runtime would not read them any more).
    """
    import sys

    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ or "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return None
    policy = choose_thread_policy(available_cores(), others_cpu_use(), physical_cores())
    if policy.threads is not None:
        environ["OMP_NUM_THREADS"] = str(policy.threads)
    if policy.passive_wait:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return policy
