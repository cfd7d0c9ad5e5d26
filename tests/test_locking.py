"""sendvae.locking: the flock helper and the pid lock file (run directories, latent caches, sample jobs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sendvae.errors import UserError
from sendvae.locking import PidLock, flock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_flock_refuses_a_second_holder_with_the_given_message(tmp_path: Path) -> None:
    with flock(tmp_path / ".lock", busy="first"):
        with pytest.raises(UserError, match="^busy here$"):
            with flock(tmp_path / ".lock", busy="busy here"):
                pass
    with flock(tmp_path / ".lock", busy="free again"):
        pass


def test_pid_lock_refuses_a_live_owner_naming_it_and_cleans_up(tmp_path: Path) -> None:
    with PidLock(tmp_path / ".lock", f"cache {tmp_path}"):
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"^cache {tmp_path} is in use by process {os.getpid()} on "):
            PidLock(tmp_path / ".lock", f"cache {tmp_path}").acquire()
    assert not (tmp_path / ".lock").exists()


def test_stale_takeover_happens_under_the_folder_flock(tmp_path: Path, caplog) -> None:
    """A takeover waits while another process checks the lock (holds the folder's flock): never two owners."""
    dead = _dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    lock = PidLock(tmp_path / ".lock", "run")
    with flock(tmp_path):
        taker = threading.Thread(target=lock.acquire)
        taker.start()
        time.sleep(0.3)
        assert taker.is_alive() and json.loads((tmp_path / ".lock").read_text())["pid"] == dead
    taker.join(10)
    assert not taker.is_alive() and lock.owned
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over stale lock {tmp_path / '.lock'} (process {dead} is gone)" in caplog.text
    lock.release()


_KILLED_PARENT = """
import multiprocessing, os, signal, sys, time
from pathlib import Path
from sendvae.locking import close_inherited_locks, flock

with flock(Path(sys.argv[1]), busy="busy"):
    pool = multiprocessing.get_context("fork").Pool(1, initializer=close_inherited_locks)
    worker = pool.apply_async(os.getpid).get()
    print(worker, flush=True)
    pool.apply_async(time.sleep, (60,))
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_parents_flock_is_not_kept_alive_by_its_pool_workers(tmp_path: Path) -> None:
    lock, out = tmp_path / ".lock", tmp_path / "worker.pid"
    with out.open("w") as stdout:  # a file, not a pipe: the orphaned worker keeps its copy open
        subprocess.run([sys.executable, "-c", _KILLED_PARENT, str(lock)], stdout=stdout, timeout=60)
    worker = int(out.read_text().split()[0])
    try:
        os.kill(worker, 0)  # the orphaned worker still runs ...
        with flock(lock, busy="still held"):  # ... yet the lock died with its parent
            pass
    finally:
        try:
            os.kill(worker, 9)
        except ProcessLookupError:
            pass
