"""Attribute datasets for the linear probes (SPEC section 3), each read from its published layout.

``open_attribute_dataset(spec, resolution)`` returns an :class:`AttributeSource` with ``.names``
(the attribute names) and ``.split("train" | "val" | "test")``: a Dataset whose items are the
project's image items (ADM centre crop to ``resolution``) plus ``"attributes"``: float32 [A] with
1 = present, 0 = absent, NaN = unknown. Specs:

``celeba:ROOT``
    ``img_align_celeba/`` (or ``Img/img_align_celeba/``), ``list_attr_celeba.txt`` (or under
    ``Anno/``: a count line, a line of 40 names, then ``<file> <40 values of -1/1>``),
    ``list_eval_partition.txt`` (or under ``Eval/``: ``<file> <0|1|2>`` = train/val/test).
    Label: 0 (no classes).
``awa2:ROOT``
    ``JPEGImages/<class>/*.jpg``, ``classes.txt`` and ``predicates.txt`` (``<1-based id> <name>``),
    ``predicate-matrix-binary.txt`` (50 rows of 85 values 0/1): class-level attributes broadcast to
    every image of the class. Label: the class. AwA2 has no official image split, so each class's
    sorted image list is shuffled with ``numpy.random.default_rng([0, class_index])`` and cut
    70 / 10 / 20 % (rounded) into train / val / test: deterministic, and a class's split does
    not depend on the other classes.
``deepfashion:ROOT``
    The Category and Attribute Prediction benchmark: ``Anno/list_attr_cloth.txt`` (count, header,
    ``<name, may contain spaces> <type>``), ``Anno/list_attr_img.txt`` (count, header, ``<img/...>
    <1000 values>``; 1 = positive, -1 = negative, 0 = unknown -> NaN, as the release's README says),
    ``Eval/list_eval_partition.txt`` (count, header, ``<img/...> <train|val|test>``). Images are
    looked up under ROOT or ``ROOT/Img``. Label: the category (``Anno/list_category_img.txt``,
    1-based in the file) when that file exists, else 0.
``csv:FILE``
    A header row; the first column is the image path relative to the CSV's folder, the other
    columns are attributes with values 0 / 1 (empty, ``nan`` or ``NA`` = unknown). Optional columns
    ``split`` (train / val / test) and ``label`` (integer class). Without ``split``, rows are
    shuffled with ``default_rng(0)`` and cut 70 / 10 / 20 %.
``shapes:N[@SEED]``
    The procedural dataset (49 one-hot attributes); items ``[0, 0.7N)`` train, ``[0.7N, 0.8N)``
    val, ``[0.8N, N)`` test.

Image paths from annotation files must stay inside the dataset root: absolute paths and paths
whose ``..`` components leave the root are refused with a UserError naming the file (symbolic links
that the user placed inside the root are followed).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sendvae.data import shapes as shapes_lib
from sendvae.data.images import is_image_file, load_and_crop
from sendvae.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_SEED = 0
_UNKNOWN = {"", "nan", "na", "n/a"}


class AttributeImageDataset(Dataset):
    """Images of one split with their attribute vectors (decoded and centre-cropped on access)."""

    def __init__(self, image_root: Path, paths: Sequence[str], attributes: np.ndarray, labels: np.ndarray,
                 names: Sequence[str], resolution: int, class_names: Sequence[str] = ()) -> None:
        self.image_root = Path(image_root)
        self.paths = list(paths)
        self.attributes = np.asarray(attributes, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.attribute_names = list(names)
        self.resolution = int(resolution)
        self.class_names = list(class_names)
        self.num_classes = max(1, len(self.class_names))

    def __len__(self) -> int:
        return len(self.paths)

    def attribute_matrix(self) -> np.ndarray:
        """float32 ``[N, A]`` (1 / 0 / NaN) of the whole split, without decoding images."""
        return self.attributes

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        array = load_and_crop(self.image_root / self.paths[i], self.resolution)
        return {
            "image": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
            "label": torch.tensor(int(self.labels[i]), dtype=torch.int64),
            "index": torch.tensor(int(i), dtype=torch.int64),
            "attributes": torch.from_numpy(self.attributes[i].copy()),
        }


class ShapesAttributeSplit(shapes_lib.ShapesDataset):
    """A contiguous index range of the shapes dataset (its items already carry ``attributes``)."""

    def attribute_matrix(self) -> np.ndarray:
        return shapes_lib.attribute_vector(shapes_lib.sample_factors(np.arange(self.n) + self.offset, self.seed,
                                                                     self.variant))


@dataclass
class AttributeSource:
    """An attribute dataset: its attribute names and its train / val / test splits."""

    kind: str
    root: Path
    names: list[str]
    resolution: int
    class_names: list[str] = field(default_factory=list)
    _splits: dict[str, Dataset] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return max(1, len(self.class_names))

    def split(self, name: str) -> Dataset:
        """The ``"train"``, ``"val"`` or ``"test"`` Dataset."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self._splits[name]

    def sizes(self) -> dict[str, int]:
        return {name: len(self._splits[name]) for name in SPLITS}


# ---------------------------------------------------------------------------------------------
# Helpers shared by the formats.


def safe_relative(path: str, root: Path, source: Path | str) -> str:
    """``path`` normalised (POSIX) if it stays inside ``root``; else a UserError naming ``source``."""
    text = path.strip().replace("\\", "/")
    normal = posixpath.normpath(text) if text else ""
    if (not text or text.startswith("/") or (len(text) > 1 and text[1] == ":")
            or normal == ".." or normal.startswith("../")):
        raise UserError(f"{source}: image path {path!r} escapes the dataset root {root}; refusing to read it")
    return normal


def _find_file(root: Path, name: str, folders: Sequence[str]) -> Path:
    for folder in folders:
        candidate = root / folder / name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(root / f / name) for f in folders)
    raise UserError(f"missing annotation file {name} (looked for {looked})")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _count_line(lines: list[str], path: Path) -> int:
    if not lines or not lines[0].strip().isdigit():
        got = lines[0][:40] if lines else "nothing"
        raise UserError(f"{path}: line 1 should be the number of entries, got {got!r}")
    return int(lines[0].strip())


def _sign_rows(rows: list[str], n_cols: int, path: Path, first_line: int) -> np.ndarray:
    """Rows of ``n_cols`` values in {-1, 0, 1} -> float32 1 / 0 / NaN, vectorised over the bytes:
    every value is one digit, optionally preceded by a minus sign; ``first_line`` numbers errors."""
    text = "\n".join(rows).encode("ascii", errors="replace") + b"\n"
    b = np.frombuffer(text, dtype=np.uint8)
    newline = np.flatnonzero(b == 10)
    space = (b == 32) | (b == 9) | (b == 13) | (b == 10)
    one, zero, minus = b == ord("1"), b == ord("0"), b == ord("-")
    digit = one | zero
    previous_digit = np.concatenate([[False], digit[:-1]])
    next_one = np.concatenate([one[1:], [False]])
    bad = ~(digit | minus | space) | (digit & previous_digit) | (minus & ~next_one)
    if bad.any():
        row = int(np.searchsorted(newline, np.flatnonzero(bad)[0]))
        raise UserError(f"{path} line {first_line + row}: values must be -1, 0 or 1, got {rows[row][:60]!r}")
    positions = np.flatnonzero(digit)
    counts = np.bincount(np.searchsorted(newline, positions), minlength=len(rows))
    if (counts != n_cols).any():
        row = int(np.flatnonzero(counts != n_cols)[0])
        raise UserError(f"{path} line {first_line + row}: expected {n_cols} values, found {counts[row]}")
    negative = minus[positions - 1]  # a digit at byte 0 reads the final newline: not a minus
    values = np.where(one[positions], np.where(negative, 0.0, 1.0), np.nan).astype(np.float32)
    return values.reshape(len(rows), n_cols)


def _split_names_and_values(rows: list[str]) -> tuple[list[str], list[str]]:
    names, rests = [], []
    for row in rows:
        parts = row.split(None, 1)
        names.append(parts[0])
        rests.append(parts[1] if len(parts) > 1 else "")
    return names, rests


def _read_sign_table(
    path: Path, n_cols: int | None = None, block: int = 4096
) -> tuple[list[str], list[str], np.ndarray]:
    """A counted table of -1/0/1 rows: line 1 the count, line 2 the column names, then
    ``<image> <n_cols values>`` (``n_cols`` defaults to the number of names on line 2).
    Returns (line-2 names, image names, values 1 / 0 / NaN); read in blocks so that a 289k x 1000
    file never sits in memory as text."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        lines = (line for line in handle if line.strip())
        first = next(lines, "")
        count = _count_line([first], path)
        columns = next(lines, "").split()
        names: list[str] = []
        blocks: list[np.ndarray] = []
        pending: list[str] = []

        def flush() -> None:
            row_names, rests = _split_names_and_values(pending)
            blocks.append(_sign_rows(rests, n_cols if n_cols is not None else len(columns), path, 3 + len(names)))
            names.extend(row_names)
            pending.clear()

        for line in lines:
            pending.append(line.rstrip("\n"))
            if len(pending) == block:
                flush()
        if pending:
            flush()
    if len(names) != count:
        raise UserError(f"{path}: line 1 says {count} images but {len(names)} rows follow")
    values = np.concatenate(blocks) if blocks else np.zeros((0, n_cols or len(columns)), np.float32)
    return columns, names, values


def _seeded_split(n: int, seed: Sequence[int]) -> np.ndarray:
    """Split codes (0 / 1 / 2) for ``n`` items: a seeded permutation cut 70 / 10 / 20 % (rounded)."""
    order = np.random.default_rng(list(seed)).permutation(n)
    n_train = int(round(SPLIT_FRACTIONS[0] * n))
    n_val = int(round(SPLIT_FRACTIONS[1] * n))
    codes = np.full(n, 2, dtype=np.int64)
    codes[order[:n_train]] = 0
    codes[order[n_train:n_train + n_val]] = 1
    return codes


def _build(
    kind: str, root: Path, image_root: Path, paths: list[str], attributes: np.ndarray, labels: np.ndarray,
    split_codes: np.ndarray, names: list[str], resolution: int, class_names: Sequence[str] = (),
) -> AttributeSource:
    source = AttributeSource(kind, root, list(names), int(resolution), list(class_names))
    for code, split in enumerate(SPLITS):
        rows = np.flatnonzero(split_codes == code)
        source._splits[split] = AttributeImageDataset(
            image_root, [paths[r] for r in rows], attributes[rows], labels[rows], names, resolution, class_names,
        )
    log.info("%s %s: %d attributes, splits %s", kind, root, len(names), source.sizes())
    return source


# ---------------------------------------------------------------------------------------------
# The formats.


def open_celeba(root: Path, resolution: int) -> AttributeSource:
    """CelebA aligned faces: 40 binary attributes per image, official partition."""
    attr_file = _find_file(root, "list_attr_celeba.txt", ["", "Anno"])
    part_file = _find_file(root, "list_eval_partition.txt", ["", "Eval"])
    image_dir = next((root / d for d in ("img_align_celeba", "Img/img_align_celeba") if (root / d).is_dir()), None)
    if image_dir is None:
        raise UserError(f"missing image folder img_align_celeba in {root} (or {root / 'Img'})")
    names, files, attributes = _read_sign_table(attr_file)
    partition = {}
    for number, line in enumerate(_read_lines(part_file), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"{part_file} line {number}: expected '<file> <0|1|2>', got {line[:60]!r}")
        partition[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise UserError(f"{part_file} has no partition for {missing[0]} (and {len(missing) - 1} more)")
    paths = [safe_relative(f, root, attr_file) for f in files]
    codes = np.array([partition[f] for f in files], dtype=np.int64)
    labels = np.zeros(len(paths), np.int64)
    return _build("celeba", root, image_dir, paths, attributes, labels, codes, names, resolution)


def _id_name_list(path: Path) -> list[str]:
    names = []
    for number, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(names) + 1:
            raise UserError(f"{path} line {number}: expected '<{len(names) + 1}> <name>', got {line[:60]!r}")
        names.append(parts[1])
    if not names:
        raise UserError(f"{path} lists nothing")
    return names


def open_awa2(root: Path, resolution: int) -> AttributeSource:
    """Animals with Attributes 2: 85 class-level attributes broadcast to the class's images."""
    classes = _id_name_list(_find_file(root, "classes.txt", [""]))
    predicates = _id_name_list(_find_file(root, "predicates.txt", [""]))
    matrix_file = _find_file(root, "predicate-matrix-binary.txt", [""])
    rows = [line.split() for line in _read_lines(matrix_file) if line.strip()]
    if len(rows) != len(classes) or any(len(r) != len(predicates) for r in rows):
        raise UserError(f"{matrix_file}: expected {len(classes)} rows of {len(predicates)} values "
                        f"(classes.txt x predicates.txt)")
    try:
        matrix = np.array(rows, dtype=np.float64)
    except ValueError:
        raise UserError(f"{matrix_file}: values must be 0 or 1") from None
    if not np.isin(matrix, (0.0, 1.0)).all():
        raise UserError(f"{matrix_file}: values must be 0 or 1")
    image_root = root / "JPEGImages"
    if not image_root.is_dir():
        raise UserError(f"missing image folder {image_root}")
    paths: list[str] = []
    labels: list[int] = []
    codes: list[np.ndarray] = []
    for c, name in enumerate(classes):
        folder = image_root / safe_relative(name, root, root / "classes.txt")
        if not folder.is_dir():
            log.warning("AwA2 class folder %s is missing; class %s has no images", folder, name)
            continue
        files = sorted(f for f in os.listdir(folder) if is_image_file(f) and not f.startswith("."))
        paths.extend(f"{name}/{f}" for f in files)
        labels.extend([c] * len(files))
        codes.append(_seeded_split(len(files), (SPLIT_SEED, c)))
    if not paths:
        raise UserError(f"no images under {image_root}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    attributes = matrix.astype(np.float32)[labels_arr]
    return _build("awa2", root, image_root, paths, attributes, labels_arr, np.concatenate(codes), predicates,
                  resolution, classes)


def _counted_table(path: Path) -> list[str]:
    """Rows of a DeepFashion list file: line 1 the count, line 2 the column names, then the rows."""
    lines = [line for line in _read_lines(path) if line.strip()]
    count = _count_line(lines, path)
    rows = lines[2:]
    if len(rows) != count:
        raise UserError(f"{path}: line 1 says {count} entries but {len(rows)} rows follow")
    return rows


def open_deepfashion(root: Path, resolution: int) -> AttributeSource:
    """DeepFashion Category and Attribute Prediction: 1,000 attributes, official partition."""
    cloth_file = _find_file(root, "list_attr_cloth.txt", ["Anno"])
    names = []
    for row in _counted_table(cloth_file):
        parts = row.rsplit(None, 1)
        names.append(" ".join(parts[0].split()))
    img_file = _find_file(root, "list_attr_img.txt", ["Anno"])
    _, files, attributes = _read_sign_table(img_file, n_cols=len(names))
    part_file = _find_file(root, "list_eval_partition.txt", ["Eval"])
    partition = {}
    for row in _counted_table(part_file):
        parts = row.split()
        if len(parts) != 2 or parts[1] not in SPLITS:
            raise UserError(f"{part_file}: expected '<image> <train|val|test>', got {row[:60]!r}")
        partition[parts[0]] = SPLITS.index(parts[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise UserError(f"{part_file} has no partition for {missing[0]} (and {len(missing) - 1} more)")
    paths = [safe_relative(f, root, img_file) for f in files]
    labels = np.zeros(len(paths), dtype=np.int64)
    class_names: list[str] = []
    category_file = root / "Anno" / "list_category_img.txt"
    if category_file.is_file():
        category = {}
        for row in _counted_table(category_file):
            parts = row.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < 1:
                raise UserError(f"{category_file}: expected '<image> <category from 1>', got {row[:60]!r}")
            category[parts[0]] = int(parts[1]) - 1
        labels = np.array([category.get(f, 0) for f in files], dtype=np.int64)
        cloth_categories = root / "Anno" / "list_category_cloth.txt"
        if cloth_categories.is_file():
            class_names = [row.rsplit(None, 1)[0].strip() for row in _counted_table(cloth_categories)]
        else:
            class_names = [str(c + 1) for c in range(int(labels.max()) + 1)]
    image_root = root
    if paths and not (root / paths[0]).exists() and (root / "Img" / paths[0]).exists():
        image_root = root / "Img"
    codes = np.array([partition[f] for f in files], dtype=np.int64)
    return _build("deepfashion", root, image_root, paths, attributes, labels, codes, names, resolution, class_names)


def _csv_value(text: str, path: Path, line: int, column: str) -> float:
    value = text.strip().lower()
    if value in _UNKNOWN:
        return math.nan
    if value in ("0", "1", "0.0", "1.0"):
        return float(value)
    raise UserError(f"{path} line {line}, column {column!r}: expected 0, 1 or empty, got {text!r}")


def open_csv(path: Path, resolution: int) -> AttributeSource:
    """A CSV: image path, 0/1 attribute columns, optional ``split`` and ``label`` columns."""
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist")
    root = path.parent
    with open(path, newline="", encoding="utf-8") as f:
        table = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if len(table) < 2:
        raise UserError(f"{path}: needs a header row and at least one image row")
    header = [h.strip() for h in table[0]]
    special = {name: header.index(name) for name in ("split", "label") if name in header[1:]}
    attribute_columns = [j for j in range(1, len(header)) if j not in special.values()]
    if not attribute_columns:
        raise UserError(f"{path}: no attribute columns after the image column")
    paths, rows, labels, codes = [], [], [], []
    for line, row in enumerate(table[1:], start=2):
        if len(row) != len(header):
            raise UserError(f"{path} line {line}: {len(row)} columns, the header has {len(header)}")
        paths.append(safe_relative(row[0], root, path))
        rows.append([_csv_value(row[j], path, line, header[j]) for j in attribute_columns])
        if "label" in special:
            text = row[special["label"]].strip()
            if not text.lstrip("-").isdigit() or int(text) < 0:
                raise UserError(f"{path} line {line}: label must be an integer >= 0, got {text!r}")
            labels.append(int(text))
        if "split" in special:
            split = row[special["split"]].strip().lower()
            if split not in SPLITS:
                raise UserError(f"{path} line {line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
            codes.append(SPLITS.index(split))
    label_arr = np.asarray(labels if labels else [0] * len(paths), dtype=np.int64)
    code_arr = np.asarray(codes, dtype=np.int64) if codes else _seeded_split(len(paths), (SPLIT_SEED,))
    class_names = [str(c) for c in range(int(label_arr.max()) + 1)] if labels else []
    names = [header[j] for j in attribute_columns]
    return _build("csv", path, root, paths, np.asarray(rows, dtype=np.float32), label_arr, code_arr, names,
                  resolution, class_names)


def open_shapes(n: int, seed: int, resolution: int, variant: str = "shapes") -> AttributeSource:
    """The shapes dataset (or a variant of it) split by index: 70 / 10 / 20 %."""
    bounds = [0, int(0.7 * n), int(0.8 * n), n]
    source = AttributeSource("shapes", Path(shapes_lib.format_spec(n, seed, variant)), shapes_lib.attribute_names(),
                             int(resolution), list(shapes_lib.FACTORS["shape"]))
    for k, split in enumerate(SPLITS):
        source._splits[split] = ShapesAttributeSplit(bounds[k + 1] - bounds[k], resolution, seed, offset=bounds[k],
                                                     variant=variant)
    return source


_FORMATS = {"celeba": open_celeba, "awa2": open_awa2, "deepfashion": open_deepfashion}


def open_attribute_dataset(spec: str, resolution: int) -> AttributeSource:
    """``celeba:ROOT``, ``awa2:ROOT``, ``deepfashion:ROOT``, ``csv:FILE`` or ``shapes:N[@SEED]``."""
    spec = str(spec)
    shapes_spec = shapes_lib.parse_spec(spec)
    if shapes_spec is not None:
        return open_shapes(shapes_spec.n, shapes_spec.seed, resolution, shapes_spec.variant)
    kind, _, location = spec.partition(":")
    if not location or kind not in (*_FORMATS, "csv"):
        raise UserError(
            f"attribute dataset {spec!r} is not one of celeba:ROOT, awa2:ROOT, deepfashion:ROOT, csv:FILE, "
            "shapes:N[@SEED]"
        )
    path = Path(location).expanduser()
    if kind == "csv":
        return open_csv(path, resolution)
    if not path.is_dir():
        raise UserError(f"{kind} root {path} does not exist or is not a folder")
    return _FORMATS[kind](path, resolution)


def describe(source: AttributeSource) -> dict[str, Any]:
    """A JSON-friendly summary: kind, root, number of attributes, split sizes, unknown fraction."""
    unknown = {}
    for split in SPLITS:
        matrix = source.split(split).attribute_matrix()
        unknown[split] = float(np.isnan(matrix).mean()) if matrix.size else 0.0
    return {"kind": source.kind, "root": str(source.root), "attributes": len(source.names),
            "sizes": source.sizes(), "unknown_fraction": unknown}
