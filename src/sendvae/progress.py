"""Whether a progress bar is shown: one switch for every bar of the package.

Every bar of the package passes ``disable=not bars_enabled(...)``: silent on non-main ranks and whenever
``TQDM_DISABLE`` is set (``sendvae demo --quiet`` sets it). tqdm itself reads ``TQDM_DISABLE`` only once,
when it is imported, so asking here is what makes a value set at run time count.
"""

from __future__ import annotations

import os


def bars_enabled(main_process: bool = True) -> bool:
    """True on the main process unless ``TQDM_DISABLE`` is set to a true value (1, true, yes)."""
    quiet = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    return main_process and not quiet
