"""Probe features: what each probed row's encoder sees, flattened, and the cache that keeps it.

A row's encoder (:class:`FeatureEncoder`) maps uint8 images to one feature vector per image: a VAE's
flattened posterior mean or one posterior sample (:class:`VAEEncoder`; the sample for image ``i``
uses noise seeded by ``(seed, i)``, so it does not depend on the batch size), the raw pixels
(:class:`PixelEncoder`) or a teacher's tokens (:class:`TeacherEncoder`). :func:`extract_encoder_features`
runs it over a dataset and caches the result as safetensors per (encoder fingerprint, dataset, split),
written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sendvae.errors import UserError
from sendvae.pixels import to_model
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1


@dataclass
class Features:
    """Flattened features of one dataset split and the labels that travel with them."""

    x: Tensor  # [N, D] float32, the flattened per-image feature
    attributes: Tensor | None  # [N, A] float32 0/1, NaN where unknown (None for unlabelled sets)
    labels: Tensor  # [N] int64 class label
    index: Tensor  # [N] int64 dataset index
    shape: tuple[int, ...]  # per-image feature shape before flattening, e.g. (C, h, w)
    layout: str = "chw"  # "chw" (channels first map) or "nd" (tokens x dim), to recover latent tokens

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, rows: Tensor) -> "Features":
        return Features(
            self.x[rows], None if self.attributes is None else self.attributes[rows], self.labels[rows],
            self.index[rows], self.shape, self.layout,
        )

    def tokens(self) -> Tensor:
        """The per-position latent tokens [N * positions, channels] (MAETok fits its GMM on these)."""
        maps = self.x.reshape(len(self), *self.shape)
        if self.layout == "chw" and maps.dim() == 4:
            return maps.flatten(2).transpose(1, 2).reshape(-1, self.shape[0])
        if self.layout == "nd" and maps.dim() == 3:
            return maps.reshape(-1, self.shape[-1])
        return self.x


class FeatureEncoder(Protocol):
    """Anything that turns uint8 images [B, 3, H, W] into per-image features [B, ...]."""

    key: str  # identifies the encoder's weights and mode in the feature cache
    layout: str  # "chw" or "nd"

    def __call__(self, images: Tensor, index: Tensor) -> Tensor: ...


def _seeded_noise(shape: Sequence[int], index: Tensor, seed: int) -> Tensor:
    """One N(0, I) draw per dataset index from a generator seeded by (seed, index) (DESIGN.md seeds)."""
    draws = []
    for i in index.tolist():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + int(i)) % (2**63 - 1))
        draws.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(draws)


class VAEEncoder:
    """The VAE posterior mean (or one seeded sample) of the image in [-1, 1]; no normalisation, no pooling."""

    layout = "chw"

    def __init__(self, vae: torch.nn.Module, use_mean: bool = True, seed: int = 0) -> None:
        from sendvae.models.vae import vae_fingerprint

        self.vae, self.use_mean, self.seed = vae, use_mean, seed
        self.key = f"vae:{vae_fingerprint(vae)}:" + ("mean" if use_mean else f"sample:{seed}")

    @torch.inference_mode()
    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        posterior = self.vae.encode(to_model(images))
        if self.use_mean:
            return posterior.mean.float()
        noise = _seeded_noise(posterior.mean.shape[1:], index, self.seed).to(posterior.mean.device)
        return (posterior.mean + posterior.std * noise).float()


class PixelEncoder:
    """Raw pixels in [-1, 1] (reference row)."""

    key, layout = "pixels", "chw"

    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        return to_model(images)


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TeacherEncoder:
    """A frozen teacher's patch tokens [N, dim] (reference row; see sendvae.models.teachers)."""

    layout = "nd"

    def __init__(self, teacher: torch.nn.Module, name: str) -> None:
        self.teacher = teacher
        self.key = (f"teacher:{name}:{getattr(teacher, 'grid', '')}:{getattr(teacher, 'resize', '')}:"
                    f"{module_fingerprint(teacher)}")

    @torch.inference_mode()
    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        return self.teacher(images).float()


def _cache_file(cache_dir: str | Path, encoder_key: str, dataset_key: str) -> Path:
    digest = hashlib.sha256(json.dumps([FEATURE_CACHE_VERSION, encoder_key, dataset_key]).encode()).hexdigest()
    return Path(cache_dir) / f"features-{digest[:24]}.safetensors"


def _load_cached(path: Path, encoder_key: str, dataset_key: str, n: int) -> Features | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("encoder") != encoder_key or meta.get("dataset") != dataset_key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file: recompute rather than fail
        log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
        return None
    if tensors["x"].shape[0] != n:
        return None
    return Features(
        tensors["x"], tensors.get("attributes"), tensors["labels"], tensors["index"],
        tuple(json.loads(meta["shape"])), meta.get("layout", "chw"),
    )


def _save_cached(path: Path, feats: Features, encoder_key: str, dataset_key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"x": feats.x.contiguous(), "labels": feats.labels, "index": feats.index}
    if feats.attributes is not None:
        tensors["attributes"] = feats.attributes.contiguous()
    meta = {"encoder": encoder_key, "dataset": dataset_key, "shape": json.dumps(list(feats.shape)),
            "layout": feats.layout, "version": str(FEATURE_CACHE_VERSION)}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _batches(dataset: Any, batch_size: int, num_workers: int) -> Iterator[dict[str, Tensor]]:
    """Batches in dataset order: the dataset's own ``batch(indices)`` fast path (shapes) or a DataLoader."""
    if callable(getattr(dataset, "batch", None)) and num_workers == 0:
        for start in range(0, len(dataset), batch_size):
            yield dataset.batch(list(range(start, min(start + batch_size, len(dataset)))))
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def extract_encoder_features(
    encoder: FeatureEncoder,
    dataset: torch.utils.data.Dataset,
    *,
    dataset_key: str | None = None,  # identifies dataset + split + resolution in the cache
    cache_dir: str | Path | None = None,  # None: no cache
    batch_size: int = 64,  # images per encoder call
    num_workers: int = 0,  # DataLoader workers
    device: str | torch.device = "cpu",  # where the encoder runs (it must already be there)
    desc: str = "features",  # progress-bar label
) -> Features:
    """Encode every item of ``dataset`` with ``encoder`` and flatten, reading/writing the cache."""
    n = len(dataset)  # type: ignore[arg-type]
    path = None
    if cache_dir is not None:
        if dataset_key is None:
            raise ValueError("dataset_key is required when cache_dir is set")
        path = _cache_file(cache_dir, encoder.key, dataset_key)
        if path.is_file():
            cached = _load_cached(path, encoder.key, dataset_key, n)
            if cached is not None:
                log.info("features from cache %s", path)
                return cached
    xs, attrs, labels, indices = [], [], [], []
    shape: tuple[int, ...] = ()
    for batch in tqdm(_batches(dataset, batch_size, num_workers), desc=desc, unit="batch", leave=False,
                      total=math.ceil(n / batch_size), disable=not bars_enabled()):
        images = batch["image"].to(device)
        index = batch["index"].long() if "index" in batch else torch.arange(len(images)) + sum(map(len, indices))
        out = encoder(images, index)
        shape = tuple(out.shape[1:])
        xs.append(out.flatten(1).float().cpu())
        no_label = torch.zeros(len(images), dtype=torch.long)
        labels.append(batch["label"].long().reshape(-1) if "label" in batch else no_label)
        indices.append(index.reshape(-1))
        if "attributes" in batch:
            attrs.append(batch["attributes"].float())
    if not xs:
        raise UserError(f"dataset {dataset_key or ''} is empty: nothing to encode")
    feats = Features(
        torch.cat(xs), torch.cat(attrs) if attrs else None, torch.cat(labels), torch.cat(indices), shape,
        getattr(encoder, "layout", "chw"),
    )
    if path is not None:
        _save_cached(path, feats, encoder.key, dataset_key or "")
    return feats


def extract_features(
    vae: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    use_mean: bool = True,  # posterior mean (True) or one sample seeded by (seed, index)
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    *,
    dataset_key: str | None = None,  # e.g. "celeba:/data/celeba|256|train"; required with cache_dir
    seed: int = 0,
    num_workers: int = 0,
) -> Features:
    """The flattened encoder latent (no pooling) of every image, cached per (VAE fingerprint, dataset, split, mode)."""
    device = next(vae.parameters()).device
    return extract_encoder_features(
        VAEEncoder(vae, use_mean, seed), dataset, dataset_key=dataset_key, cache_dir=cache_dir,
        batch_size=batch_size, num_workers=num_workers, device=device,
    )
