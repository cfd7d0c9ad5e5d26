"""Run a ``sendvae`` command in a child process, optionally with a fault hook, and kill it.

The reliability tests start the real command line in a child process (its own session, so that
its data-loader or pool workers die with it), wait until it has started its work (a marker file
appears), then send SIGKILL to the whole process group after a delay drawn from a seeded random
generator. The child uses as many intra-op threads as the test process, so CPU fp32 results can be
compared bit for bit with a run made inside the test process.

A *hook* is Python code run in the child before ``sendvae.cli.main``: it wraps a library function
to fail (kill itself, raise ``OSError``, limit the file size) at a chosen call, which puts a fault
at an exact point of the work instead of a random one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

_MAIN = """
import sys
{hook}
from sendvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env() -> dict[str, str]:
    """The environment of a child: offline hubs and the test process's thread count."""
    threads = str(torch.get_num_threads())
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}


def sendvae_argv(args: Sequence[str], hook: str = "") -> list[str]:
    """``python -c '<hook>; main(args)'``: the ``sendvae`` command line with optional fault code first."""
    return [sys.executable, "-c", _MAIN.format(hook=textwrap.dedent(hook)), *map(str, args)]


@dataclass
class Outcome:
    """How a child ended: killed by us or not, its exit status and output."""

    killed: bool
    returncode: int
    stdout: str
    stderr: str
    delay: float  # seconds between the marker and the kill (or the planned kill)

    def describe(self) -> str:
        tail = "\n".join(self.stderr.strip().splitlines()[-15:])
        return f"killed={self.killed} returncode={self.returncode} delay={self.delay:.2f}s\n{tail}"


def _start(argv: Sequence[str], log_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    out_path, err_path = log_dir / f"stdout-{stamp}.txt", log_dir / f"stderr-{stamp}.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=child_env(), start_new_session=True)
    return proc, out_path, err_path


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child and any workers it forked)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Child:
    """A child started in the background (``with Child(argv, logs) as child:``), killed on exit if still alive."""

    def __init__(self, argv: Sequence[str], log_dir: Path) -> None:
        self.argv = list(argv)
        self.proc, self._out, self._err = _start(argv, log_dir)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float = 300) -> None:
        """Block until ``ready()``; fail if the child exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive() or time.monotonic() > deadline:
                raise AssertionError(f"{self.argv[3:]}: not ready (exit {self.proc.poll()}):\n"
                                     f"{self._err.read_text()[-3000:]}")
            time.sleep(0.005)

    def finish(self, timeout: float = 300) -> Outcome:
        self.proc.wait(timeout=timeout)
        return Outcome(False, self.proc.returncode, self._out.read_text(), self._err.read_text(), 0.0)


def blocked_until(go: Path, module: str, qualname: str) -> str:
    """Hook code: ``module.qualname`` waits until the file ``go`` exists, then runs as usual."""
    *parents, name = qualname.split(".")
    return f"""
import importlib, os, time
_owner = importlib.import_module({module!r})
for _part in {parents!r}:
    _owner = getattr(_owner, _part)
_original = getattr(_owner, {name!r})
def _blocked(*args, **kwargs):
    while not os.path.exists({str(go)!r}):
        time.sleep(0.01)
    return _original(*args, **kwargs)
setattr(_owner, {name!r}, _blocked)
"""


def run(argv: Sequence[str], log_dir: Path, timeout: float = 300) -> Outcome:
    """Run a child to its end (killing it after ``timeout`` seconds)."""
    proc, out_path, err_path = _start(argv, log_dir)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        raise AssertionError(f"{argv[3:]} did not finish in {timeout} s:\n{err_path.read_text()[-3000:]}") from None
    return Outcome(False, proc.returncode, out_path.read_text(), err_path.read_text(), 0.0)


def run_and_kill(argv: Sequence[str], ready: Callable[[], bool], delay: float, log_dir: Path,
                 timeout: float = 300) -> Outcome:
    """Start a child, wait until ``ready()``, sleep ``delay`` seconds, SIGKILL its process group.

    If the child exits on its own first, it is not killed (``Outcome.killed`` is False, also when
    it ended in the instant between the last check and the signal).
    """
    proc, out_path, err_path = _start(argv, log_dir)
    deadline = time.monotonic() + timeout
    try:
        while not ready() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv[3:]}: no sign of work after {timeout} s:\n{err_path.read_text()[-3000:]}")
            time.sleep(0.005)
        kill_at = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < kill_at:
            time.sleep(0.002)
        if proc.poll() is None:
            _kill_group(proc)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    return Outcome(killed, proc.returncode, out_path.read_text(), err_path.read_text(), delay)


def kill_at_random_point(argv: Sequence[str], ready: Callable[[], bool], window: float, seed: int, log_dir: Path,
                         reset: Callable[[], None], attempts: int = 5) -> Outcome:
    """SIGKILL the command at a random moment of its work, drawn uniformly over ``window`` seconds.

    ``window`` is the duration of the same work in an uninterrupted run. If the child finishes
    before the kill (machines differ in speed), ``reset()`` removes its output and the attempt is
    repeated with half the delay; the result is always a killed run.
    """
    delay = random.Random(seed).uniform(0.0, 1.0) * window
    for _ in range(attempts):
        outcome = run_and_kill(argv, ready, delay, log_dir)
        if outcome.killed:
            print(f"killed {delay:.3f} s after the work started (seed {seed}, window {window:.2f} s)")
            return outcome
        assert outcome.returncode == 0, outcome.describe()
        reset()
        delay /= 2
    raise AssertionError(f"{argv[3:]} always finished before it could be killed (last delay {delay:.3f} s)")
