"""The demo's plan: steps in folders, ``done.json`` resume markers, the ETA bar, the recorded settings.

Every step writes into its own folder ``OUT/<step>`` and marks it complete with ``done.json`` (the
step's result); :class:`Plan` skips complete steps, so an interrupted demo goes on where it stopped.
``OUT/demo_config.yaml`` records the settings; a rerun with other settings into the same folder is
refused (:func:`check_out`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from sendvae.config import to_dict
from sendvae.demo.config import DemoConfig
from sendvae.errors import UserError
from sendvae.hardware import describe_cpu
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

DONE = "done.json"
CONFIG_FILE = "demo_config.yaml"


def atomic_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (numpy scalars and paths allowed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_done(folder: Path) -> dict[str, Any] | None:
    """The result recorded in ``folder/done.json``, or None when the step is not complete."""
    path = folder / DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["result"]
    except (json.JSONDecodeError, KeyError):
        return None


def slug(name: str) -> str:
    """``name`` as a file name (letters, digits, ``-`` and ``_``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def minutes(seconds: float) -> str:
    """``"3.2 min"`` or ``"45 s"``."""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class Step:
    """One step of the plan: its folder under OUT, a title, an ETA estimate and the work."""

    name: str  # the folder under OUT
    title: str
    estimate: float  # seconds on a 2-core CPU, only for the ETA
    run: Callable[[Path], dict[str, Any]]


ETA_PRIOR_SECONDS = 120.0  # how much estimated work the ETA trusts the estimates before its own measurements


def pace(estimated_done: float, elapsed: float, prior: float = ETA_PRIOR_SECONDS) -> float:
    """Estimated seconds of work done per second so far, shrunk towards 1 (the estimates are right) by ``prior``
    seconds of both: a few seconds of one short step cannot rescale an hour's ETA, a long step's measurement does."""
    return (estimated_done + prior) / (elapsed + prior)


class Plan:
    """Runs steps in order, skipping complete ones; an outer progress bar over estimated seconds gives the ETA."""

    def __init__(self, out: Path, steps: list[Step], progress: bool) -> None:
        self.out, self.steps, self.progress = out, steps, progress
        self.results: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}

    def run(self) -> dict[str, dict[str, Any]]:
        """Run every incomplete step; returns each step's result by name."""
        total = sum(s.estimate for s in self.steps)
        fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"
        with tqdm(total=total, desc="demo", bar_format=fmt, disable=not (self.progress and bars_enabled()), position=0,
                  dynamic_ncols=True) as bar:
            started = time.time()
            done_work = 0.0
            for i, step in enumerate(self.steps, 1):
                folder = self.out / step.name
                result = read_done(folder)
                if result is not None:
                    log.info("[%d/%d] %s: complete in %s, skipped", i, len(self.steps), step.title, folder)
                else:
                    rate = pace(done_work, time.time() - started)
                    left = sum(s.estimate for s in self.steps[i - 1:]) / max(rate, 1e-6)
                    log.info("[%d/%d] %s (about %s; demo ETA %s)", i, len(self.steps), step.title,
                             minutes(step.estimate / max(rate, 1e-6)), minutes(left))
                    folder.mkdir(parents=True, exist_ok=True)
                    t0 = time.time()
                    result = step.run(folder)
                    self.timings[step.name] = time.time() - t0
                    atomic_json(folder / DONE, {"step": step.name, "seconds": self.timings[step.name], "result": result})
                    done_work += step.estimate
                self.results[step.name] = result
                bar.update(step.estimate)
        return self.results


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (0: leave the setting), then restore it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_out(out: Path, cfg: DemoConfig) -> None:
    """Record the settings in OUT; refuse to mix runs with different settings in one folder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "threads")
        if changed:
            raise UserError(
                f"{out} holds a demo run with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed)}); "
                "resume it with the same options, or choose another --out"
            )
    path.write_text(yaml.safe_dump(new, sort_keys=False))


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine(cfg: DemoConfig) -> dict[str, Any]:
    """The machine and software a run's timings belong to."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": cfg.threads or torch.get_num_threads(), "torch": torch.__version__,
            "precision": cfg.precision, **describe_cpu()}
