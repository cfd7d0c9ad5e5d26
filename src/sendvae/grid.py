"""A picture of a samples file: one row per class, the first few samples of that class side by side.

``sendvae sample`` writes it next to ``OUT.npz`` as ``OUT.png`` so that a run can be looked at
without writing code. Rows are classes in increasing order; with more classes than ``rows``, the
classes are spread evenly over the sorted labels present (0, ~K/rows, ...), so a 1000-class run
shows a spread of ImageNet rather than its first ten (fish) classes. Each row holds the samples of
its class with the lowest indices (a fixed choice: the same file always gives the same picture);
a class with fewer samples than ``columns`` leaves its row's end black. Images are kept at their
own resolution, separated by a ``pad``-pixel black border.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sendvae.errors import UserError


def grid_classes(labels: np.ndarray, rows: int) -> list[int]:
    """The classes shown: every class present when there are at most ``rows``, else ``rows`` evenly spaced ones."""
    present = np.unique(labels)
    if len(present) <= rows:
        return [int(c) for c in present]
    picks = np.linspace(0, len(present) - 1, rows).round().astype(int)
    return [int(present[i]) for i in picks]


def grid_image(images: np.ndarray, labels: np.ndarray, columns: int, rows: int, pad: int = 2) -> np.ndarray:
    """The grid as uint8 [H, W, 3] from samples ``images`` uint8 [N, h, w, 3] with ``labels`` [N]."""
    if columns < 1 or rows < 1:
        raise UserError(f"sample grid: columns and rows must be positive, got {columns} x {rows}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise UserError(
            f"sample grid: expected uint8 images [N, H, W, 3] with N labels, got {images.dtype} "
            f"{images.shape} and {len(labels)} labels"
        )
    classes = grid_classes(labels, rows)
    h, w = images.shape[1:3]
    canvas = np.zeros((len(classes) * (h + pad) + pad, columns * (w + pad) + pad, 3), dtype=np.uint8)
    for row, label in enumerate(classes):
        for column, index in enumerate(np.flatnonzero(labels == label)[:columns]):
            top, left = pad + row * (h + pad), pad + column * (w + pad)
            canvas[top : top + h, left : left + w] = images[index]
    return canvas


def write_sample_grid(samples: str | Path, out: str | Path, columns: int = 8, rows: int = 10) -> Path:
    """Write the grid of the samples npz ``samples`` (``arr_0`` images, ``arr_1`` labels) to the PNG ``out``.

    Only the images shown are kept in memory (the npz is read in blocks). A file without labels is
    shown as one class. Returns ``out``.
    """
    from PIL import Image

    from sendvae.npz import NpzArray, npz_keys

    images = NpzArray(samples)
    labels = NpzArray(samples, "arr_1").read() if "arr_1" in npz_keys(samples) else np.zeros(len(images), np.int64)
    shown = np.zeros(len(labels), dtype=bool)
    for label in grid_classes(labels, rows):
        shown[np.flatnonzero(labels == label)[:columns]] = True
    kept, kept_labels, start = [], [], 0
    for block in images.batches(256):
        mask = shown[start : start + len(block)]
        kept.append(block[mask])
        kept_labels.append(labels[start : start + len(block)][mask])
        start += len(block)
    picture = grid_image(np.concatenate(kept), np.concatenate(kept_labels), columns, rows)
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    Image.fromarray(picture).save(tmp, format="PNG")
    tmp.replace(out)
    return out
