"""Legacy pickled checkpoints: the refusal every loader gives, and the one explicit way to convert them.

sendvae never unpickles code (DESIGN.md section 2, "Checkpoints"): every ``torch.load`` passes
``weights_only=True``, which refuses a pickle holding Python objects, since unpickling one can run
any code. A user who trusts such a legacy file converts it once into safetensors with
``sendvae convert-pickle SRC OUT.safetensors --trust-pickle`` (:func:`convert_pickle`, the only
place that loads with ``weights_only=False``) and passes the ``.safetensors`` file instead.
:func:`pickle_refusal` is the message the loaders give, pointing at that command.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sendvae.errors import UserError

log = logging.getLogger(__name__)


def unpickling_reason(exc: BaseException) -> str:
    """The line of torch's multi-line weights-only report that says what was refused (e.g. which global)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    found = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?: |$)", text, re.MULTILINE)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


def pickle_refusal(path: str | Path, exc: BaseException) -> str:
    """One line for a loader's UserError: ``path`` was refused (and why) and how to convert it."""
    path = Path(path)
    reason = unpickling_reason(exc)
    return (f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses ({reason}); "
            "sendvae never unpickles code. If you trust the file, convert it once with: sendvae convert-pickle "
            f"{path} {path.with_suffix('.safetensors')} --trust-pickle, then pass the .safetensors file")


def flatten_tensors(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> one flat dict with dotted keys (non-tensor leaves dropped)."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(flatten_tensors(value, f"{name}."))
    return flat


def convert_pickle(src: str | Path, out: str | Path, *, trust_pickle: bool = False,
                   entry: str | None = None) -> Path:
    """Load the pickle ``src`` with ``weights_only=False`` (only when ``trust_pickle``), write its tensors to ``out``.

    ``entry`` picks a nested dict first (dotted for deeper ones: ``"state_dict"``, ``"model.ema"``);
    an ``nn.Module`` is taken as its ``state_dict()``. Nested dicts are flattened with ``.`` keys;
    leaves that are not tensors (step counters, argparse namespaces) are dropped. Returns ``out``.
    """
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if not trust_pickle:
        raise UserError(f"refusing to unpickle {src}: loading it with torch.load(weights_only=False) runs any "
                        "code it holds; pass --trust-pickle only for a file from a source you trust")
    if out.suffix != ".safetensors":
        raise UserError(f"output {out} must end in .safetensors")
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    try:
        tree: Any = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad input file
        raise UserError(f"cannot unpickle {src}: {type(exc).__name__}: {exc}") from None
    for part in entry.split(".") if entry else []:
        if not isinstance(tree, Mapping) or part not in tree:
            keys = sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
            raise UserError(f"{src}: no entry {entry!r} (at {part!r}: {keys})")
        tree = tree[part]
    if isinstance(tree, torch.nn.Module):
        tree = tree.state_dict()
    if isinstance(tree, torch.Tensor):
        tree = {"tensor": tree}
    tensors = flatten_tensors(tree) if isinstance(tree, Mapping) else {}
    if not tensors:
        raise UserError(f"{src}{f' entry {entry!r}' if entry else ''} holds no tensors "
                        f"({type(tree).__name__}); pick a nested dict with --entry")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({key: value.detach().to("cpu").clone().contiguous() for key, value in tensors.items()}, str(tmp))
    os.replace(tmp, out)
    log.info("wrote %d tensors from %s to %s", len(tensors), src, out)
    return out
