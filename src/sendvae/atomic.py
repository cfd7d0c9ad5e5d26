"""Folders written whole or not at all (DESIGN.md section 2, "Checkpoints").

:func:`atomic_folder` writes into a temporary sibling and renames it into place, so a reader (or a
killed writer) never sees a half-written VAE folder, SiT run folder or export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary sibling folder, then rename it to ``folder`` (replacing it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
