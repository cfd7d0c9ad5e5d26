"""Locks that keep two processes from writing the same folder (DESIGN.md section 2, "Run directories").

- :func:`flock`: an ``flock`` on a file or folder, released by the kernel when the process dies
  (``data prepare`` holds one on ``OUT/.lock``).
- :class:`PidLock`: a lock file holding the owner's pid and host, so that a refusal can name the
  process (run directories, latent caches, sample jobs). A lock left by a dead process on this host
  is taken over with a warning; checking and taking over happen under an ``flock`` on the lock's
  folder, so two processes starting together after a crash cannot both take it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sendvae.errors import UserError

log = logging.getLogger(__name__)

#: descriptors of the flocks this process holds; a forked worker inherits them (see below).
_HELD_FLOCKS: set[int] = set()


def close_inherited_locks() -> None:
    """Initializer for forked worker pools: close the copies of the parent's flock descriptors.

    An flock lives until every descriptor of it is closed. Without this, workers of a parent that
    was killed (SIGKILL) would keep its lock alive until they exit, and a rerun would be refused.
    """
    for fd in list(_HELD_FLOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FLOCKS.clear()


@contextlib.contextmanager
def flock(path: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a folder, or a file created if missing).

    With ``busy`` a lock held by another process raises ``UserError(busy)``; without, wait for it.
    Without ``fcntl`` (not POSIX) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError:
            raise UserError(busy) from None
        _HELD_FLOCKS.add(fd)
        yield
    finally:
        _HELD_FLOCKS.discard(fd)
        os.close(fd)  # releases the lock


class PidLock:
    """A lock file holding the owner's pid and host; refuses while that process lives.

    ``subject`` names what is locked in the refusal ("run directory RUN is in use by process ...").
    Also a context manager.
    """

    def __init__(self, path: Path, subject: str) -> None:
        self.path, self.subject = Path(path), subject
        self.owned = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with flock(self.path.parent):
            if self.path.exists():
                owner = self._read()
                if owner and self._alive(owner):
                    raise UserError(
                        f"{self.subject} is in use by process {owner.get('pid')} on {owner.get('host')} "
                        f"(lock file {self.path}); wait for it to finish, or delete the lock file if that "
                        "process is gone")
                log.warning("taking over stale lock %s (process %s is gone)", self.path, owner and owner.get("pid"))
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(me))
            os.replace(tmp, self.path)
        self.owned = True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @staticmethod
    def _alive(owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot check a process on another machine: assume it runs
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def release(self) -> None:
        if self.owned:
            owner = self._read()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.owned = False

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
