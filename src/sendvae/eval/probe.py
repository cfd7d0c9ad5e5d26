"""Linear probes of attributes on a VAE latent: the paper's disentanglement measure (SPEC.md section 3).

Send-VAE argues that a generation-friendly latent lays attribute information out *linearly*, and
measures it with a linear probe on the **flattened encoder latent** (no pooling; 32x16x16 = 8192-d
for f16d32) that predicts binary attributes (CelebA, DeepFashion, AwA2), scored by F1 (paper
Table 8). The paper leaves the classifier, splits and F1 averaging open; this module fixes them:

* **features** (:func:`extract_features`): the posterior mean (default) or one posterior sample per
  image, flattened; cached as safetensors per (encoder fingerprint, dataset, split). A sample for
  image ``i`` uses noise seeded by ``(seed, i)``, so it does not depend on the batch size.
* **classifier** (:func:`fit_linear_probe`): one logistic regression per attribute, all fitted
  jointly in torch by full-batch L-BFGS on features standardised with *train* statistics. The
  objective for attribute ``a`` is ``mean_i BCE(x_i . w_a + b_a, y_ia) + (l2 / 2) |w_a|^2`` over the
  images whose label is known (NaN labels are masked), i.e. scikit-learn's
  ``LogisticRegression(C = 1 / (l2 * n_a))``. Each attribute's L2 weight is chosen from ``l2_grid``
  (extended down to 1e-5 and 0, PILOT.md) by its validation log-loss, with early stopping on that
  loss, per attribute (the problems are independent; one attribute overfitting does not stop the
  others); without a validation split the dataset's train split is carved (seeded).
* **thresholds**: one per attribute, chosen on validation to maximise that attribute's F1.
* **scores** (:func:`evaluate_probe`): micro F1 (pooled TP/FP/FN), macro F1 (mean of per-attribute
  F1 over attributes where F1 is defined), per-attribute F1, top-k recall (DeepFashion's protocol as
  mmfashion computes it, :func:`top_k_recall`: per attribute, the fraction of its positive images
  that rank it among their k highest scores, averaged over the ``recall_best`` attributes with the
  highest recall; k = 3, 5; the per-image variant is reported too, :func:`top_k_recall_per_image`)
  and, for datasets made of one-hot factor groups (shapes), the per-factor accuracy of the argmax
  inside each group.

:func:`run_probe` runs this for several VAEs and reference rows (raw pixels, a teacher's tokens,
a random-init VAE) on several datasets, and writes ``probe_results.json`` and ``probe_results.md``.
Wide references are reduced for speed to the top principal directions of their *standardised*
features, the components kept at their relative scale (:func:`standardized_pca`). A random-init
VAE is a *reference*, not a floor: it can beat a trained VAE on some factors (PILOT.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sendvae.config import to_dict
from sendvae.eval.probe_config import DEFAULT_L2_GRID, ProbeConfig
from sendvae.errors import UserError
from sendvae.pixels import to_model
from sendvae.progress import bars_enabled
from sendvae.hardware import resolve_device

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Standardisation, PCA, validation split, the L-BFGS driver (shared with latent_metrics)
# ----------------------------------------------------------------------------------------------


@dataclass
class Standardizer:
    """Per-dimension z-score with statistics from the training features (constant dims map to 0)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, chunk: int = 16384) -> "Standardizer":
        """Mean and (population) std per dimension, accumulated in float64 chunk by chunk."""
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for i in range(0, len(x), chunk):
            total += x[i:i + chunk].double().sum(0)
        mean = total / len(x)
        sq = torch.zeros_like(total)
        for i in range(0, len(x), chunk):
            sq += ((x[i:i + chunk].double() - mean) ** 2).sum(0)
        std = (sq / len(x)).sqrt()
        std = torch.where(std > 1e-8 * (1 + mean.abs()), std, torch.ones_like(std))
        return cls(mean.float(), std.float())

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def copy_to(self, x: Tensor, device: torch.device) -> Tensor:
        """Standardised float32 copy of ``x`` on ``device``, made in place (one copy of the data)."""
        out = x.to(device=device, dtype=torch.float32, copy=True)
        return out.sub_(self.mean.to(device)).div_(self.std.to(device))


@dataclass
class PCA:
    """Projection on the top principal directions of the training features (references, for speed)."""

    mean: Tensor  # [D]
    components: Tensor  # [D, k]

    @classmethod
    def fit(cls, x: Tensor, dim: int, seed: int = 0) -> "PCA":
        dim = min(dim, x.shape[0], x.shape[1])
        mean = x.mean(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, v = torch.pca_lowrank(x - mean, q=dim, center=False, niter=4)
        return cls(mean, v[:, :dim])

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) @ self.components


def standardized_pca(
    train_x: Tensor, others: Sequence[Tensor], dim: int, *, seed: int = 0, device: str | torch.device = "cpu",
) -> tuple[Tensor, ...]:
    """Standardise with train statistics, then project on the top ``dim`` principal directions of train.

    The components are *not* rescaled one by one: a probe with an L2 penalty on them is the probe on
    the standardised features restricted to the principal subspace (whitening the components would
    blow the noise directions up to the size of the signal ones). Returns (train, *others) on CPU.
    """
    standardizer = Standardizer.fit(train_x)
    z_train = standardizer.copy_to(train_x, torch.device(device))
    pca = PCA.fit(z_train, dim, seed)
    out = [pca(z_train).cpu()]
    del z_train
    out += [pca(standardizer.copy_to(x, torch.device(device))).cpu() for x in others]
    return tuple(out)


def carve_validation(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n)`` into (train rows, validation rows)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise UserError(f"cannot carve a validation split from {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def fit_with_lbfgs(
    params: list[Tensor],
    objective: Callable[[], Tensor],
    val_objective: Callable[[], Tensor] | None = None,
    *,
    per_column: bool = False,  # val_objective gives one loss per column (last dim) of every parameter
    max_iter: int = 300,  # L-BFGS iterations in all
    check_every: int = 10,  # iterations between validation checks (after 1, 2, 4, 8, ... at the start)
    patience: int = 3,  # checks without any improvement before stopping early
) -> tuple[Tensor, int]:
    """Minimise ``objective`` by full-batch L-BFGS (strong Wolfe line search), with early stopping.

    ``val_objective`` returns the validation loss: a scalar, or with ``per_column`` one value per
    column of the parameters (independent problems fitted jointly, e.g. one logistic regression per
    attribute). The parameters (or each column) with the best validation loss are kept, and training
    stops once no loss has improved for ``patience`` checks. Returns (best validation loss(es), or the
    final training loss without a validation objective; iterations run).
    """
    # max_eval = 25 x the chunk's iterations: the iteration count, not the evaluation budget, ends a chunk
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=check_every, history_size=20, tolerance_grad=1e-7, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    def validate() -> Tensor:
        with torch.no_grad():
            return torch.as_tensor(val_objective(), dtype=torch.float64).reshape(-1).cpu()  # type: ignore[misc]

    best = validate() if val_objective is not None else torch.tensor([math.inf], dtype=torch.float64)
    best_params = [p.detach().clone() for p in params]
    bad, done = 0, 0
    while done < max_iter:
        # checks after iterations 1, 2, 4, 8, ... then every check_every: small sets overfit within a few steps
        chunk = min(check_every, max(1, done), max_iter - done) if val_objective is not None else check_every
        opt.param_groups[0].update(max_iter=chunk, max_eval=25 * chunk)
        state = opt.state[params[0]]
        iters_before, evals_before = state.get("n_iter", 0), state.get("func_evals", 0)
        opt.step(closure)
        state = opt.state[params[0]]
        ran, evals = state.get("n_iter", 0) - iters_before, state.get("func_evals", 0) - evals_before
        done += max(ran, 1)
        if val_objective is not None:
            current = validate()
            improved = current < best - 1e-7 * (1 + best.abs())
            if bool(improved.any()):
                bad = 0
                best = torch.where(improved, current, best)
                with torch.no_grad():
                    for p, b in zip(params, best_params):
                        if per_column:
                            cols = improved.to(p.device)
                            b[..., cols] = p.detach()[..., cols]
                        else:
                            b.copy_(p.detach())
            else:
                bad += 1
                if bad >= patience:
                    break
        if ran < chunk and evals < 25 * chunk:  # converged inside this chunk (gradient or change tolerance)
            break
    if val_objective is None:
        return objective().detach().reshape(1).cpu().double(), done
    with torch.no_grad():
        for p, b in zip(params, best_params):
            p.copy_(b)
    return best, done


# ----------------------------------------------------------------------------------------------
# The multi-label probe
# ----------------------------------------------------------------------------------------------


def _masked_bce(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE over the known labels of each attribute -> [A] (NaN where an attribute has none)."""
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask
    return loss.sum(0) / mask.sum(0)


def _nan_to_mask(y: Tensor) -> tuple[Tensor, Tensor]:
    known = ~torch.isnan(y)
    return torch.where(known, y, torch.zeros_like(y)), known.to(y.dtype)


def best_f1_thresholds(logits: Tensor, y: Tensor) -> Tensor:
    """Per attribute, the logit threshold (predict ``logit > threshold``) that maximises F1 on (logits, y).

    Only cuts between distinct scores are considered; the threshold is the midpoint between the last
    score predicted positive and the next one. Attributes with no known positive get +inf.
    """
    y, mask = _nan_to_mask(y.float())
    thresholds = torch.full((logits.shape[1],), math.inf)
    for a in range(logits.shape[1]):
        known = mask[:, a] > 0
        s, t = logits[known, a].float(), y[known, a]
        positives = t.sum()
        if positives <= 0 or s.numel() == 0:
            continue
        s, order = s.sort(descending=True)
        tp = t[order].cumsum(0)
        predicted = torch.arange(1, s.numel() + 1, dtype=tp.dtype)
        f1 = 2 * tp / (predicted + positives)
        distinct = torch.ones_like(s, dtype=torch.bool)
        distinct[:-1] = s[:-1] > s[1:]  # a cut after position k must separate distinct scores
        f1 = torch.where(distinct, f1, torch.full_like(f1, -1.0))
        k = int(f1.argmax())
        thresholds[a] = float((s[k] + s[k + 1]) / 2) if k + 1 < s.numel() else float(s[k]) - 1.0
    return thresholds


@dataclass
class LinearProbe:
    """A fitted multi-label logistic probe: standardiser, weights, per-attribute thresholds."""

    standardizer: Standardizer
    weight: Tensor  # [D, A]
    bias: Tensor  # [A]
    thresholds: Tensor  # [A], on logits
    l2: list[float]  # the L2 weight selected for each attribute
    names: list[str]
    groups: dict[str, list[int]] | None = None  # factor -> attribute columns of its one-hot group
    val_losses: dict[float, Tensor] = field(default_factory=dict)  # per L2 tried: validation log-loss [A]
    iterations: dict[float, int] = field(default_factory=dict)  # per L2 tried: L-BFGS iterations

    @torch.no_grad()
    def logits(self, x: Tensor, chunk: int = 8192) -> Tensor:
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        return torch.cat([self.standardizer(x[i:i + chunk].float()) @ w + b for i in range(0, len(x), chunk)])

    def predict(self, x: Tensor) -> Tensor:
        """0/1 predictions [N, A] with the validation-chosen thresholds."""
        return (self.logits(x) > self.thresholds.to(x.device)).float()


def _check_xy(x: Tensor, y: Tensor, what: str) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise UserError(
            f"{what}: expected features [N, D] and labels [N, A], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise UserError(f"{what}: no images")


def fit_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,  # L2 weights to try; chosen per attribute on validation log-loss
    max_iter: int = 300,  # L-BFGS iterations per L2 value
    check_every: int = 10,  # iterations between early-stopping checks
    patience: int = 3,  # checks without validation improvement before stopping
    early_stopping: bool = True,  # False: run every fit to convergence (or max_iter)
    val_fraction: float = 0.1,  # carved from train when no validation split is given
    seed: int = 0,  # the carve
    names: Sequence[str] | None = None,  # attribute names (default a0, a1, ...)
    groups: Mapping[str, Sequence[int]] | None = None,  # one-hot factor groups, for per-factor accuracy
    device: str | torch.device | None = None,  # where to fit (default: the features' device)
    standardize: bool = True,  # z-score with train statistics (False: features already on a common scale)
    progress: bool = True,
) -> LinearProbe:
    """Fit one logistic regression per attribute on standardised features (see the module docstring)."""
    _check_xy(train_x, train_y, "train")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is None:
        tr, va = carve_validation(train_x.shape[0], val_fraction, seed)
        train_x, train_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    assert val_x is not None and val_y is not None
    _check_xy(val_x, val_y, "validation")
    if not l2_grid or any(v < 0 for v in l2_grid):
        raise UserError(f"l2_grid must be a non-empty list of values >= 0, got {list(l2_grid)}")
    device = torch.device(device) if device is not None else train_x.device
    if standardize:
        standardizer = Standardizer.fit(train_x)
    else:
        standardizer = Standardizer(torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1]))
    xt, xv = standardizer.copy_to(train_x, device), standardizer.copy_to(val_x, device)
    yt, mt = (t.to(device) for t in _nan_to_mask(train_y.float()))
    yv, mv = (t.to(device) for t in _nan_to_mask(val_y.float()))
    counts = mt.sum(0)
    observed = counts > 0
    if not bool(observed.any()):
        raise UserError("every training label is unknown (NaN): nothing to fit")
    n_attr = train_y.shape[1]
    prevalence = ((yt * mt).sum(0) / counts.clamp_min(1)).clamp(1e-4, 1 - 1e-4)
    w = torch.zeros(xt.shape[1], n_attr, device=device, requires_grad=True)
    b = torch.logit(prevalence).detach().clone().requires_grad_(True)
    val_known = mv.sum(0) > 0

    def val_loss() -> Tensor:
        """Per attribute: validation log-loss (the training log-loss for attributes without validation labels)."""
        with torch.no_grad():
            val = _masked_bce(xv @ w + b, yv, mv)
            return torch.where(val_known, val, _masked_bce(xt @ w + b, yt, mt).nan_to_num(0.0))

    results: dict[float, tuple[Tensor, int, Tensor, Tensor]] = {}
    grid = sorted(set(float(v) for v in l2_grid), reverse=True)  # warm start from strong to weak L2
    for l2 in tqdm(grid, desc="probe L2 grid", leave=False, disable=not (progress and bars_enabled())):

        def objective(l2: float = l2) -> Tensor:
            per_attr = _masked_bce(xt @ w + b, yt, mt)[observed]
            return per_attr.mean() + 0.5 * l2 * (w * w).sum() / n_attr

        best, its = fit_with_lbfgs(
            [w, b], objective, val_loss if early_stopping else None, per_column=True,
            max_iter=max_iter, check_every=check_every, patience=patience,
        )
        best = val_loss().double().cpu()  # equals the early-stopping best (restored parameters)
        results[l2] = (best, its, w.detach().clone(), b.detach().clone())
        log.debug("probe l2=%g: mean val log-loss %.5f after %d iterations", l2, float(best.mean()), its)
    # each attribute takes the L2 value with its lowest validation loss (ties: the stronger L2)
    losses = torch.stack([results[l2][0] for l2 in grid])  # [L, A], grid sorted strong -> weak
    pick = losses.argmin(0)
    pick_d, cols = pick.to(device), torch.arange(n_attr, device=device)
    w_best = torch.stack([results[l2][2] for l2 in grid])[pick_d, :, cols].T.contiguous()
    b_best = torch.stack([results[l2][3] for l2 in grid])[pick_d, cols]
    chosen = [grid[int(i)] for i in pick]
    thresholds = best_f1_thresholds((xv @ w_best + b_best).cpu(), val_y.float().cpu())
    name_list = list(names) if names is not None else [f"a{i}" for i in range(n_attr)]
    if len(name_list) != n_attr:
        raise UserError(f"{len(name_list)} attribute names for {n_attr} label columns")
    return LinearProbe(
        standardizer, w_best.cpu(), b_best.cpu(), thresholds, chosen, name_list,
        {k: list(v) for k, v in groups.items()} if groups else None,
        {k: v[0] for k, v in results.items()}, {k: v[1] for k, v in results.items()},
    )


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def f1_scores(pred: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Per-attribute F1 [A] (NaN where no known positive is predicted or present) and micro F1."""
    y, mask = _nan_to_mask(y.float())
    pred = pred.float() * mask
    tp = (pred * y).sum(0)
    fp = (pred * (1 - y) * mask).sum(0)
    fn = ((1 - pred) * y * mask).sum(0)
    denom = 2 * tp + fp + fn
    per_attr = torch.where(denom > 0, 2 * tp / denom.clamp_min(_EPS), torch.full_like(tp, math.nan))
    micro_denom = float(denom.sum())
    micro = 2 * float(tp.sum()) / micro_denom if micro_denom > 0 else math.nan
    return per_attr, micro


def _in_top_k(scores: Tensor, k: int) -> Tensor:
    """0/1 matrix like ``scores`` [n, A]: 1 where the attribute is among the image's k highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, top, 1.0)


def top_k_recall(scores: Tensor, y: Tensor, k: int, best: int = 50) -> float:
    """DeepFashion's top-k recall rate, the published protocol (mmfashion's attribute evaluation).

    Per attribute a: ``recall_a = |images positive for a that rank a among their k top scores| /
    |images positive for a|``, over the attributes with at least one positive. Reported: the mean of
    the ``best`` highest ``recall_a`` (mmfashion: 50 of DeepFashion's 1,000 attributes), or of all of
    them when ``best`` is 0 or exceeds their number. Unknown (NaN) labels count as not positive.
    """
    y, _ = _nan_to_mask(y.float())
    positives = y.sum(0)
    has = positives > 0
    if not bool(has.any()):
        return math.nan
    recall = (_in_top_k(scores, k) * y).sum(0)[has] / positives[has]
    if 0 < best < recall.numel():
        recall = recall.topk(best).values
    return float(recall.mean())


def top_k_recall_per_image(scores: Tensor, y: Tensor, k: int) -> float:
    """Per image, |positives among the k top scores| / |positives|, averaged over images with a positive.

    Not DeepFashion's protocol (:func:`top_k_recall` counts per attribute); unknown (NaN) labels count
    as not positive.
    """
    y, _ = _nan_to_mask(y.float())
    positives = y.sum(1)
    has = positives > 0
    hits = (_in_top_k(scores, k) * y).sum(1)
    return float((hits[has] / positives[has]).mean()) if bool(has.any()) else math.nan


def factor_accuracy(logits: Tensor, y: Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Per factor, the accuracy of the argmax over its one-hot group (images with exactly one known positive)."""
    out = {}
    for factor, cols in groups.items():
        cols_t = torch.as_tensor(list(cols), dtype=torch.long)
        target = y[:, cols_t]
        valid = (~torch.isnan(target)).all(1) & ((target == 1).sum(1) == 1)
        if not bool(valid.any()):
            out[factor] = math.nan
            continue
        pred = logits[valid][:, cols_t].argmax(1)
        out[factor] = float((pred == target[valid].argmax(1)).float().mean())
    return out


def evaluate_probe(probe: LinearProbe, x: Tensor, y: Tensor, ks: Sequence[int] = (3, 5),
                   recall_best: int = 50) -> dict[str, Any]:
    """Micro/macro/per-attribute F1, top-k recall (over the ``recall_best`` best attributes, and per
    image) and (with factor groups) per-factor accuracy on (x, y)."""
    _check_xy(x, y, "evaluation")
    logits = probe.logits(x).cpu()
    y = y.float().cpu()
    per_attr, micro = f1_scores((logits > probe.thresholds).float(), y)
    defined = ~torch.isnan(per_attr)
    result: dict[str, Any] = {
        "micro_f1": micro,
        "macro_f1": float(per_attr[defined].mean()) if bool(defined.any()) else math.nan,
        "per_attribute_f1": {n: float(v) for n, v in zip(probe.names, per_attr)},
    }
    for k in ks:
        result[f"top{k}_recall"] = top_k_recall(logits, y, k, recall_best)
        result[f"top{k}_recall_per_image"] = top_k_recall_per_image(logits, y, k)
    if probe.groups:
        acc = factor_accuracy(logits, y, probe.groups)
        result["factor_accuracy"] = acc
        values = [v for v in acc.values() if not math.isnan(v)]
        result["mean_factor_accuracy"] = sum(values) / len(values) if values else math.nan
    return result


def chance_macro_f1(y: Tensor) -> float:
    """Macro F1 of the best label-blind rule (predict every image positive): mean of 2p / (1 + p)."""
    y, mask = _nan_to_mask(y.float())
    p = (y * mask).sum(0) / mask.sum(0).clamp_min(1)
    keep = p > 0
    return float((2 * p[keep] / (1 + p[keep])).mean())


# ----------------------------------------------------------------------------------------------
# run_probe: VAEs x datasets -> JSON + markdown
# ----------------------------------------------------------------------------------------------


@dataclass
class RowSpec:
    """One probed row: a VAE checkpoint or a reference (pixels, teacher:NAME[@WEIGHTS], random-vae:PRESET)."""

    name: str
    kind: str  # "vae" or "reference"
    source: str


def parse_vae_argument(text: str) -> RowSpec:
    """``[NAME=]PATH``; the name defaults to the checkpoint's folder or file stem."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():  # a bare path (which may itself contain '=')
        path, name = text, ""
    if not path:
        raise UserError(f"--vae {text!r}: expected PATH or NAME=PATH")
    if not Path(path).exists():
        raise UserError(f"--vae {text!r}: {path} does not exist")
    return RowSpec(name or Path(path.rstrip("/")).stem, "vae", path)


REFERENCE_FORMS = "pixels, teacher:NAME[@WEIGHTS], random-vae:PRESET"


def parse_reference(text: str) -> RowSpec:
    kind, _, arg = text.partition(":")
    if kind == "pixels" and not arg:
        return RowSpec("pixels", "reference", text)
    if kind in ("teacher", "random-vae") and arg:
        return RowSpec(text, "reference", text)
    raise UserError(f"--reference {text!r}: expected one of {REFERENCE_FORMS}")


def _build_encoder(row: RowSpec, cfg: ProbeConfig, device: torch.device) -> FeatureEncoder:
    if row.kind == "vae":
        from sendvae.models.vae import load_vae

        vae = load_vae(row.source).to(device).eval()
        return VAEEncoder(vae, cfg.use_mean, cfg.seed)
    kind, _, arg = row.source.partition(":")
    if kind == "pixels":
        return PixelEncoder()
    if kind == "teacher":
        from sendvae.models.teachers import build_teacher

        name, _, weights = arg.partition("@")
        return TeacherEncoder(build_teacher(name, weights=weights or None).to(device).eval(), name)
    from sendvae.models.vae import build_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_vae(arg, resolution=cfg.resolution)
    return VAEEncoder(vae.to(device).eval(), cfg.use_mean, cfg.seed)


def dataset_short_name(spec: str) -> str:
    """``celeba:/data/CelebA`` -> ``celeba``; ``csv:attrs.csv`` -> ``attrs``."""
    kind, _, arg = spec.partition(":")
    if kind == "csv" and arg:
        return Path(arg).stem
    return kind or spec


def _dataset_key(spec: str, resolution: int, split: str) -> str:
    kind, sep, arg = spec.partition(":")
    if sep and kind != "shapes" and arg:
        arg = str(Path(arg).resolve())
    return f"{kind}{sep}{arg}|{resolution}|{split}"


def factor_groups(names: Sequence[str], dataset: Any = None) -> dict[str, list[int]] | None:
    """One-hot factor groups: the dataset's own ``factor_groups`` if it has them, else names ``factor=value``."""
    own = getattr(dataset, "factor_groups", None)
    if own:
        return {k: list(v) for k, v in dict(own).items()}
    if not names or not all("=" in n for n in names):
        return None
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.split("=", 1)[0], []).append(i)
    return groups


def _split_or_none(data: Any, split: str) -> Any:
    try:
        ds = data.split(split)
    except (KeyError, ValueError, UserError) as exc:
        log.info("no %s split (%s)", split, exc)
        return None
    return ds if ds is not None and len(ds) > 0 else None


@dataclass
class _DatasetSplits:
    spec: str
    names: list[str]
    groups: dict[str, list[int]] | None
    train: Any
    val: Any
    test: Any


def _open_dataset(spec: str, cfg: ProbeConfig) -> _DatasetSplits:
    from sendvae.data.attributes import open_attribute_dataset

    data = open_attribute_dataset(spec, cfg.resolution)
    names = list(data.names)
    train, test = _split_or_none(data, "train"), _split_or_none(data, "test")
    if train is None or test is None:
        raise UserError(f"--data {spec}: needs non-empty train and test splits")
    return _DatasetSplits(spec, names, factor_groups(names, data), train, _split_or_none(data, "val"), test)


def _probe_one_row(
    row: RowSpec, data: _DatasetSplits, cfg: ProbeConfig, device: torch.device, cache_dir: Path | None,
) -> dict[str, Any]:
    start = time.time()
    encoder = _build_encoder(row, cfg, device)

    def feats(split: str, ds: Any) -> Features:
        return extract_encoder_features(
            encoder, ds, dataset_key=_dataset_key(data.spec, cfg.resolution, split), cache_dir=cache_dir,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, desc=f"{row.name} {split}",
        )

    train, test = feats("train", data.train), feats("test", data.test)
    if data.val is not None:
        val = feats("val", data.val)
    else:
        tr, va = carve_validation(len(train), cfg.val_fraction, cfg.seed)
        train, val = train.subset(tr), train.subset(va)
    if cfg.max_train and len(train) > cfg.max_train:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.max_train]
        train = train.subset(keep.sort().values)
    if train.attributes is None or test.attributes is None or val.attributes is None:
        raise UserError(f"--data {data.spec}: items carry no 'attributes'")
    pca_dim = cfg.reference_pca_dim if row.kind == "reference" else cfg.pca_dim
    x_train, x_val, x_test = train.x, val.x, test.x
    standardize = True
    if pca_dim and x_train.shape[1] > pca_dim:
        x_train, x_val, x_test = standardized_pca(x_train, (x_val, x_test), pca_dim, seed=cfg.seed, device=device)
        standardize = False  # orthonormal projections of standardised features: keep their relative scale
    probe = fit_linear_probe(  # copies the (standardised) features to the device itself
        x_train, train.attributes, x_val, val.attributes, l2_grid=cfg.l2_grid,
        max_iter=cfg.max_iter, check_every=cfg.check_every, patience=cfg.patience, seed=cfg.seed,
        names=data.names, groups=data.groups, device=device, standardize=standardize,
    )
    result: dict[str, Any] = {
        "name": row.name, "kind": row.kind, "source": row.source, "encoder": encoder.key,
        "feature_shape": list(train.shape), "feature_dim": int(train.x.shape[1]), "probe_dim": int(x_train.shape[1]),
        "l2_median": float(torch.tensor(probe.l2).median()),
        "l2_per_attribute": dict(zip(probe.names, probe.l2)),
        "val_log_loss": {str(k): float(v.mean()) for k, v in probe.val_losses.items()},
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
    }
    result.update(evaluate_probe(probe, x_test, test.attributes, cfg.top_k, cfg.recall_best))
    if cfg.latent_metrics:
        from sendvae.eval.latent_metrics import latent_metric_summary

        result["latent_metrics"] = latent_metric_summary(
            x_train, train.labels, x_test, test.labels, test.tokens(), seed=cfg.seed, device=device,
            l2_grid=cfg.l2_grid, max_iter=cfg.max_iter, k_grid=cfg.gmm_k_grid, standardize=standardize,
        )
    result["chance_macro_f1"] = chance_macro_f1(test.attributes)
    result["seconds"] = round(time.time() - start, 2)
    return result


_MARKDOWN_LATENT = ("class_probe_accuracy", "uniformity_gini", "uniformity_entropy", "gmm_modes")


def probe_markdown(results: Mapping[str, Any]) -> str:
    """A markdown table per dataset: one row per VAE/reference (per-attribute F1 stays in the JSON)."""
    from sendvae.eval.report import format_value

    lines = ["# Linear probes of attributes (flattened latent, F1 thresholds chosen on validation)", ""]
    for ds in results["datasets"]:
        rows = ds["rows"]
        ks = [k for k in results["config"]["top_k"]]
        headers = ["row", "kind", "dim", "micro-F1", "macro-F1"] + [f"top-{k} recall" for k in ks]
        factors = list(rows[0].get("factor_accuracy", {})) if rows else []
        if factors:
            headers += ["mean factor acc"] + factors
        present = rows[0].get("latent_metrics", {}) if rows else {}
        lm_keys = [k for k in _MARKDOWN_LATENT if k in present]  # the GMM NLL curve stays in the JSON
        headers += lm_keys + ["median L2"]
        lines += [f"## {ds['name']} (`{ds['spec']}`)", "",
                  f"{len(ds['attributes'])} attributes; train {ds['n_train']}, val {ds['n_val']}"
                  f"{' (carved from train)' if ds['val_carved'] else ''}, test {ds['n_test']}; "
                  f"chance macro-F1 (predict all positive) {format_value(ds['chance_macro_f1'])}.", "",
                  "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in rows:
            cells = [r["name"], r["kind"], r["probe_dim"], r["micro_f1"], r["macro_f1"]]
            cells += [r.get(f"top{k}_recall") for k in ks]
            if factors:
                cells += [r.get("mean_factor_accuracy")] + [r["factor_accuracy"].get(f) for f in factors]
            cells += [r.get("latent_metrics", {}).get(k) for k in lm_keys] + [r["l2_median"]]
            lines.append("| " + " | ".join(format_value(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run_probe(
    vae_paths: Sequence[str],
    data_specs: Sequence[str],
    out_dir: str | Path,
    config: ProbeConfig | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Probe every VAE (``[NAME=]PATH``) and reference on every dataset; write JSON + markdown into ``out_dir``.

    Returns the results dictionary that is written to ``probe_results.json``.
    """
    cfg = config or ProbeConfig()
    rows = [parse_vae_argument(v) for v in vae_paths] + [parse_reference(r) for r in references]
    if not rows:
        raise UserError("nothing to probe: give at least one --vae or --reference")
    if not data_specs:
        raise UserError("no dataset: give at least one --data SPEC")
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            raise UserError(f"two rows are named {row.name!r}: name them with --vae NAME=PATH")
        seen.add(row.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if cfg.cache_dir.lower() == "none" else Path(cfg.cache_dir or out / "feature_cache")
    device = resolve_device(cfg.device, setting="device")
    results: dict[str, Any] = {"config": to_dict(cfg), "datasets": []}
    for spec in data_specs:
        data = _open_dataset(spec, cfg)
        entry: dict[str, Any] = {
            "spec": spec, "name": dataset_short_name(spec), "attributes": data.names, "factors": data.groups,
            "val_carved": data.val is None, "rows": [],
        }
        for row in tqdm(rows, desc=f"probe {entry['name']}", unit="row", disable=not bars_enabled()):
            r = _probe_one_row(row, data, cfg, device, cache)
            entry["rows"].append(r)
            log.info("%s on %s: micro-F1 %.4f macro-F1 %.4f (%.0f s)", row.name, entry["name"], r["micro_f1"],
                     r["macro_f1"], r["seconds"])
        first = entry["rows"][0]
        entry.update(n_train=first["n_train"], n_val=first["n_val"], n_test=first["n_test"],
                     chance_macro_f1=first["chance_macro_f1"])
        results["datasets"].append(entry)
    results = json_safe(results)
    (out / "probe_results.json").write_text(json.dumps(results, indent=1))
    (out / "probe_results.md").write_text(probe_markdown(results))
    return results
