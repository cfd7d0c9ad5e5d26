"""ADM-format npz files streamed in and out: samples (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` labels) and
reference batches, written and read one block of rows at a time, so no 10 GB array has to sit in memory.

:class:`NpzWriter` appends rows to ``.npy`` members of a zip written under a temporary name and renamed
when closed; :class:`NpzArray` reads one member's rows in blocks; :func:`npz_keys` lists the members.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sendvae.errors import UserError


class _ArrayStream:
    """Rows appended to one ``.npy`` member of an open zip; checks the declared shape."""

    def __init__(self, handle: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.handle, self.name, self.shape, self.dtype, self.rows = handle, name, shape, dtype, 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block)
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.name}: block {block.dtype} {block.shape} does not fit {self.dtype} {self.shape}")
        if self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.name}: more than the declared {self.shape[0]} rows")
        self.handle.write(block.tobytes())
        self.rows += len(block)


class NpzWriter:
    """Write an ``.npz`` (a zip of ``.npy`` members, uncompressed) member by member, atomically.

    ``array(name, a)`` writes a small array, ``stream(name, shape, dtype)`` a large one block by block.
    The file appears under its name only when the ``with`` block ends without an error.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        self.zip: zipfile.ZipFile | None = None

    def __enter__(self) -> NpzWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def array(self, name: str, array: np.ndarray) -> None:
        assert self.zip is not None, "use NpzWriter in a with block"
        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)

    @contextmanager
    def stream(self, name: str, shape: Sequence[int], dtype: Any) -> Iterator[_ArrayStream]:
        assert self.zip is not None, "use NpzWriter in a with block"
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as handle:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            stream = _ArrayStream(handle, name, shape, dtype)
            yield stream
            if stream.rows != shape[0]:
                raise ValueError(f"{name}: {stream.rows} rows written, {shape[0]} declared")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.zip is not None
        self.zip.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


class NpzArray:
    """One array of an ``.npz`` file read in row blocks without loading it whole (``len``, ``shape``, ``batches``)."""

    def __init__(self, path: str | Path, key: str = "arr_0") -> None:
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise UserError(f"{self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if f"{key}.npy" not in names:
                    raise UserError(f"{self.path} has no array {key!r} (it has {[n[:-4] for n in names]})")
                with zf.open(f"{key}.npy") as f:
                    self.shape, self.fortran, self.dtype = _read_npy_header(f)
        except zipfile.BadZipFile:
            raise UserError(f"{self.path} is not an npz file") from None
        if self.dtype.hasobject:
            raise UserError(f"{self.path}: array {key!r} holds Python objects (a pickle), which sendvae never loads")

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive row blocks of at most ``batch_size`` rows (the first ``limit`` rows only, if given)."""
        total = len(self) if limit is None else min(limit, len(self))
        if self.fortran:
            data = np.load(self.path, allow_pickle=False)[self.key]
            for start in range(0, total, batch_size):
                yield np.ascontiguousarray(data[start : min(start + batch_size, total)])
            return
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            for start in range(0, total, batch_size):
                n = min(batch_size, total - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise UserError(f"{self.path}: {self.key} is truncated at row {start}")
                yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])

    def read(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False)[self.key]


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]
