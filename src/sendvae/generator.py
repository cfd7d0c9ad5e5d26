"""The generator of a trained run, and ``sendvae sample``: a SiT, its VAE's decoder and an optional guide.

:func:`load_sit_source` reads a SiT from a ``train-sit`` run (its published EMA weights), one of its
training checkpoints or a released file; :func:`load_generator` pairs it with the VAE its latents
belong to (the one the run records, checked by fingerprint, or ``--vae``) and, for AutoGuidance, a
guide model of the same latent space; :func:`sample_from_run` joins the ``torchrun`` process group and
runs :func:`sendvae.sampling.sample_to_npz`, then draws the per-class picture (:mod:`sendvae.grid`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sendvae.errors import UserError
from sendvae.sampling import Decoder, SampleJob, SamplingConfig, same_job_unfinished, sample_to_npz

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def latent_decoder(vae: Any, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> Decoder:
    """Normalised latents -> ``z * std + mean`` (the VAE's own statistics by default) -> ``vae.decode`` -> uint8."""
    from sendvae.pixels import to_uint8

    vae_dtype = next(vae.parameters()).dtype

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(torch.float32)
        if mean is None or std is None:
            z = vae.denormalize(z)
        else:
            z = z * std.to(z.device).view(1, -1, 1, 1) + mean.to(z.device).view(1, -1, 1, 1)
        return to_uint8(vae.decode(z.to(vae_dtype))).cpu()

    return decode


@dataclass
class LoadedSiT:
    """A SiT read from a run, a training checkpoint or a file, with what a run records about its latents."""

    model: torch.nn.Module
    latent_shape: tuple[int, int, int]
    num_classes: int
    vae_path: str | None = None  # recorded by a train-sit run
    vae_fingerprint: str | None = None
    images_seen: int | None = None  # the progress of a training checkpoint


def load_sit_source(path: str | Path) -> LoadedSiT:
    """A SiT from ``path``: a ``train-sit`` run (``RUN`` or ``RUN/sit``: its published EMA weights), one of
    its training checkpoints (``RUN/checkpoints/ckpt-<images>``: the EMA weights at that point, or the raw
    ones where the run had no EMA) or a SiT / REPA / REPA-E checkpoint file."""
    from sendvae.models.sit_formats import load_sit, load_sit_run
    from sendvae.train.checkpoint import STATE_FILE, load_checkpoint

    path = Path(path)
    if path.is_file():
        model = load_sit(path)
        args = model.args
        return LoadedSiT(model, (args.in_channels, args.input_size, args.input_size), int(args.num_classes))
    images_seen = None
    if (path / STATE_FILE).is_file():
        checkpoint = load_checkpoint(path)
        run = load_sit_run(path.parent.parent)  # RUN/checkpoints/ckpt-N -> RUN (its config and architecture)
        group = "ema.sit" if checkpoint.has("ema.sit") else "model.sit"
        run.model.load_state_dict(checkpoint.tensors(group), strict=True, assign=True)
        images_seen = checkpoint.images_seen
    else:
        run = load_sit_run(path)
    return LoadedSiT(run.model, run.latent_shape, run.num_classes, run.vae_path, run.vae_fingerprint, images_seen)


def load_guide_model(path: str | Path, main: LoadedSiT, main_path: str | Path) -> LoadedSiT:
    """The AutoGuidance guide: a SiT of the same latent space as ``main`` (latent shape, classes, VAE)."""
    guide = load_sit_source(path)
    differences = [
        f"{what} {theirs} vs {ours}"
        for what, theirs, ours in (
            ("latent shape", guide.latent_shape, main.latent_shape),
            ("classes", guide.num_classes, main.num_classes),
        )
        if theirs != ours
    ]
    if guide.vae_fingerprint and main.vae_fingerprint and guide.vae_fingerprint != main.vae_fingerprint:
        differences.append(f"VAE fingerprint {guide.vae_fingerprint[:12]} vs {main.vae_fingerprint[:12]}")
    if differences:
        raise UserError(
            f"--guide-model {path} does not share the latent space of --sit {main_path}: {'; '.join(differences)}"
        )
    return guide


@dataclass
class LoadedGenerator:
    """A SiT ready to sample, the matching decoder, and what the samples file records about them."""

    model: torch.nn.Module
    decode: Decoder
    latent_shape: tuple[int, int, int]
    num_classes: int
    source: dict[str, Any]
    guide_model: torch.nn.Module | None = None


def load_generator(
    sit: str | Path,
    vae: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    guide_model: str | Path | None = None,
) -> LoadedGenerator:
    """Load a SiT (see :func:`load_sit_source`; a checkpoint file needs ``vae``), its decoder and an optional guide.

    A run's VAE must match the fingerprint recorded at training time, unless ``vae`` names another
    one explicitly (then a warning). REPA-E checkpoints carrying their latent statistics decode with
    those; everything else with the VAE's own statistics. ``guide_model`` (AutoGuidance) must share
    the SiT's latent space; it runs in the same ``dtype``.
    """
    from sendvae.models.vae import vae_fingerprint
    from sendvae.models.vae_formats import load_vae

    if dtype not in _DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {list(_DTYPES)}")
    sit_path = Path(sit)
    loaded = load_sit_source(sit_path)
    if loaded.vae_path is None and vae is None:
        raise UserError(f"{sit_path} is a bare SiT checkpoint: pass the VAE its latents belong to with --vae")
    vae_path = Path(vae) if vae is not None else Path(str(loaded.vae_path))
    autoencoder = load_vae(vae_path)
    fingerprint = vae_fingerprint(autoencoder)
    recorded = loaded.vae_fingerprint
    if recorded is not None and fingerprint != recorded:
        message = (
            f"VAE {vae_path} is not the one {sit_path} was trained on "
            f"(fingerprint {fingerprint[:12]} != {recorded[:12]})"
        )
        if vae is None:
            raise UserError(message + "; pass the right one with --vae")
        log.warning("%s; sampling anyway, as --vae asks", message)
    latent_shape = loaded.latent_shape
    if autoencoder.latent_channels != latent_shape[0]:
        raise UserError(f"VAE {vae_path} has {autoencoder.latent_channels} latent channels, the SiT {latent_shape[0]}")
    model = loaded.model
    statistics = model.latent_statistics() if hasattr(model, "latent_statistics") else None
    model = model.to(device=device, dtype=_DTYPES[dtype]).eval()
    autoencoder = autoencoder.to(device).eval()
    decode = latent_decoder(autoencoder, *(statistics if statistics is not None else (None, None)))
    source = {
        "sit": str(sit_path),
        "vae": str(vae_path),
        "vae_fingerprint": fingerprint,
        "dtype": dtype,
        "latent_statistics": "sit" if statistics is not None else "vae",
    }
    if loaded.images_seen is not None:
        source["images_seen"] = loaded.images_seen
    guide = None
    if guide_model is not None:
        guide_loaded = load_guide_model(guide_model, loaded, sit_path)
        guide = guide_loaded.model.to(device=device, dtype=_DTYPES[dtype]).eval()
        source["guide_model"] = {"path": str(guide_model), "images_seen": guide_loaded.images_seen}
    return LoadedGenerator(model, decode, latent_shape, int(loaded.num_classes), source, guide)


def sample_from_run(
    sit: str | Path,
    out: str | Path,
    config: SamplingConfig,
    num_samples: int,
    *,
    vae: str | Path | None = None,
    batch_size: int = 64,
    png_dir: str | Path | None = None,
    grid: tuple[int, int] | None = (8, 10),
    device: str = "auto",
    dtype: str = "float32",
    chunk_size: int = 1000,
    overwrite: bool = False,
    keep_parts: bool = False,
) -> Path | None:
    """``sendvae sample``: join the ``torchrun`` process group (if any), load the generator, :func:`sample_to_npz`.

    ``grid`` (columns, rows) also writes ``OUT.png``, one row per class (:func:`sendvae.grid.write_sample_grid`);
    None skips it. ``config.guide_model`` is loaded as the AutoGuidance guide when ``config.guidance`` asks.
    """
    from sendvae.grid import write_sample_grid
    from sendvae import distributed

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    if num_samples < 1 or batch_size < 1 or chunk_size < 1:
        raise UserError(
            "--num-samples, --batch-size and --chunk-size must be positive, "
            f"got {num_samples}, {batch_size}, {chunk_size}"
        )
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the samples file must end in .npz (ADM format)")
    info = distributed.init_distributed(device, "--device")
    try:
        guide_path = config.guide_model if config.guidance == "autoguidance" else None
        generator = load_generator(sit, vae, info.device, dtype, guide_model=guide_path)
        job = SampleJob(
            num_samples, generator.num_classes, generator.latent_shape, config, chunk_size, generator.source
        )
        if out.exists() and not overwrite and not same_job_unfinished(out, job):
            raise UserError(f"{out} exists; delete it or pass --overwrite")
        log.info(
            "sampling %d images (%s, %d steps, %s %.3g on t in %s, %s labels, seed %d) on %d process(es)",
            num_samples,
            config.sampler,
            config.steps,
            config.guidance,
            config.cfg_scale,
            list(config.guidance_interval),
            config.labels,
            config.seed,
            info.world,
        )
        written = sample_to_npz(
            generator.model,
            generator.decode,
            job,
            out,
            null_label=generator.num_classes,
            batch_size=batch_size,
            png_dir=png_dir,
            device=info.device,
            rank=info.rank,
            world=info.world,
            keep_parts=keep_parts,
            guide_model=generator.guide_model,
        )
        if written is not None and grid is not None:
            write_sample_grid(written, grid_path(written), *grid)
        return written
    finally:
        distributed.shutdown(info)


def grid_path(samples: str | Path) -> Path:
    """Where ``sendvae sample`` writes the picture of a samples file: ``OUT.npz`` -> ``OUT.png``."""
    samples = Path(samples)
    return samples.with_name(samples.name.removesuffix(".npz") + ".png")
