"""The uint8 store: an image folder (or ``shapes:N``, ``shapes-gen:N``) prepared once into memory-mappable shards.

Layout of a store folder ``OUT``::

    OUT/plan.json                 the settings of the preparation (written first)
    OUT/shards/images_00000.npy   uint8 [n, H, W, 3] (HWC, the project's pixel convention on disk)
    OUT/shards/labels_00000.npy   int64 [n]
    OUT/shards/factors_00000.npy  int64 [n, 8]        (shapes only: the exact factors)
    OUT/shards/shard_00000.json   the shard's commit record: count, source paths, skipped files,
                                  per-image SHA-256 digests
    OUT/manifest.json             count, resolution, source, content hash, class names, skipped files

Shard ``k`` holds source items ``k * shard_size .. (k + 1) * shard_size - 1`` (fewer if some were
skipped), so the work is the same however it is split between workers or interrupted.

**Crash safety.** Every file is written under a temporary name, flushed and renamed; a shard's JSON
record is renamed last and is the proof that its arrays are whole; ``manifest.json`` is written
after every shard and is the proof that the store is whole. A re-run with the same settings keeps
the committed shards, deletes stale temporary files and builds only the missing shards, so no
shard is duplicated, missing or half-written; :class:`ImageStore` refuses a folder without a
manifest. The content hash is the SHA-256 of the per-image digests in order (each digest covers
the image bytes, the label and the factors), so it does not depend on the shard size, the number
of workers or interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from sendvae.data import shapes as shapes_lib
from sendvae.data.images import BadImageError, list_image_folder, load_and_crop
from sendvae.errors import UserError
from sendvae.locking import close_inherited_locks, flock
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

STORE_FORMAT = "sendvae-uint8-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARDS = "shards"


# ---------------------------------------------------------------------------------------------
# Sources: what a shard task reads.


@dataclass
class _Source:
    kind: str  # "folder" or "shapes"
    description: str
    count: int
    root: str = ""
    paths: Sequence[str] = ()
    labels: Sequence[int] = ()
    class_names: Sequence[str] = ()
    seed: int = 0
    variant: str = "shapes"
    listing_hash: str = ""


def _resolve_source(src: str | os.PathLike) -> _Source:
    spec = shapes_lib.parse_spec(str(src))
    if spec is not None:
        if spec.n < 1:
            raise UserError(f"{src}: a shapes store needs at least one image")
        return _Source("shapes", shapes_lib.format_spec(*spec), spec.n, seed=spec.seed, variant=spec.variant,
                       class_names=list(shapes_lib.FACTORS["shape"]))
    root = Path(src)
    listing = list_image_folder(root)
    digest = hashlib.sha256()
    for rel, label in zip(listing.paths, listing.labels):
        try:
            size = (root / rel).stat().st_size
        except OSError:  # a dangling symlink or an unreadable file: skipped as "cannot read" when loaded
            size = -1
        digest.update(f"{rel}\t{label}\t{size}\n".encode())
    return _Source(
        "folder", str(root.resolve()), len(listing.paths), root=str(root.resolve()), paths=listing.paths,
        labels=listing.labels, class_names=listing.class_names, listing_hash=digest.hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# Atomic files.


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_files(out: Path, k: int) -> dict[str, Path]:
    folder = out / SHARDS
    return {
        "images": folder / f"images_{k:05d}.npy",
        "labels": folder / f"labels_{k:05d}.npy",
        "factors": folder / f"factors_{k:05d}.npy",
        "record": folder / f"shard_{k:05d}.json",
    }


def item_digest(image: np.ndarray, label: int, factors: np.ndarray | None = None) -> bytes:
    """SHA-256 of one stored item: HWC uint8 bytes, the int64 label, the int64 factors (if any)."""
    digest = hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    digest.update(np.int64(label).tobytes())
    if factors is not None:
        digest.update(np.ascontiguousarray(factors, dtype=np.int64).tobytes())
    return digest.digest()


# ---------------------------------------------------------------------------------------------
# One shard.


@dataclass
class _ShardTask:
    """One shard's work; carries only its own slice of the listing (tasks are pickled to workers)."""

    k: int
    start: int
    stop: int
    out: str
    resolution: int
    strict: bool
    kind: str
    root: str = ""
    seed: int = 0
    variant: str = "shapes"
    paths: Sequence[str] = ()
    labels: Sequence[int] = ()


def _build_shard(task: _ShardTask) -> tuple[int, int]:
    """Decode / render the task's items and commit its shard; returns ``(k, number of source items)``."""
    res = task.resolution
    skipped: list[dict[str, str]] = []
    factors = None
    if task.kind == "shapes":
        images, factors = shapes_lib.render_batch(np.arange(task.start, task.stop), res, task.seed, task.variant)
        labels = factors[:, 0].copy()
        paths = [f"{task.variant}:{i}@{task.seed}" for i in range(task.start, task.stop)]
    else:
        kept, labels_list, paths = [], [], []
        for rel, label in zip(task.paths, task.labels):
            try:
                kept.append(load_and_crop(Path(task.root) / rel, res))
            except BadImageError as exc:
                if task.strict:
                    raise BadImageError(exc.path, exc.reason + " (--strict stops at the first bad file)") from None
                skipped.append({"path": rel, "reason": exc.reason})
                continue
            labels_list.append(label)
            paths.append(rel)
        images = np.stack(kept) if kept else np.zeros((0, res, res, 3), dtype=np.uint8)
        labels = np.asarray(labels_list, dtype=np.int64)
    _write_shard(Path(task.out), task.k, images, labels, factors, paths, skipped, task.stop - task.start)
    return task.k, task.stop - task.start


def _write_shard(out: Path, k: int, images: np.ndarray, labels: np.ndarray, factors: np.ndarray | None,
                 paths: list[str], skipped: list[dict[str, str]], n_source: int) -> None:
    """Write the arrays, then the record (the commit point of the shard)."""
    files = _shard_files(out, k)
    digests = b"".join(
        item_digest(images[j], int(labels[j]), None if factors is None else factors[j]) for j in range(len(images))
    )
    _write_npy(files["images"], np.ascontiguousarray(images, dtype=np.uint8))
    _write_npy(files["labels"], np.asarray(labels, dtype=np.int64))
    if factors is not None:
        _write_npy(files["factors"], np.asarray(factors, dtype=np.int64))
    record = {
        "shard": k, "count": int(len(images)), "source_items": int(n_source), "has_factors": factors is not None,
        "paths": paths, "skipped": skipped, "digests": digests.hex(),
    }
    _write_json(files["record"], record)


def _read_record(out: Path, k: int, resolution: int) -> dict[str, Any] | None:
    """The shard's record if the shard is committed and whole, else ``None``."""
    files = _shard_files(out, k)
    if not files["record"].is_file():
        return None
    try:
        record = json.loads(files["record"].read_text())
        images = np.load(files["images"], mmap_mode="r")
        labels = np.load(files["labels"], mmap_mode="r")
        ok = images.shape == (record["count"], resolution, resolution, 3) and labels.shape == (record["count"],)
        if record.get("has_factors"):
            ok = ok and np.load(files["factors"], mmap_mode="r").shape == (record["count"], shapes_lib.NUM_FACTORS)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        ok = False
    if not ok:
        log.warning("shard %d in %s is damaged; it will be rebuilt", k, out)
        files["record"].unlink(missing_ok=True)
        return None
    return record


# ---------------------------------------------------------------------------------------------
# prepare


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is unreadable; delete {out} and prepare again") from None
    for key, value in plan.items():
        if old.get(key) != value:
            shown = "source listing" if key == "listing_hash" else key
            raise UserError(
                f"{out} holds a store prepared with different settings ({shown}: {old.get(key)!r} there, "
                f"{value!r} now); use another output folder or delete {out}"
            )


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is cheap and safe here (workers decode with PIL / render with numpy; no torch ops)
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def prepare_store(
    src: str | os.PathLike,
    out: str | os.PathLike,
    resolution: int,
    strict: bool = False,
    workers: int = 0,
    shard_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the uint8 store ``out`` from an image folder or ``shapes:N[@SEED]``; returns the manifest.

    ``strict``: stop at the first bad file (``BadImageError`` naming it) instead of skipping it.
    ``workers``: processes decoding in parallel (0 or 1: in this process). Re-running after an
    interruption finishes the store; re-running a finished store returns its manifest.
    """
    resolution, shard_size = int(resolution), int(shard_size)
    if not 8 <= resolution <= 4096:
        raise UserError(f"resolution {resolution} is out of range [8, 4096]")
    if shard_size < 1:
        raise UserError(f"shard_size {shard_size} must be >= 1")
    source = _resolve_source(src)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    plan = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "source": source.description, "source_kind": source.kind,
        "resolution": resolution, "shard_size": shard_size, "source_items": source.count,
        "listing_hash": source.listing_hash,
    }
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    with flock(out / ".lock", busy=f"another 'sendvae data prepare' is writing {out}; wait for it or use "
                                   "another folder"):
        _check_plan(out, plan)
        if (out / MANIFEST).is_file():
            log.info("%s is already a complete store; nothing to do", out)
            manifest = json.loads((out / MANIFEST).read_text())
            _raise_if_strict_and_skipped(strict, manifest["skipped"], source)
            return manifest
        _write_json(out / PLAN, plan)
        for stale in (out / SHARDS).glob("*.tmp*"):
            stale.unlink(missing_ok=True)
        n_shards = math.ceil(source.count / shard_size)
        records = {k: r for k in range(n_shards) if (r := _read_record(out, k, resolution)) is not None}
        if strict:
            _raise_if_strict_and_skipped(strict, [s for r in records.values() for s in r["skipped"]], source)
        tasks = [
            _shard_task(k, shard_size, source, out, resolution, strict) for k in range(n_shards) if k not in records
        ]
        if records:
            log.info("resuming %s: %d of %d shards already written", out, len(records), n_shards)
        _run_tasks(tasks, workers, source.count, sum(r["source_items"] for r in records.values()), progress)
        return _write_manifest(out, plan, source, n_shards)


def _shard_task(k: int, shard_size: int, source: _Source, out: Path, resolution: int, strict: bool) -> _ShardTask:
    start, stop = k * shard_size, min(source.count, (k + 1) * shard_size)
    return _ShardTask(
        k, start, stop, str(out), resolution, strict, source.kind, root=source.root, seed=source.seed,
        variant=source.variant, paths=list(source.paths[start:stop]), labels=list(source.labels[start:stop]),
    )


def _raise_if_strict_and_skipped(strict: bool, skipped: list[dict[str, str]], source: _Source) -> None:
    if strict and skipped:
        first = skipped[0]
        raise BadImageError(
            Path(source.root) / first["path"],
            f"{first['reason']} (skipped by an earlier non-strict run; --strict refuses a store with skipped files)",
        )


def _run_tasks(tasks: list[_ShardTask], workers: int, total: int, done: int, progress: bool) -> None:
    bar = tqdm(total=total, initial=done, unit="img", desc="prepare", disable=not (progress and bars_enabled()),
               dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                bar.update(_build_shard(task)[1])
        else:
            with _pool_context().Pool(min(workers, len(tasks)), initializer=close_inherited_locks) as pool:
                for _, n in pool.imap_unordered(_build_shard, tasks):
                    bar.update(n)
    finally:
        bar.close()


def _write_manifest(out: Path, plan: dict[str, Any], source: _Source, n_shards: int) -> dict[str, Any]:
    shards, skipped, content = [], [], hashlib.sha256()
    content.update(f"{STORE_FORMAT}/{STORE_VERSION}/{plan['resolution']}\n".encode())
    for k in range(n_shards):
        record = _read_record(out, k, plan["resolution"])
        if record is None:
            raise UserError(f"shard {k} of {out} is missing after preparation; run the same command again")
        files = _shard_files(out, k)
        content.update(bytes.fromhex(record["digests"]))
        shards.append({
            "count": record["count"],
            "images": files["images"].relative_to(out).as_posix(),
            "labels": files["labels"].relative_to(out).as_posix(),
            "factors": files["factors"].relative_to(out).as_posix() if record["has_factors"] else None,
            "record": files["record"].relative_to(out).as_posix(),
        })
        skipped.extend(record["skipped"])
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise UserError(f"every image of {source.description} was skipped; nothing to store (see {out / SHARDS})")
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "count": count, "resolution": plan["resolution"],
        "layout": "uint8 [n, H, W, 3] per shard", "source": source.description, "source_kind": source.kind,
        "class_names": list(source.class_names), "num_classes": max(1, len(source.class_names)),
        "content_hash": "sha256:" + content.hexdigest(), "shards": shards, "skipped": skipped, "plan": plan,
    }
    if source.kind == "shapes":
        manifest["shapes"] = {"n": source.count, "seed": source.seed, "variant": source.variant}
        manifest["attribute_names"] = shapes_lib.attribute_names()
    _write_json(out / MANIFEST, manifest)
    log.info("store %s: %d images at %dpx, %d skipped, %s", out, count, plan["resolution"], len(skipped),
             manifest["content_hash"])
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the store ``path``, or a UserError that says what the folder is instead."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"store {path} does not exist or is not a folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / PLAN).is_file():
            raise UserError(
                f"{path} is an unfinished store (its preparation was interrupted); run the same "
                "'sendvae data prepare' command again to finish it"
            )
        raise UserError(f"{path} is not a sendvae store (no {MANIFEST}); create one with 'sendvae data prepare'")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise UserError(
            f"{manifest_path} is not a {STORE_FORMAT} v{STORE_VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    return manifest


class ImageStore(Dataset):
    """A prepared store as a torch Dataset (memory-mapped shards, one integer index per image).

    Items: ``{"image": uint8 [3, H, W], "label": int64, "index": int64}``, plus ``"factors"`` int64
    [8] and ``"attributes"`` float32 [49] for a shapes store. Indices ``0 .. len - 1`` address every
    image exactly once, so a ``DistributedSampler`` splits the store between ranks. The memory maps
    are opened lazily in each process (a pickled store carries only its path).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.resolution = int(self.manifest["resolution"])
        self.class_names = list(self.manifest["class_names"])
        self.num_classes = int(self.manifest["num_classes"])
        self.attribute_names = self.manifest.get("attribute_names")
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = np.concatenate([self._load(s["labels"], mmap=False) for s in self.manifest["shards"]])
        self.factors = None
        if all(s.get("factors") for s in self.manifest["shards"]):
            self.factors = np.concatenate([self._load(s["factors"], mmap=False) for s in self.manifest["shards"]])
        if len(self.labels) != self.manifest["count"]:
            raise UserError(
                f"{self.path}: labels hold {len(self.labels)} entries, manifest says {self.manifest['count']}"
            )
        self._images: list[np.ndarray] | None = None
        self._shard_images()  # check every shard now, so a damaged store fails at open

    def _load(self, rel: str, mmap: bool) -> np.ndarray:
        file = self.path / rel
        if not file.is_file():
            raise UserError(f"store {self.path} is missing {rel}; prepare it again")
        try:
            return np.load(file, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise UserError(f"store file {file} is unreadable: {exc}") from None

    def _shard_images(self) -> list[np.ndarray]:
        if self._images is None:
            images = []
            for shard in self.manifest["shards"]:
                array = self._load(shard["images"], mmap=True)
                if array.shape != (shard["count"], self.resolution, self.resolution, 3) or array.dtype != np.uint8:
                    raise UserError(f"store file {self.path / shard['images']} has shape {array.shape} {array.dtype}, "
                                    f"expected ({shard['count']}, {self.resolution}, {self.resolution}, 3) uint8")
                images.append(array)
            self._images = images
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return shard, i - int(self._offsets[shard])

    def _hwc(self, i: int) -> np.ndarray:
        shard, j = self._locate(i)
        return self._shard_images()[shard][j]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"ImageStore indices must be integers, got {type(i).__name__}")
        n = len(self)
        i = int(i) + n if i < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a store of {n} images")
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(self._hwc(i).transpose(2, 0, 1))),
            "label": torch.tensor(int(self.labels[i]), dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        if self.factors is not None:
            item["factors"] = torch.from_numpy(self.factors[i].copy())
            item["attributes"] = torch.from_numpy(shapes_lib.attribute_vector(self.factors[i]))
        return item

    def images(self, start: int, stop: int) -> torch.Tensor:
        """uint8 ``[stop - start, 3, H, W]`` for images ``start .. stop - 1`` (contiguous reads)."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        parts = []
        position = start
        while position < stop:
            shard, j = self._locate(position)
            take = min(stop - position, int(self._offsets[shard + 1]) - position)
            parts.append(self._shard_images()[shard][j:j + take])
            position += take
        if not parts:
            return torch.zeros((0, 3, self.resolution, self.resolution), dtype=torch.uint8)
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2)))

    def verify(self) -> str:
        """Recompute every image digest; raise UserError on a mismatch, return the content hash."""
        content = hashlib.sha256(f"{STORE_FORMAT}/{STORE_VERSION}/{self.resolution}\n".encode())
        for k, shard in enumerate(self.manifest["shards"]):
            record = json.loads((self.path / shard["record"]).read_text())
            stored = bytes.fromhex(record["digests"])
            images = self._shard_images()[k]
            offset = int(self._offsets[k])
            for j in range(len(images)):
                factors = None if self.factors is None else self.factors[offset + j]
                digest = item_digest(images[j], int(self.labels[offset + j]), factors)
                if digest != stored[32 * j:32 * (j + 1)]:
                    raise UserError(
                        f"store {self.path}: image {offset + j} ({shard['images']}[{j}]) does not match its digest"
                    )
                content.update(digest)
        value = "sha256:" + content.hexdigest()
        if value != self.manifest["content_hash"]:
            raise UserError(f"store {self.path}: content hash {value} differs from the manifest's")
        return value


def open_image_dataset(spec: str | os.PathLike, resolution: int | None = None) -> Dataset:
    """A store folder or ``shapes:N[@SEED]`` (``shapes-gen:...``) as an image Dataset (items as in docs/architecture.md)."""
    shapes_spec = shapes_lib.parse_spec(str(spec))
    if shapes_spec is not None:
        if resolution is None:
            raise UserError(f"{spec}: a shapes dataset needs a resolution")
        return shapes_lib.ShapesDataset(shapes_spec.n, resolution, shapes_spec.seed, variant=shapes_spec.variant)
    path = Path(spec)
    if path.is_dir() and not (path / MANIFEST).is_file() and not (path / PLAN).is_file():
        raise UserError(
            f"{path} is not a prepared store; prepare it first: sendvae data prepare {path} OUT --resolution "
            f"{resolution or 256}"
        )
    store = ImageStore(path)
    if resolution is not None and int(resolution) != store.resolution:
        raise UserError(
            f"store {path} is at {store.resolution}px but {resolution}px was asked for; prepare another store"
        )
    return store


def preview_store(path: str | os.PathLike, out: str | os.PathLike, n: int = 16) -> str:
    """Write a PNG grid of a store's first ``n`` images captioned with index and class name."""
    from sendvae.data.images import save_image_grid

    store = ImageStore(path)
    n = min(int(n), len(store))
    images = store.images(0, n).permute(0, 2, 3, 1).numpy()
    captions = []
    for i in range(n):
        if store.factors is not None:
            captions.append(shapes_lib.caption(store.factors[i]))
            continue
        label = int(store.labels[i])
        name = store.class_names[label] if label < len(store.class_names) else str(label)
        captions.append([f"#{i} {name}"[:32]])
    return str(save_image_grid(images, captions, out))
