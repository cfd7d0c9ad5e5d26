"""The probe solver: standardisation, PCA, validation carving and L-BFGS logistic regression.

The numerics shared by the attribute probes (:mod:`sendvae.eval.probe`) and the latent metrics
(:mod:`sendvae.eval.latent_metrics`): :class:`Standardizer` (z-scores with training statistics),
:class:`PCA` and :func:`standardized_pca`, :func:`carve_validation` (a seeded validation split),
:func:`fit_with_lbfgs` (full-batch L-BFGS with early stopping on a validation objective), and the
multi-label logistic probe built on them, :func:`fit_linear_probe`: one logistic regression per
attribute, ``mean_i BCE(x_i . w_a + b_a, y_ia) + (l2 / 2) |w_a|^2`` over the images whose label is
known (NaN labels are masked), i.e. scikit-learn's ``LogisticRegression(C = 1 / (l2 * n_a))``, each
attribute's L2 weight and F1 threshold chosen on validation (:func:`best_f1_thresholds`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sendvae.errors import UserError
from sendvae.eval.probe_config import DEFAULT_L2_GRID
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)


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


def nan_to_mask(y: Tensor) -> tuple[Tensor, Tensor]:
    known = ~torch.isnan(y)
    return torch.where(known, y, torch.zeros_like(y)), known.to(y.dtype)


def best_f1_thresholds(logits: Tensor, y: Tensor) -> Tensor:
    """Per attribute, the logit threshold (predict ``logit > threshold``) that maximises F1 on (logits, y).

    Only cuts between distinct scores are considered; the threshold is the midpoint between the last
    score predicted positive and the next one. Attributes with no known positive get +inf.
    """
    y, mask = nan_to_mask(y.float())
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


def check_xy(x: Tensor, y: Tensor, what: str) -> None:
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
    check_xy(train_x, train_y, "train")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is None:
        tr, va = carve_validation(train_x.shape[0], val_fraction, seed)
        train_x, train_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    assert val_x is not None and val_y is not None
    check_xy(val_x, val_y, "validation")
    if not l2_grid or any(v < 0 for v in l2_grid):
        raise UserError(f"l2_grid must be a non-empty list of values >= 0, got {list(l2_grid)}")
    device = torch.device(device) if device is not None else train_x.device
    if standardize:
        standardizer = Standardizer.fit(train_x)
    else:
        standardizer = Standardizer(torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1]))
    xt, xv = standardizer.copy_to(train_x, device), standardizer.copy_to(val_x, device)
    yt, mt = (t.to(device) for t in nan_to_mask(train_y.float()))
    yv, mv = (t.to(device) for t in nan_to_mask(val_y.float()))
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
