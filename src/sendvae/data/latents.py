"""The latent cache of stage 2: posterior (mean, std) of every image and of its horizontal flip.

Stage 2 trains the SiT on the latents of a *frozen* VAE, so the images are encoded once
(:func:`cache_latents`, ``sendvae cache-latents``). Following DESIGN.md section 2 ("Latents"), the
cache stores the **raw posterior** ``(mean, std)`` for the image and its h-flip; the per-channel
normalisation ``(z - mu_c) / sigma_c`` travels with the VAE checkpoint and is applied when the cache
is read (:class:`LatentDataset`), so it can change without re-encoding. Each training step then
draws a fresh posterior sample ``z = mean + std * eps`` of a randomly chosen flip
(:func:`draw_latents`, from the step's generator, so resume is exact).

Layout of a cache folder::

    OUT/plan.json                      what is being cached (VAE fingerprint, data, shard size)
    OUT/shard-000000.safetensors       images [k*S, (k+1)*S): mean, std [n, 2, C, h, w] (flip 0 = original,
                                       1 = h-flip), label [n], index [n], optionally teacher [n, 2, N, D]
    OUT/manifest.json                  written last: VAE path + fingerprint, dataset spec, count and hash,
                                       latent shape, shards; its presence marks the cache complete

Shards are written to a temporary name and renamed, so an interrupted run resumes by skipping the
shards that exist. Under ``torchrun`` rank 0 lists the shards still to encode and deals them out
(rank r takes pending shards r, r + W, ...): every index is encoded exactly once, and a resumed run
stays balanced. ``OUT`` must be a folder every rank sees. The dataset hash is the sha256 over the
shards' image-and-label hashes.

An optional teacher (``teacher="effnet-lite0"``, ``"dinov2-b"``, ...) stores its patch tokens for both
flips too (float16), a teacher-feature cache for REPA without running the teacher while training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sendvae.errors import UserError
from sendvae.hardware import autocast, resolve_precision
from sendvae.pixels import to_model
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

FORMAT = "sendvae-latent-cache-1"
MANIFEST = "manifest.json"
PLAN = "plan.json"


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard-{k:06d}.safetensors"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(count)`` in shards of ``shard_size`` images."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def images_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of one shard's uint8 images [n, 3, H, W] then int64 labels [n] (the unit of the dataset hash)."""
    digest = hashlib.sha256()
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_flips(vae: torch.nn.Module, images: torch.Tensor, precision: str = "fp32"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std), each [B, 2, C, h, w] float32, of uint8 images [B, 3, H, W] and their h-flips."""
    x = to_model(images)
    both = torch.cat([x, x.flip(-1)])
    with autocast(precision, x.device):
        posterior = vae.encode(both)
    b = images.shape[0]
    mean = posterior.mean.float().reshape(2, b, *posterior.mean.shape[1:]).transpose(0, 1)
    std = posterior.std.float().reshape(2, b, *posterior.std.shape[1:]).transpose(0, 1)
    return mean.contiguous(), std.contiguous()


@torch.no_grad()
def teacher_flips(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Teacher tokens [B, 2, N, D] (float16) of uint8 images and their h-flips."""
    tokens = teacher(torch.cat([images, images.flip(-1)]))
    b = images.shape[0]
    return tokens.float().reshape(2, b, *tokens.shape[1:]).transpose(0, 1).to(torch.float16).contiguous()


def _plan(vae_path: str, fingerprint: str, data_spec: str, dataset: Any, shard_size: int,
          latent_shape: list[int], dtype: str, teacher: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vae": {"path": str(vae_path), "fingerprint": fingerprint},
        "data": {
            "spec": str(data_spec),
            "count": len(dataset),
            "num_classes": int(getattr(dataset, "num_classes", 0)),
            "resolution": int(getattr(dataset, "resolution", 0)),
        },
        "latent_shape": latent_shape,
        "shard_size": shard_size,
        "dtype": dtype,
        "teacher": teacher,
    }


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Refuse to add shards to a folder that caches another VAE, dataset or layout."""
    existing = json.loads((out / PLAN).read_text())
    for key in ("format", "vae", "data", "latent_shape", "shard_size", "dtype", "teacher"):
        old, new = existing.get(key), plan[key]
        if key == "vae":
            old, new = (old or {}).get("fingerprint"), new["fingerprint"]
        if old != new:
            raise UserError(
                f"{out} already holds a latent cache with a different {key} ({old!r}, now {new!r}); "
                "use a new output folder or delete this one"
            )


def _shard_done(path: Path, start: int, count: int, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):  # a damaged file: encode this shard again
        log.warning("%s is unreadable; encoding it again", path)
        return False
    expected = {"start": str(start), "count": str(count), "vae_fingerprint": fingerprint}
    return all(meta.get(key) == value for key, value in expected.items())


def cache_latents(
    vae_path: str | Path,
    data_spec: str,
    out: str | Path,
    batch_size: int = 64,
    *,
    resolution: int | None = None,
    shard_size: int = 10_000,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    teacher_grid: int | None = None,
    teacher_antialias: bool = False,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    dtype: Literal["float32", "float16"] = "float32",
    device: str = "auto",
    num_workers: int = 2,
) -> Path:
    """Encode every image of ``data_spec`` and its h-flip with the VAE at ``vae_path`` into ``out``.

    Works alone or under ``torchrun`` (each rank encodes every W-th pending shard, rank 0 writes
    the manifest); an interrupted run resumes where it stopped. ``teacher`` also caches that teacher's
    patch tokens (the REPA targets) for both flips on a ``teacher_grid`` x ``teacher_grid`` grid,
    which must equal the SiT's token grid (default: the latent grid, right for patch-1 SiTs; pass
    16 for SiT-XL/2 on 32x32 f8 latents). ``dtype`` is the storage type of mean and std. Returns
    the path of ``manifest.json``.
    """
    from sendvae.data.store import open_image_dataset
    from sendvae.locking import PidLock
    from sendvae.models.vae import vae_fingerprint
    from sendvae.models.vae_formats import load_vae
    from sendvae import distributed

    if shard_size < 1 or batch_size < 1:
        raise UserError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    out = Path(out)
    lock = PidLock(out / ".lock", f"latent cache {out}")  # taken by rank 0
    info = distributed.init_distributed(device, "--device")
    try:
        vae = load_vae(vae_path).to(info.device).eval().requires_grad_(False)
        choice = resolve_precision(precision, info.device, "--precision")
        if info.is_main:
            log.info("%s", choice)
        fingerprint = vae_fingerprint(vae, include_stats=False)
        dataset = open_image_dataset(data_spec, resolution) if resolution else open_image_dataset(data_spec)
        if len(dataset) == 0:
            raise UserError(f"data {data_spec} holds no images")
        probe = dataset[0]["image"]
        h, w = probe.shape[-2] // vae.downsample_factor, probe.shape[-1] // vae.downsample_factor
        latent_shape = [int(vae.latent_channels), int(h), int(w)]
        teacher_module = None
        teacher_info = None
        if teacher:
            from sendvae.models.teachers import build_teacher

            teacher_module = build_teacher(teacher, teacher_weights, grid=teacher_grid or h,
                                           antialias=teacher_antialias).to(info.device).eval()
            teacher_info = {"name": teacher, "weights": teacher_weights, "dim": int(teacher_module.dim),
                            "grid": int(teacher_module.grid), "resize": teacher_module.resize}
        plan = _plan(str(vae_path), fingerprint, data_spec, dataset, shard_size, latent_shape, dtype, teacher_info)
        ranges = shard_ranges(len(dataset), shard_size)
        todo_all: list[int] | str = []
        if info.is_main:  # rank 0 locks and checks the folder, shares the pending shards (or the error) with all
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                todo_all = _prepare_folder(out, plan, ranges, fingerprint)
            except UserError as exc:
                todo_all = str(exc)
        todo_all = distributed.broadcast_object(todo_all)
        if isinstance(todo_all, str):
            raise UserError(todo_all)
        done = len(ranges) - len(todo_all)
        if done:
            log.info("%d of %d shards already cached; encoding the other %d", done, len(ranges), len(todo_all))
        todo = todo_all[info.rank :: info.world]  # the pending shards, dealt out evenly to the ranks
        _encode_shards(vae, teacher_module, dataset, ranges, todo, out, fingerprint, batch_size, choice.precision,
                       dtype, num_workers, info)
        distributed.barrier()
        error = None
        if info.is_main:
            try:
                manifest = _write_manifest(out, plan, ranges, fingerprint)
                log.info("latent cache complete: %d images, latent %s, dataset hash %s", manifest["data"]["count"],
                         "x".join(map(str, latent_shape)), manifest["data"]["hash"][:16])
            except UserError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error:
            raise UserError(error)
        return out / MANIFEST
    finally:
        lock.release()
        distributed.shutdown(info)


def _prepare_folder(out: Path, plan: dict[str, Any], ranges: list[tuple[int, int]], fingerprint: str) -> list[int]:
    """Create or check ``out`` against ``plan``, drop half-written shards, list the shards still to encode."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()
    if (out / PLAN).is_file():
        _check_plan(out, plan)
    else:
        _atomic_json(out / PLAN, plan)
    return [k for k, (start, stop) in enumerate(ranges)
            if not _shard_done(out / shard_name(k), start, stop - start, fingerprint)]


def _encode_shards(vae: torch.nn.Module, teacher: torch.nn.Module | None, dataset: Dataset,
                   ranges: list[tuple[int, int]], todo: list[int], out: Path, fingerprint: str,
                   batch_size: int, precision: str, dtype: str, num_workers: int, info: Any) -> None:
    """Encode the shards ``todo`` in order, writing each one as soon as its images are done.

    Batches never straddle two shards, so a shard's image hash is computed as its batches stream by.
    """
    if not todo:
        return
    batches = [list(range(b, min(b + batch_size, stop))) for k in todo
               for start, stop in [ranges[k]] for b in range(start, stop, batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = tqdm(total=total, desc=f"cache-latents (rank {info.rank})", unit="img", disable=not bars_enabled(info.is_main))
    queue = list(todo)
    parts: dict[str, list[torch.Tensor]] = {}
    digest = hashlib.sha256()
    for batch in loader:
        images = batch["image"]
        mean, std = encode_flips(vae, images.to(info.device), precision)
        new = {"mean": mean.cpu().to(store_dtype), "std": std.cpu().to(store_dtype),
               "label": batch["label"].to(torch.int64), "index": batch["index"].to(torch.int64)}
        if teacher is not None:
            new["teacher"] = teacher_flips(teacher, images.to(info.device)).cpu()
        for key, value in new.items():
            parts.setdefault(key, []).append(value)
        digest.update(images.contiguous().numpy().tobytes())
        bar.update(images.shape[0])
        start, stop = ranges[queue[0]]
        if sum(v.shape[0] for v in parts["index"]) == stop - start:
            shard = {key: torch.cat(value) for key, value in parts.items()}
            digest.update(shard["label"].numpy().tobytes())
            _write_shard(out, queue.pop(0), start, shard, fingerprint, digest.hexdigest())
            parts, digest = {}, hashlib.sha256()
    bar.close()


def _write_shard(out: Path, k: int, start: int, shard: dict[str, torch.Tensor], fingerprint: str,
                 image_hash: str) -> None:
    n = shard["index"].shape[0]
    if not torch.equal(shard["index"], torch.arange(start, start + n)):
        raise RuntimeError(f"shard {k}: the dataset returned indices {shard['index'][:5].tolist()}..., "
                           f"expected {start}, {start + 1}, ...")
    meta = {"start": str(start), "count": str(n), "vae_fingerprint": fingerprint, "images_sha256": image_hash}
    tmp = out / f".shard-{k:06d}.{os.getpid()}.tmp"
    save_file({key: value.contiguous() for key, value in shard.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out / shard_name(k))


def _write_manifest(out: Path, plan: dict[str, Any], ranges: list[tuple[int, int]], fingerprint: str) -> dict[str, Any]:
    shards = []
    digest = hashlib.sha256()
    for k, (start, stop) in enumerate(ranges):
        path = out / shard_name(k)
        if not _shard_done(path, start, stop - start, fingerprint):
            raise UserError(f"{path} is missing or incomplete after encoding; run cache-latents again to finish")
        with safe_open(str(path), framework="pt") as f:
            image_hash = (f.metadata() or {})["images_sha256"]
        digest.update(image_hash.encode())
        shards.append({"file": path.name, "start": start, "count": stop - start, "images_sha256": image_hash})
    manifest = {**plan, "shards": shards}
    manifest["data"] = {**plan["data"], "hash": digest.hexdigest()}
    _atomic_json(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheInfo:
    """The manifest of a complete latent cache."""

    path: Path
    manifest: dict[str, Any]

    @property
    def count(self) -> int:
        return int(self.manifest["data"]["count"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["latent_shape"]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["data"]["num_classes"])

    @property
    def vae_fingerprint(self) -> str:
        return str(self.manifest["vae"]["fingerprint"])

    @property
    def vae_path(self) -> str:
        return str(self.manifest["vae"]["path"])

    @property
    def teacher(self) -> dict[str, Any] | None:
        return self.manifest.get("teacher")


def open_cache(path: str | Path) -> CacheInfo:
    """Read ``path/manifest.json``; an incomplete or foreign folder is a UserError naming it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = " (encoding was interrupted: run cache-latents again to finish)" if (path / PLAN).is_file() else ""
        raise UserError(f"{path} is not a complete latent cache: {manifest_path} is missing{hint}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return CacheInfo(path, manifest)


def check_fingerprint(cache: CacheInfo, fingerprint: str, vae_name: str) -> None:
    """Refuse a cache encoded by another VAE than the one training is told to use (names both)."""
    if cache.vae_fingerprint != fingerprint:
        raise UserError(
            f"latent cache {cache.path} was encoded by VAE {cache.vae_path} (fingerprint {cache.vae_fingerprint}), "
            f"but training uses VAE {vae_name} (fingerprint {fingerprint}); re-run cache-latents with this VAE "
            "or point data.vae at the VAE that made the cache"
        )


class LatentDataset(Dataset):
    """Items ``{"mean", "std": float32 [2, C, h, w], "label", "index"}`` of a latent cache.

    Index 0 of the flip axis is the image, 1 its horizontal flip. With a ``vae`` (a loaded VAE or
    its path) the cache's fingerprint is checked against it and the VAE's latent normalisation is
    applied on load: ``mean' = (mean - mu) / sigma``, ``std' = std / sigma``, so that
    ``mean' + std' * eps`` is the normalised posterior sample (:func:`draw_latents`). Without a VAE
    the raw posterior is returned. ``images`` (an image-data spec, usually the one recorded in the
    manifest) adds the uint8 ``"image"`` of the same index, for a teacher run on the fly;
    ``teacher=True`` adds the cached teacher tokens ``"teacher"`` float32 [2, N, D].
    """

    def __init__(self, cache: str | Path | CacheInfo, vae: Any = None, *, images: str | None = None,
                 teacher: bool = False, resolution: int | None = None) -> None:
        self.info = cache if isinstance(cache, CacheInfo) else open_cache(cache)
        self.shift: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        if vae is not None:
            from sendvae.models.vae import vae_fingerprint
            from sendvae.models.vae_formats import load_vae

            vae_name = str(vae) if isinstance(vae, (str, Path)) else "given as a module"
            module = load_vae(vae) if isinstance(vae, (str, Path)) else vae
            check_fingerprint(self.info, vae_fingerprint(module, include_stats=False), vae_name)
            self.shift = module.latent_mean.detach().float().cpu().reshape(-1, 1, 1)
            self.scale = module.latent_std.detach().float().cpu().reshape(-1, 1, 1)
        if teacher and not self.info.teacher:
            raise UserError(f"latent cache {self.info.path} holds no teacher tokens; run cache-latents with --teacher")
        self.with_teacher = teacher
        self.images = None
        if images is not None:
            from sendvae.data.store import open_image_dataset

            self.images = open_image_dataset(images, resolution) if resolution else open_image_dataset(images)
            if len(self.images) != self.info.count:
                raise UserError(
                    f"image data {images} has {len(self.images)} images but latent cache {self.info.path} "
                    f"has {self.info.count}; join the cache with the data it was made from"
                )
        self.num_classes = self.info.num_classes
        self.shard_size = int(self.info.manifest["shard_size"])
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.info.count

    def _shard(self, k: int) -> Any:
        if self._pid != os.getpid():  # a fresh worker process: do not share handles with the parent
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = safe_open(str(self.info.path / shard_name(k)), framework="pt")
        return self._files[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)}")
        k, offset = divmod(int(i), self.shard_size)
        f = self._shard(k)
        mean = f.get_slice("mean")[offset].float()
        std = f.get_slice("std")[offset].float()
        if self.shift is not None:
            mean = (mean - self.shift) / self.scale
            std = std / self.scale
        item = {
            "mean": mean,
            "std": std,
            "label": f.get_slice("label")[offset : offset + 1].reshape(()),
            "index": f.get_slice("index")[offset : offset + 1].reshape(()),
        }
        if self.with_teacher:
            item["teacher"] = f.get_slice("teacher")[offset].float()
        if self.images is not None:
            image_item = self.images[i]
            if int(image_item["index"]) != int(item["index"]):
                raise UserError(f"image data returned index {int(image_item['index'])} for {i}")
            item["image"] = image_item["image"]
        return item


def select_flip(mean: torch.Tensor, std: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior of the chosen flip per item: ``mean[b, flip[b]]``, ``std[b, flip[b]]`` ([B, C, h, w] each)."""
    rows = torch.arange(mean.shape[0], device=mean.device)
    flip = flip.to(device=mean.device, dtype=torch.long)
    return mean[rows, flip], std[rows, flip]


def draw_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A posterior sample of a random flip per item: ``(mean[f] + std[f] * eps, f)``.

    ``mean``/``std`` [B, 2, C, h, w] from :class:`LatentDataset`; the flip choice f [B] (0 or 1, each
    with probability 1/2) and eps are drawn from ``generator``.
    """
    b = mean.shape[0]
    flip = (torch.rand(b, generator=generator, device=mean.device) < 0.5).long()
    m, s = select_flip(mean, std, flip)
    eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
    return m + s * eps, flip
