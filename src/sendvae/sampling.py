"""Samplers for the stage-2 flow (SPEC.md section 5): Euler / Heun ODE, Euler-Maruyama SDE, guidance, labels, seeds.

Time convention (DESIGN.md section 2): t = 1 is noise, ``x_t = (1 - t) x + t eps`` and the model
predicts the velocity ``v = eps - x``. Every sampler starts from ``x_1 ~ N(0, I)`` and integrates
``dx/dt = v`` from t = 1 down to 0.

- **ODE** (Euler, Heun): the grid ``linspace(1, 0, steps + 1)``; Heun adds a trapezoid correction on
  every step but the last (its end point t = 0 is where the model is least reliable, and the
  correction there would cost one more evaluation; EDM and REPA make the same choice).
- **SDE** (Euler-Maruyama): the reverse-time SDE with the same marginals as the flow,
  ``dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW`` with diffusion coefficient ``w(t) = 2t`` and the
  score from :func:`sendvae.transport.velocity_to_score`, on ``linspace(1, 0.04, steps)``; then one
  deterministic step from 0.04 to 0 with the same drift and no noise (the mean of the last
  transition: added noise there would survive into the image). ``steps`` counts model evaluations.
- **Guidance** on all latent channels, ``v = v_bad + w (v_good - v_bad)``, only on steps whose start
  time lies in the interval ``[low, high]`` (t = 1 noise; REPA-E's ``[0, 0.75]`` guides the last three
  quarters). For the SDE this equals guiding the drift, because the drift is affine in v. Two kinds:

  * **classifier-free** (``guidance="cfg"``): v_good is the conditional, v_bad the unconditional
    (null-label) velocity of the same model; guided steps run the model once on ``[x, x]`` with
    labels ``[y, null]``;
  * **AutoGuidance** (``guidance="autoguidance"``; Karras et al. 2024, "Guiding a diffusion model with
    a bad version of itself"): v_bad is the velocity, for the same label, of a weaker model of the
    same latent space (an earlier checkpoint or a smaller SiT). A model guiding itself changes nothing.

  Off the interval (or with w = 1) the model runs once per evaluation on the plain batch. Scales
  below 1 are refused: the reference samplers (SiT, REPA) guide only when the scale exceeds 1 and
  silently sample unguided below, so a scale of 0.5 would mean different things here and there.
- **State** in float64; the model is called in its own dtype (its parameters' dtype).
- **Seeds**: sample i draws its initial noise, then its SDE increments, from its own generator seeded
  by (seed, i), and with ``labels="random"`` its label from another stream seeded by (seed, i).
  ``labels="balanced"`` gives every class the same count (N / num_classes), in a permutation fixed
  by the seed. So a sample depends on its index only: not on the batch size, nor on the number of
  processes.

:func:`sample_to_npz` runs a whole sampling job across ``torchrun`` ranks and writes the ADM-format
npz (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` labels); it resumes an interrupted job. Loading a
trained run's SiT and VAE for it is :mod:`sendvae.generator`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from sendvae.config import ConfigError, param
from sendvae.errors import UserError
from sendvae.progress import bars_enabled
from sendvae.transport import velocity_to_score

log = logging.getLogger(__name__)

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(x [B, C, H, W], t [B], y [B]) -> velocity`` in this project's convention (``SiT.forward``)."""

NoiseSource = Callable[[], torch.Tensor]
"""Each call returns the next standard normal draw [B, C, H, W] (float64), one row per sample."""

SDE_END_TIME = 0.04  # the Euler-Maruyama part stops here; one deterministic step goes on to 0.

_NOISE_STREAM, _LABEL_STREAM, _PERMUTATION_STREAM = 0, 1, 2


@dataclass
class SamplingConfig:
    """How to draw samples (the options of ``sendvae sample``)."""

    sampler: str = param("sde", "sde (Euler-Maruyama), euler or heun (ODE)", choices=("sde", "euler", "heun"))
    steps: int = param(
        250, "model evaluations per sample without guidance (SDE: steps - 1 stochastic + 1 final)", min=1
    )
    cfg_scale: float = param(1.0, "guidance scale w of cfg or autoguidance (1 = off; below 1 refused)")
    guidance_interval: tuple[float, float] = param(
        (0.0, 1.0), "guide only steps starting at t in [low, high] (t = 1 noise)"
    )
    guidance: str = param(
        "cfg", "cfg (classifier-free) or autoguidance (by guide_model)", choices=("cfg", "autoguidance")
    )
    guide_model: str = param("", "autoguidance: the weaker SiT (run, training checkpoint or file) guiding this one")
    labels: str = param("balanced", "balanced (equal count per class) or random labels", choices=("balanced", "random"))
    seed: int = param(0, "sample i depends only on (seed, i)", min=0)

    def check(self) -> None:
        check_guidance_scale(self.cfg_scale)
        if self.guidance == "autoguidance" and not self.guide_model:
            raise ConfigError("guide_model: guidance=autoguidance needs the guiding SiT (--guide-model PATH)")
        if self.guidance == "cfg" and self.guide_model:
            raise ConfigError(
                f"guide_model: {self.guide_model!r} is only used with guidance=autoguidance (--guidance autoguidance)"
            )
        low, high = self.guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"guidance_interval: {list(self.guidance_interval)} must satisfy 0 <= low <= high <= 1")
        if self.sampler == "sde" and self.steps < 2:
            raise ConfigError(f"steps: the SDE sampler needs at least 2 steps, got {self.steps}")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (as recorded in a samples file's metadata)."""
        return {**asdict(self), "guidance_interval": list(self.guidance_interval)}


def check_guidance_scale(scale: float) -> None:
    """Refuse a guidance scale below 1 (see the module notes: SiT / REPA would not guide at all there)."""
    if scale < 1.0:
        raise ConfigError(
            f"cfg_scale: {scale!r} is below 1; the reference samplers (SiT, REPA) guide only for a scale "
            "above 1 and sample unguided otherwise, so sendvae refuses it: use 1 (--cfg 1) for no guidance"
        )


@dataclass(frozen=True)
class Guidance:
    """``v_bad + scale (v_good - v_bad)`` on steps starting at t in [low, high].

    Without ``guide_model`` this is classifier-free guidance (v_bad: the same model with ``null_label``);
    with it, AutoGuidance (v_bad: ``guide_model`` with the same label, called in the main model's dtype).
    """

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0
    null_label: int = 1000
    guide_model: VelocityModel | None = None

    def __post_init__(self) -> None:
        check_guidance_scale(self.scale)

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


# --------------------------------------------------------------------------------------------------
# One (guided) velocity evaluation, and the three samplers
# --------------------------------------------------------------------------------------------------


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 for a plain callable)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def velocity(
    model: VelocityModel,
    x: torch.Tensor,
    t: float,
    y: torch.Tensor,
    guidance: Guidance,
    guided: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The velocity at time ``t`` in float64; when ``guided``, ``v_bad + scale (v_good - v_bad)`` on every channel.

    Unguided, the model sees the batch once. Guided by CFG, it sees ``[x, x]`` with labels
    ``[y, null]``; guided by AutoGuidance, the model and the guide model each see ``(x, y)``.
    """

    def run(net: VelocityModel, x_in: torch.Tensor, y_in: torch.Tensor) -> torch.Tensor:
        t_in = torch.full((x_in.shape[0],), t, dtype=dtype, device=x.device)
        return net(x_in.to(dtype), t_in, y_in).to(torch.float64)

    if not guided:
        return run(model, x, y)
    if guidance.guide_model is not None:
        good, bad = run(model, x, y), run(guidance.guide_model, x, y)
    else:
        good, bad = run(model, torch.cat([x, x]), torch.cat([y, torch.full_like(y, guidance.null_label)])).chunk(2)
    return bad + guidance.scale * (good - bad)


def euler_ode(
    model: VelocityModel,
    x1: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    guidance: Guidance,
    heun: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = v`` from t = 1 to 0 on ``linspace(1, 0, steps + 1)``; Heun corrects all but the last step."""
    dtype = dtype or model_dtype(model)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = x1.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        guided = guidance.active(t_cur)  # the interval gates whole steps, by their start time
        v = velocity(model, x, t_cur, y, guidance, guided, dtype)
        x_next = x + (t_next - t_cur) * v
        if heun and i < steps - 1:
            v_next = velocity(model, x_next, t_next, y, guidance, guided, dtype)
            x_next = x + (t_next - t_cur) * 0.5 * (v + v_next)
        x = x_next
    return x


def sde_drift(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Reverse-SDE drift ``v - w(t)/2 * score`` with ``w(t) = 2t``, i.e. ``v - t * score``."""
    score = velocity_to_score(x, v, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
    return v - 0.5 * (2.0 * t) * score


def euler_maruyama_sde(
    model: VelocityModel,
    x1: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    guidance: Guidance,
    noise: NoiseSource,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euler-Maruyama on ``linspace(1, 0.04, steps)``, ``dx = drift dt + sqrt(2t) dW``, then a noiseless step to 0."""
    dtype = dtype or model_dtype(model)
    grid = torch.linspace(1.0, SDE_END_TIME, steps, dtype=torch.float64).tolist() + [0.0]
    x = x1.to(torch.float64)
    for t_cur, t_next in zip(grid[:-2], grid[1:-1]):
        dt = t_next - t_cur  # negative: time runs backwards
        v = velocity(model, x, t_cur, y, guidance, guidance.active(t_cur), dtype)
        x = x + sde_drift(x, v, t_cur) * dt + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * noise()
    t_cur, t_next = grid[-2], grid[-1]
    v = velocity(model, x, t_cur, y, guidance, guidance.active(t_cur), dtype)
    return x + sde_drift(x, v, t_cur) * (t_next - t_cur)


# --------------------------------------------------------------------------------------------------
# Seeds and labels
# --------------------------------------------------------------------------------------------------


def index_seed(seed: int, index: int, stream: int = _NOISE_STREAM) -> int:
    """A 64-bit generator seed for (seed, sample index, stream), mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0])


class PerSampleNoise:
    """Standard normal draws where row k comes from the generator of sample ``indices[k]``, seeded by (seed, index).

    The first call gives the initial noise x_1; later calls give the SDE increments, so sample i's
    whole trajectory depends only on (seed, i). Draws are made on the CPU and then moved to ``device``.
    """

    def __init__(
        self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
    ) -> None:
        self.generators = [torch.Generator().manual_seed(index_seed(seed, int(i))) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)

    def __call__(self) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(draws).to(self.device)


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Each class ``num_samples // num_classes`` times (the first ``num_samples % num_classes`` once more), shuffled."""
    generator = torch.Generator().manual_seed(index_seed(seed, 0, _PERMUTATION_STREAM))
    order = torch.randperm(num_samples, generator=generator)
    return (torch.arange(num_samples) % num_classes)[order]


def random_labels(indices: Sequence[int], num_classes: int, seed: int) -> torch.Tensor:
    """Label of sample i uniform in [0, num_classes), drawn from a generator seeded by (seed, i)."""
    labels = [
        torch.randint(num_classes, (), generator=torch.Generator().manual_seed(index_seed(seed, int(i), _LABEL_STREAM)))
        for i in indices
    ]
    return torch.stack(labels) if labels else torch.zeros(0, dtype=torch.int64)


def sample_labels(num_samples: int, num_classes: int, seed: int, mode: Literal["balanced", "random"]) -> torch.Tensor:
    """The labels of samples 0..num_samples-1 (int64)."""
    if mode == "balanced":
        if num_samples % num_classes:
            log.warning(
                "%d samples are not a multiple of %d classes: class counts differ by one", num_samples, num_classes
            )
        return balanced_labels(num_samples, num_classes, seed)
    if mode == "random":
        return random_labels(range(num_samples), num_classes, seed)
    raise UserError(f"labels: {mode!r} is not one of ['balanced', 'random']")


# --------------------------------------------------------------------------------------------------
# A batch of samples
# --------------------------------------------------------------------------------------------------


def generate_latents(
    model: VelocityModel,
    indices: Sequence[int],
    labels: torch.Tensor,
    latent_shape: Sequence[int],
    config: SamplingConfig,
    null_label: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    guide_model: VelocityModel | None = None,
) -> torch.Tensor:
    """Clean latents (float64 [B, C, H, W], normalised latent space) for samples ``indices`` of class ``labels`` [B].

    ``guide_model`` is the weaker model that ``config.guidance == "autoguidance"`` needs.
    """
    low, high = config.guidance_interval
    if (config.guidance == "autoguidance") != (guide_model is not None):
        raise UserError(
            f"guidance={config.guidance!r} "
            + ("needs a guide model (--guide-model)" if guide_model is None else "takes no guide model")
        )
    guidance = Guidance(config.cfg_scale, low, high, null_label, guide_model)
    noise = PerSampleNoise(config.seed, indices, latent_shape, device)
    x1, y = noise(), labels.to(device=device, dtype=torch.int64)
    with torch.inference_mode():
        if config.sampler == "sde":
            return euler_maruyama_sde(model, x1, y, config.steps, guidance, noise, dtype)
        if config.sampler in ("euler", "heun"):
            return euler_ode(model, x1, y, config.steps, guidance, heun=config.sampler == "heun", dtype=dtype)
    raise UserError(f"sampler: {config.sampler!r} is not one of ['sde', 'euler', 'heun']")


def evaluations_per_sample(config: SamplingConfig) -> int:
    """Model forward passes per sample (a guided evaluation counts twice)."""
    low, high = config.guidance_interval
    guidance = Guidance(config.cfg_scale, low, high)
    if config.sampler == "sde":
        times = torch.linspace(1.0, SDE_END_TIME, config.steps, dtype=torch.float64).tolist()
        return sum(2 if guidance.active(t) else 1 for t in times)
    grid = torch.linspace(1.0, 0.0, config.steps + 1, dtype=torch.float64).tolist()[:-1]
    per_step = [2 if config.sampler == "heun" and i < config.steps - 1 else 1 for i in range(config.steps)]
    return sum(n * (2 if guidance.active(t) else 1) for n, t in zip(per_step, grid))


# --------------------------------------------------------------------------------------------------
# A whole job: ranks, resumable chunks, the ADM npz
# --------------------------------------------------------------------------------------------------

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""``decode(latents float64 [B, C, h, w]) -> uint8 images [B, 3, H, W]`` (denormalisation included)."""

_CHUNK_NAME = re.compile(r"(\d{8})-(\d{8})\.npz")
SETTINGS_FILE = "settings.json"


@dataclass
class SampleJob:
    """Everything that fixes the content of a samples file (compared on resume)."""

    num_samples: int
    num_classes: int
    latent_shape: tuple[int, ...]
    sampling: SamplingConfig
    chunk_size: int = 1000
    source: dict[str, Any] | None = None  # where the model and decoder came from (paths, fingerprints)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        data["sampling"] = self.sampling.to_json()
        return data


def parts_dir(out: str | Path) -> Path:
    """The folder of per-chunk files next to ``out`` (``samples.npz`` -> ``samples.npz.parts``)."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def chunk_ranges(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of the chunks (the last one may be shorter)."""
    return [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]


def _chunk_path(folder: Path, start: int, end: int) -> Path:
    return folder / f"{start:08d}-{end:08d}.npz"


def finished_chunks(folder: Path) -> set[tuple[int, int]]:
    """The ranges whose chunk file is complete (written under a temporary name, then renamed)."""
    if not folder.is_dir():
        return set()
    done = set()
    for path in folder.iterdir():
        match = _CHUNK_NAME.fullmatch(path.name)
        if match:
            done.add((int(match.group(1)), int(match.group(2))))
    return done


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_settings(folder: Path, job: SampleJob, is_main: bool) -> None:
    """Rank 0 records the job's settings; every rank refuses to resume a folder written with other settings."""
    from sendvae import distributed

    settings = folder / SETTINGS_FILE
    wanted = job.to_json()
    if is_main and not settings.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{SETTINGS_FILE}"
        tmp.write_text(json.dumps(wanted, indent=2))
        os.replace(tmp, settings)
    distributed.barrier()
    found = json.loads(settings.read_text())
    if found != wanted:
        diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        raise UserError(
            f"{folder} holds an unfinished sampling job with other settings ({', '.join(diff)} differ: "
            f"{ {k: found.get(k) for k in diff} } there vs { {k: wanted.get(k) for k in diff} } now); "
            f"rerun with the same settings to resume it, or delete the folder to start over"
        )


def _write_pngs(png_dir: Path, indices: Sequence[int], images_hwc: np.ndarray) -> None:
    from PIL import Image

    for index, image in zip(indices, images_hwc):
        path = png_dir / f"{index:06d}.png"
        tmp = png_dir / f".tmp-{index:06d}.png"
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def sample_to_npz(
    model: VelocityModel,
    decode: Decoder,
    job: SampleJob,
    out: str | Path,
    *,
    null_label: int,
    batch_size: int = 64,
    png_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    rank: int = 0,
    world: int = 1,
    keep_parts: bool = False,
    guide_model: VelocityModel | None = None,
) -> Path | None:
    """Draw ``job.num_samples`` samples over ``world`` ranks and write the ADM npz ``out`` (rank 0); resumable.

    The samples are cut into fixed chunks of ``job.chunk_size`` indices; rank r takes every
    ``world``-th unfinished chunk, samples it in batches of ``batch_size``, decodes it and writes
    ``OUT.parts/<start>-<end>.npz`` atomically (and the PNGs ``<index:06d>.png`` first, if asked).
    A rerun skips the chunks already written. When all are done, rank 0 streams them into ``out``
    (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` int64 labels, ``metadata``: :func:`sample_metadata` as a
    JSON string), writes the same metadata to ``OUT.json`` and removes the parts folder (unless
    ``keep_parts``). ``guide_model`` is the AutoGuidance guide. Returns ``out`` on rank 0, None elsewhere.
    """
    from sendvae.npz import NpzWriter
    from sendvae.locking import PidLock
    from sendvae import distributed

    out = Path(out)
    folder = parts_dir(out)
    lock = PidLock(folder / ".lock", f"samples file {out}")
    error = None
    if rank == 0:  # rank 0 holds the lock; every rank stops when it cannot
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(str(error))
    try:
        _check_settings(folder, job, rank == 0)
        done = finished_chunks(folder)
        distributed.barrier()  # every rank has listed the finished chunks before anyone writes a new one
        todo = [r for r in chunk_ranges(job.num_samples, job.chunk_size) if r not in done]
        mine = todo[rank::world]
        if png_dir is not None:
            png_dir = Path(png_dir)
            png_dir.mkdir(parents=True, exist_ok=True)
        if done:
            log.info("resuming %s: %d of %d chunks already written", folder, len(done), len(done) + len(todo))

        labels = sample_labels(job.num_samples, job.num_classes, job.sampling.seed, job.sampling.labels)  # type: ignore[arg-type]
        progress = tqdm(
            total=sum(e - s for s, e in mine),
            unit="img",
            desc=f"sampling (rank {rank}/{world})",
            disable=not bars_enabled(rank == 0),
            dynamic_ncols=True,
        )
        for start, end in mine:
            images, chunk_labels = [], []
            for b in range(start, end, batch_size):
                indices = list(range(b, min(b + batch_size, end)))
                y = labels[indices]
                latents = generate_latents(
                    model, indices, y, job.latent_shape, job.sampling, null_label, device, dtype, guide_model
                )
                with torch.inference_mode():
                    pixels = decode(latents)
                if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
                    raise TypeError(f"decode must return uint8 [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
                images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
                chunk_labels.append(y.numpy())
                progress.update(len(indices))
            chunk = np.concatenate(images)
            if png_dir is not None:
                _write_pngs(png_dir, range(start, end), chunk)
            _save_npz_atomic(
                _chunk_path(folder, start, end),
                images=chunk,
                labels=np.concatenate(chunk_labels),
                indices=np.arange(start, end),
            )
        progress.close()
        distributed.barrier()
        if rank != 0:
            return None
        _assemble(folder, out, job, NpzWriter)
        if not keep_parts:
            shutil.rmtree(folder)
        return out
    finally:
        lock.release()


METADATA_KEY = "metadata"
PIXEL_RULE = "uint8 = round(clamp((x + 1) * 127.5, 0, 255)) of the decoded x in [-1, 1] (sendvae.pixels)"


def sample_metadata(job: SampleJob) -> dict[str, Any]:
    """What a samples file records about how it was drawn: the job's settings, NFE and the uint8 rule.

    ``sampling`` holds the sampler, steps, guidance (kind, scale, interval, guide model), label
    sampling and seed; ``nfe_per_sample`` counts model forward passes per sample
    (:func:`evaluations_per_sample`); ``source`` names the model and decoder.
    """
    return {**job.to_json(), "nfe_per_sample": evaluations_per_sample(job.sampling), "pixels": PIXEL_RULE}


def read_sample_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata a ``sendvae sample`` npz carries (None for npz files written otherwise)."""
    from sendvae.npz import NpzArray, npz_keys

    if METADATA_KEY not in npz_keys(path):
        return None
    text = NpzArray(path, METADATA_KEY).read()
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its {METADATA_KEY!r} member is not JSON ({exc})") from None


def _assemble(folder: Path, out: Path, job: SampleJob, npz_writer: Any) -> None:
    """Stream every chunk, in index order, into ``out`` and write the settings beside it as ``OUT.json``."""
    ranges = chunk_ranges(job.num_samples, job.chunk_size)
    missing = [r for r in ranges if not _chunk_path(folder, *r).exists()]
    if missing:
        raise UserError(
            f"{folder} lacks chunks {missing[:3]}... of a finished job; rerun the same command to write them"
        )
    with np.load(_chunk_path(folder, *ranges[0])) as first:
        height, width = first["images"].shape[1:3]
    started = time.time()
    with npz_writer(out) as writer:
        with writer.stream("arr_0", (job.num_samples, height, width, 3), np.uint8) as stream:
            labels = []
            for r in ranges:
                with np.load(_chunk_path(folder, *r)) as chunk:
                    if not np.array_equal(chunk["indices"], np.arange(*r)):
                        raise UserError(f"{_chunk_path(folder, *r)} holds the wrong indices; delete it and rerun")
                    stream.write(chunk["images"])
                    labels.append(chunk["labels"])
        writer.array("arr_1", np.concatenate(labels).astype(np.int64))
        metadata = json.dumps(sample_metadata(job), indent=2)
        writer.array(METADATA_KEY, np.array(metadata))  # a unicode array: readable without pickle
    out.with_name(out.name.removesuffix(".npz") + ".json").write_text(metadata)
    log.info("wrote %s (%d images of %dx%d) in %.1f s", out, job.num_samples, height, width, time.time() - started)


def same_job_unfinished(out: Path, job: SampleJob) -> bool:
    """Whether ``OUT.parts`` still holds this very job (a run killed after writing ``out``, before cleaning up)."""
    try:
        return json.loads((parts_dir(out) / SETTINGS_FILE).read_text()) == job.to_json()
    except (OSError, json.JSONDecodeError):
        return False
