"""The run directory a training run writes besides its checkpoints (DESIGN.md section 2, "Run directories").

- ``.lock`` (:class:`RunLock`): refuses a second live process on the same run directory;
- ``config.yaml``: the run's resolved config; on resume every changed key is logged (:func:`write_config`);
- ``environment.json``: code version, torch, devices, world size, CPU flags and the precision decision
  (:func:`environment_info`);
- ``metrics.jsonl`` (and ``tensorboard/`` when installed): the logged scalars, averaged over a window and
  over processes (:class:`Metrics`); on resume the lines past the checkpoint are dropped (:func:`trim_metrics`)
  and written again.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sendvae import __version__
from sendvae import distributed as dist_utils
from sendvae.config import save_config, to_dict
from sendvae.hardware import PrecisionChoice, describe_cpu
from sendvae.locking import PidLock

log = logging.getLogger(__name__)


class RunLock(PidLock):
    """``RUN/.lock`` holding the owner's pid and host; refuses a run directory a live process uses."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / ".lock", f"run directory {run_dir}")


def _git_version() -> dict[str, Any] | None:
    """The git commit (and whether the tree is dirty) of the source tree this package runs from."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment_info(world: int, device: torch.device, precision: PrecisionChoice | None = None) -> dict[str, Any]:
    """Code version and environment of this run (written to ``environment.json``), with the CPU flags and
    the precision decision."""
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if device.type == "cuda" else [platform.processor() or platform.machine()])
    return {
        "sendvae": __version__,
        "git": _git_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "devices": devices,
        "world_size": world,
        "threads": torch.get_num_threads(),
        **describe_cpu(),
        **({"precision": precision.precision, "precision_requested": precision.requested,
            "precision_reason": precision.reason} if precision is not None else {}),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def write_config(run_dir: Path, run_config: Any) -> None:
    """Write ``config.yaml``; on resume, warn about every key that differs from the previous run's."""
    path = run_dir / "config.yaml"
    new = to_dict(run_config)
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        before, after = _flatten(old), _flatten(new)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            log.warning("resuming with a changed config: %s",
                        ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed))
    save_config(run_config, path)


def trim_metrics(path: Path, images_seen: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("images", 0) <= images_seen:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


class Metrics:
    """Averages logged scalars over a window, across processes, and writes them (rank 0)."""

    def __init__(self, run_dir: Path, is_main: bool, device: torch.device) -> None:
        self.is_main, self.device = is_main, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.path = run_dir / "metrics.jsonl"
        self.board = None
        if is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        value = value.to(self.device)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def flush(self, record: dict[str, Any]) -> dict[str, Any]:
        names = sorted(self.sums)
        if names:
            means = torch.stack([self.sums[n] / self.counts[n] for n in names])
            world = dist_utils.all_reduce_sum(torch.ones((), device=self.device))
            means = dist_utils.all_reduce_sum(means) / world
            record.update({n: float(v) for n, v in zip(names, means.tolist(), strict=True)})
        self.sums.clear()
        self.counts.clear()
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in record.items():
                    if key != "images" and isinstance(value, (int, float)):
                        self.board.add_scalar(key, value, record["images"])
        return record

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def write_run_files(run_dir: Path, run_config: Any, environment: dict[str, Any], images_seen: int) -> None:
    """Rank 0, at every start: ``config.yaml``, ``environment.json``, and ``metrics.jsonl`` cut back to
    ``images_seen`` (the position the run resumes from)."""
    write_config(run_dir, run_config)
    (run_dir / "environment.json").write_text(json.dumps(environment, indent=2))
    trim_metrics(run_dir / "metrics.jsonl", images_seen)
