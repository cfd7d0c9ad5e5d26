"""What this machine can do, decided once per run: the device, the precision, the CPU threads.

Every command and both training stages ask this module, so a choice is made in one place and logged
with its reason:

- :func:`resolve_device`: ``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
- :func:`resolve_precision`: ``auto`` -> bf16 autocast where the hardware computes bf16 natively (a
  CUDA device that supports it; a CPU with AVX512-BF16 or AMX), fp32 everywhere else. On CPUs
  without those units (AVX2-only laptops and servers) PyTorch emulates bf16 matrix products:
  measured 17-70x *slower* than fp32, so ``auto`` must never pick it there. An explicit ``bf16`` on
  such a CPU still runs, after one warning.
- :func:`cpu_bf16_support`: the CPU flags behind the decision (``environment.json`` records them).

Nothing here is specific to training: data, evaluation and training code all import it.
"""

from __future__ import annotations

import functools
import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sendvae.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of CPUs that compute bf16 matrix products natively (x86: AVX512-BF16, AMX-BF16;
# ARMv8.6: the "bf16" feature, as on Graviton 3 and later).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def resolve_device(preference: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:LOCAL_RANK``;
    ``cuda:N`` as written; CUDA without a CUDA device is an error.

    ``setting`` is how the caller's user spelled the choice (a config key or a flag), for the error message.
    """
    if preference not in ("auto", "cpu", "cuda") and re.fullmatch(r"cuda:\d+", preference) is None:
        raise UserError(f"{setting}: {preference!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{setting}={preference} but torch sees no CUDA device; use {setting}=cpu or auto")
    if preference.startswith("cuda:"):
        return torch.device(preference)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class CPUSupport:
    """Whether this CPU computes bf16 natively, and the evidence."""

    native: bool
    flags: tuple[str, ...]  # the NATIVE_BF16_FLAGS this CPU reports (empty when none)
    model: str  # the CPU's model name
    source: str  # where the answer came from ("/proc/cpuinfo" or "torch.ops.mkldnn")


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.exists() else ""


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> CPUSupport:
    """Read the CPU's flags once: native bf16 means AVX512-BF16, AMX-BF16 or ARM's bf16 feature.

    Linux answers from ``/proc/cpuinfo``; elsewhere oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) decides.
    """
    text = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.lower().startswith(("model name", "cpu model", "hardware"))), platform.processor() or "")
    if text:
        reported = set()
        for line in text.splitlines():
            if line.lower().startswith(("flags", "features")):
                reported.update(line.split(":", 1)[1].split())
        flags = tuple(flag for flag in NATIVE_BF16_FLAGS if flag in reported)
        return CPUSupport(bool(flags), flags, model or platform.machine(), "/proc/cpuinfo")
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return CPUSupport(native, (), model or platform.machine(), "torch.ops.mkldnn")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why (logged at the start of every run)."""

    requested: str  # what the user asked for: auto, fp32 or bf16
    precision: str  # what runs: fp32 or bf16 (autocast with fp32 master weights)
    reason: str

    def __str__(self) -> str:
        return f"precision {self.requested} -> {self.precision}: {self.reason}"


_warned: set[str] = set()


def resolve_precision(requested: str, device: torch.device | str, setting: str = "train.precision") -> PrecisionChoice:
    """Decide fp32 or bf16 for ``device``: ``auto`` picks bf16 only where it is native (module docstring).

    An explicit ``bf16`` where it is emulated runs, after one warning that names ``setting``.
    """
    if requested not in PRECISIONS:
        raise UserError(f"{setting}: {requested!r} is not one of {list(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"{torch.cuda.get_device_name(device)} {'supports' if native else 'does not support'} bf16"
    elif device.type == "cpu":
        support = cpu_bf16_support()
        native = support.native
        where = (f"this CPU computes bf16 natively ({', '.join(support.flags) or support.source})" if native else
                 "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): bf16 would be emulated")
    else:
        native, where = False, f"no native bf16 check for device type {device.type}"
    if requested == "fp32":
        return PrecisionChoice(requested, "fp32", "as requested")
    if requested == "auto":
        return PrecisionChoice(requested, "bf16" if native else "fp32", where)
    if not native and setting not in _warned:
        _warned.add(setting)
        log.warning("%s=bf16 on %s: %s, typically 17-70x slower than fp32 on CPUs; use %s=auto or fp32",
                    setting, device, where, setting)
    return PrecisionChoice(requested, "bf16", "as requested" + ("" if native else f" ({where})"))


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """bf16 autocast on ``device`` when the resolved ``precision`` is ``bf16``, a no-op region otherwise."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def describe_cpu() -> dict[str, object]:
    """The CPU facts that decide ``precision: auto`` (for ``environment.json`` and timing reports)."""
    support = cpu_bf16_support()
    return {"cpu_model": support.model, "cpu_native_bf16": support.native, "cpu_bf16_flags": list(support.flags),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_check": support.source}
