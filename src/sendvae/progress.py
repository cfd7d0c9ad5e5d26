"""Whether a progress bar is shown: one switch for every bar of the package.

tqdm reads ``TQDM_DISABLE`` from the environment only for bars created without an explicit
``disable=``; the package's bars pass one (non-main ranks stay silent), so they ask here instead.
``sendvae demo --quiet`` sets ``TQDM_DISABLE=1``, which silences the package's bars and the libraries'.
"""

from __future__ import annotations

import os


def bars_enabled(main_process: bool = True) -> bool:
    """True on the main process unless ``TQDM_DISABLE`` is set to a true value (1, true, yes)."""
    quiet = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    return main_process and not quiet
