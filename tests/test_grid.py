"""The sample grid: one row per class, the lowest-index samples of that class, read from the npz in blocks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sendvae.errors import UserError
from sendvae.grid import grid_classes, grid_image, write_sample_grid


def _images(n: int, size: int = 4) -> np.ndarray:
    """Image i is filled with the value i + 1 (never 0, the border colour), so a cell names its sample."""
    return np.broadcast_to((np.arange(n, dtype=np.uint8) + 1)[:, None, None, None], (n, size, size, 3)).copy()


def test_rows_are_classes_and_cells_their_first_samples():
    labels = np.array([2, 0, 2, 1, 0, 2, 2, 0])
    grid = grid_image(_images(8), labels, columns=3, rows=5, pad=1)
    assert grid.shape == (3 * 5 + 1, 3 * 5 + 1, 3)
    cells = [[int(grid[1 + r * 5, 1 + c * 5, 0]) for c in range(3)] for r in range(3)]
    # class 0 -> samples 1, 4, 7; class 1 -> sample 3 only (the rest of its row stays black); class 2 -> 0, 2, 5
    assert cells == [[2, 5, 8], [4, 0, 0], [1, 3, 6]]
    assert (grid[0] == 0).all() and (grid[:, 5] == 0).all()  # the borders


def test_many_classes_are_spread_evenly():
    labels = np.arange(1000).repeat(2)
    assert grid_classes(labels, 5) == [0, 250, 500, 749, 999]
    assert grid_classes(np.array([7, 3, 7]), 10) == [3, 7]
    with pytest.raises(UserError, match="columns and rows"):
        grid_image(_images(2), np.zeros(2, np.int64), 0, 1)


def test_grid_file_from_an_npz(tmp_path):
    images, labels = _images(600), np.arange(600) % 4
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images, arr_1=labels)  # more images than one read block (256)
    out = write_sample_grid(path, tmp_path / "grid.png", columns=2, rows=3)
    assert np.array_equal(np.asarray(Image.open(out)), grid_image(images, labels, 2, 3))
    np.savez(tmp_path / "unlabelled.npz", arr_0=images[:5])
    single = np.asarray(Image.open(write_sample_grid(tmp_path / "unlabelled.npz", tmp_path / "u.png", 4, 3)))
    assert single.shape == (4 + 4, 4 * 6 + 2, 3)  # no labels: one row
