"""``sendvae demo``: the embedded default, a miniature Send-VAE study that runs on a laptop CPU.

It runs the whole pipeline of DESIGN.md section 1 on the procedural shapes dataset with the offline
EfficientNet-Lite0 teacher, at the scale that ``shared/PILOT.md`` measured on 2 CPU cores:

=================  ===============================================================================
step (OUT/...)     what it does
=================  ===============================================================================
``data/``          renders the shapes train set (seed ``s``) and a held-out test set drawn with
                   another seed into uint8 stores (:func:`sendvae.data.store.prepare_store`)
``vae-base/``      trains the base VAE (``tiny-f4c4``: 32 px -> 8x8x4; ``tiny-f8c4`` at 64 px, so
                   the latent grid stays 8x8) with :func:`sendvae.train.vae.train_vae`
``vae-<variant>/`` fine-tunes it with the same budget per variant: ``none`` (plain fine-tune),
                   ``vf`` (VA-VAE's linear VF loss), ``sendvae`` (noise injection Eq. 1 + mapper +
                   Eq. 2) and, in ``--full``, ``sendvae-nonoise``; teacher tokens on the latent grid
``probe/``         linear probes of the 49 binary shapes attributes on the flattened posterior mean
                   (:mod:`sendvae.eval.probe`: macro-F1 and per-factor accuracy), with raw pixels,
                   a random-init VAE (and, in ``--full``, the teacher) as reference rows
``classifier/``    the independent evaluation CNN, trained on the real train images
                   (:mod:`sendvae.eval.shapes_classifier`; not the alignment teacher)
``recon/``         PSNR, SSIM (LPIPS when the VGG weights are present) and the Frechet distance
                   FD(recon, real) in the classifier's feature space, on the test set
``sit-<variant>/`` latent cache, SiT + REPA (:mod:`sendvae.train.sit`), class-balanced samples
                   with and without classifier-free guidance (:mod:`sendvae.sampling`),
                   FD(gen, real) in the same feature space and class consistency
``report/``        ``report.md`` + ``index.html`` (:class:`sendvae.eval.report.Report`), plots,
                   ``summary.json``
=================  ===============================================================================

Every step writes into its own folder and marks it complete with ``done.json``; a rerun with the
same settings skips complete steps (training runs also resume from their checkpoints), so an
interrupted demo goes on where it stopped. ``OUT/demo_config.yaml`` records the settings; a rerun
with other settings into the same folder is refused. Everything is seeded from ``seed``, so a run is
deterministic for a seed on a given machine and thread count.

Scales (:func:`demo_config`): ``smoke`` (CI, about a minute), ``default`` (<= 10 minutes on 2 CPU
cores; generation is a labelled smoke run) and ``full`` (about an hour: 20k images, batch 64 and the
pilot's 1,500 base steps, 400 fine-tune steps, a second fine-tune seed, the no-noise ablation and SiTs
trained 2,000 steps to aim at recognisable shapes). The default keeps the pilot's 300 fine-tune
*steps* but at batch 32, with 500 base steps (the base loss flattens after about 500 steps at batch
32): unlike the pilot, the teacher runs on every batch (``train_vae`` has no teacher-token cache) and
the evaluation CNN is wider, so the pilot's batch-64 schedule would not fit in 10 minutes.

The stage-1 method settings come from the presets ``configs/shapes/{base,none,vf,sendvae,
sendvae_nonoise}.yaml`` and stage 2 from ``configs/shapes/sit_tiny.yaml``; the demo overrides only the
data, budget, seeds and logging (and the SiT's patch size, REPA source and projector width), so it runs
the same code path as ``sendvae train-vae`` / ``train-sit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from sendvae.config import load_config, to_dict, validate
from sendvae.demo.config import ALIGNED, SCALES, VARIANT_PRESETS, DemoConfig, demo_config
from sendvae.errors import UserError
from sendvae.hardware import describe_cpu, resolve_precision
from sendvae.progress import bars_enabled

log = logging.getLogger(__name__)

DONE = "done.json"
CONFIG_FILE = "demo_config.yaml"
VARIANT_LABELS = {
    "base": "base VAE (no fine-tune)",
    "none": "fine-tune, no alignment",
    "vf": "VA-VAE VF loss (linear)",
    "sendvae": "Send-VAE (mapper + noise)",
    "sendvae-nonoise": "Send-VAE without noise",
}


# ----------------------------------------------------------------------------------------------
# Steps: folders, completion markers, progress with an ETA
# ----------------------------------------------------------------------------------------------


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_done(folder: Path) -> dict[str, Any] | None:
    """The result recorded in ``folder/done.json``, or None when the step is not complete."""
    path = folder / DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["result"]
    except (json.JSONDecodeError, KeyError):
        return None


@dataclass
class _Step:
    name: str  # the folder under OUT
    title: str
    estimate: float  # seconds on the pilot machine (2 cores), only for the ETA
    run: Callable[[Path], dict[str, Any]]


class _Plan:
    """Runs steps in order, skipping complete ones; an outer progress bar over estimated seconds gives the ETA."""

    def __init__(self, out: Path, steps: list[_Step], progress: bool) -> None:
        self.out, self.steps, self.progress = out, steps, progress
        self.results: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}

    def run(self) -> dict[str, dict[str, Any]]:
        total = sum(s.estimate for s in self.steps)
        fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"
        with tqdm(total=total, desc="demo", bar_format=fmt, disable=not (self.progress and bars_enabled()), position=0,
                  dynamic_ncols=True) as bar:
            started = time.time()
            done_work = 0.0
            for i, step in enumerate(self.steps, 1):
                folder = self.out / step.name
                result = read_done(folder)
                if result is not None:
                    log.info("[%d/%d] %s: complete in %s, skipped", i, len(self.steps), step.title, folder)
                else:
                    elapsed = time.time() - started
                    rate = done_work / elapsed if done_work > 0 and elapsed > 1 else 1.0
                    left = sum(s.estimate for s in self.steps[i - 1:]) / max(rate, 1e-6)
                    log.info("[%d/%d] %s (about %s; demo ETA %s)", i, len(self.steps), step.title,
                             _minutes(step.estimate / max(rate, 1e-6)), _minutes(left))
                    folder.mkdir(parents=True, exist_ok=True)
                    t0 = time.time()
                    result = step.run(folder)
                    self.timings[step.name] = time.time() - t0
                    _atomic_json(folder / DONE, {"step": step.name, "seconds": self.timings[step.name], "result": result})
                    done_work += step.estimate
                self.results[step.name] = result
                bar.update(step.estimate)
        return self.results


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_out(out: Path, cfg: DemoConfig) -> None:
    """Record the settings in OUT; refuse to mix runs with different settings in one folder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "threads")
        if changed:
            raise UserError(
                f"{out} holds a demo run with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed)}); "
                "resume it with the same options, or choose another --out"
            )
    path.write_text(yaml.safe_dump(new, sort_keys=False))


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------


def configs_root() -> Path:
    """``configs/`` of this checkout (the presets live beside ``src/``)."""
    return Path(__file__).resolve().parents[3] / "configs"


def _presets_dir(cfg: DemoConfig) -> Path:
    folder = Path(cfg.presets) if cfg.presets else configs_root() / "shapes"
    if not folder.is_dir():
        raise UserError(f"presets folder {folder} does not exist (set presets=FOLDER with base.yaml, none.yaml, vf.yaml, "
                        "sendvae.yaml and sit_tiny.yaml)")
    return folder


def _preset(cfg: DemoConfig, name: str) -> Path:
    path = _presets_dir(cfg) / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"preset {path} is missing; the demo reads the stage presets from {path.parent}")
    return path


def vae_preset(cfg: DemoConfig) -> str:
    """The VAE architecture: tiny-f4c4 at 32 px, tiny-f8c4 at 64 px (both give an 8x8 latent)."""
    return cfg.vae_preset or ("tiny-f4c4" if cfg.resolution <= 32 else "tiny-f8c4")


def latent_grid(cfg: DemoConfig) -> int:
    from sendvae.models.vae import VAE_PRESETS

    return cfg.resolution // VAE_PRESETS[vae_preset(cfg)].downsample_factor


def data_seeds(seed: int) -> tuple[int, int]:
    """(train, test) data seeds: the test set is drawn with a different seed from the train set."""
    return 2 * seed, 2 * seed + 1


def run_names(cfg: DemoConfig) -> list[tuple[str, str, int]]:
    """(run folder, variant, fine-tune seed index) of every fine-tune."""
    runs = []
    for k in range(cfg.finetune_seeds):
        for variant in cfg.variants:
            runs.append((f"vae-{variant}" + (f"-s{k}" if k else ""), variant, k))
    return runs


def _stage1_overrides(cfg: DemoConfig, out: Path, steps: int, lr: float, seed: int) -> list[str]:
    log_every = cfg.log_every_steps * cfg.batch_size
    return [
        f"data.source={out / 'data' / 'train'}", f"data.resolution={cfg.resolution}",
        f"teacher.name={cfg.teacher}", f"teacher.grid={latent_grid(cfg)}",
        f"optim.lr={lr}", f"train.total_images={steps * cfg.batch_size}", f"train.batch_size={cfg.batch_size}",
        f"train.seed={seed}", f"train.precision={cfg.precision}", "train.num_workers=0", "train.device=cpu",
        "train.ema=false",  # short runs: the published VAE is the trained one (an EMA would still hold the start)
        f"train.log_every={log_every}", f"train.checkpoint_every={cfg.checkpoint_every_steps * cfg.batch_size}",
        "train.keep_last=1", f"model.stats_images={min(cfg.stats_images, cfg.n_train)}",
    ]


def train_base_vae(cfg: DemoConfig, out: Path, folder: Path) -> dict[str, Any]:
    """Step ``vae-base``: the base VAE from a random init (preset base.yaml)."""
    from sendvae.train.vae import TrainVAEConfig, train_vae

    overrides = _stage1_overrides(cfg, out, cfg.base_steps, cfg.base_lr, cfg.seed)
    overrides += [f"model.init={vae_preset(cfg)}", "alignment.kind=none"]
    summary = train_vae(load_config(TrainVAEConfig, _preset(cfg, "base"), overrides), folder)
    _check_finished(summary, folder)
    return {"vae": str(folder / "vae"), "seconds": summary["seconds"], "logs": summary["logs"]}


def finetune_vae(cfg: DemoConfig, out: Path, folder: Path, variant: str, seed_index: int) -> dict[str, Any]:
    """Step ``vae-<variant>``: fine-tune the base VAE with one alignment variant and the common budget."""
    from sendvae.train.vae import TrainVAEConfig, train_vae

    preset = VARIANT_PRESETS[variant]
    overrides = _stage1_overrides(cfg, out, cfg.finetune_steps, cfg.finetune_lr, cfg.seed * 100 + 1 + seed_index)
    overrides += [f"model.init={out / 'vae-base' / 'vae'}", f"alignment.weight={cfg.align_weight}"]
    train_cfg = load_config(TrainVAEConfig, _preset(cfg, preset), overrides)
    expected = variant.split("-")[0]
    wrong_noise = expected == "sendvae" and train_cfg.alignment.noise != (variant == "sendvae")
    if train_cfg.alignment.kind != expected or wrong_noise:
        raise UserError(f"preset {_preset(cfg, preset)} sets alignment.kind={train_cfg.alignment.kind} "
                        f"noise={train_cfg.alignment.noise}, which is not the {variant} variant")
    summary = train_vae(train_cfg, folder)
    _check_finished(summary, folder)
    return {"vae": str(folder / "vae"), "variant": variant, "seed_index": seed_index,
            "seconds": summary["seconds"], "logs": summary["logs"]}


def _check_finished(summary: dict[str, Any], folder: Path) -> None:
    if summary.get("status") != "finished":
        raise KeyboardInterrupt(f"training in {folder} was interrupted; run the demo again to resume it")


def render_data(cfg: DemoConfig, out: Path, folder: Path) -> dict[str, Any]:
    """Step ``data``: the train and test stores (test drawn with another seed)."""
    from sendvae.data.store import prepare_store

    train_seed, test_seed = data_seeds(cfg.seed)
    train = prepare_store(f"shapes:{cfg.n_train}@{train_seed}", folder / "train", cfg.resolution)
    test = prepare_store(f"shapes:{cfg.n_test}@{test_seed}", folder / "test", cfg.resolution)
    result = {"train": str(folder / "train"), "test": str(folder / "test"), "train_hash": train["content_hash"],
              "test_hash": test["content_hash"], "train_seed": train_seed, "test_seed": test_seed,
              "sit_train": str(folder / "train")}
    if cfg.generation and 0 < cfg.sit_images < cfg.n_train:  # the first sit_images train images (same renders)
        prepare_store(f"shapes:{cfg.sit_images}@{train_seed}", folder / "train-sit", cfg.resolution)
        result["sit_train"] = str(folder / "train-sit")
    return result


# -- probes --------------------------------------------------------------------------------------


def _probe_row(name: str, kind: str, encoder: Any, train: Any, test: Any, cfg: DemoConfig, keys: tuple[str, str],
               cache: Path) -> dict[str, Any]:
    """Features -> (PCA for references) -> linear probe fitted on probe-train -> scores on the test set."""
    from sendvae.data.shapes import attribute_names
    from sendvae.eval.probe import evaluate_probe, factor_groups
    from sendvae.eval.probe_features import extract_encoder_features
    from sendvae.eval.probe_solver import PCA, fit_linear_probe

    start = time.time()
    names = attribute_names()
    feats = [extract_encoder_features(encoder, ds, dataset_key=key, cache_dir=cache, batch_size=250, desc=f"{name} {split}")
             for ds, key, split in ((train, keys[0], "train"), (test, keys[1], "test"))]
    x_train, x_test = feats[0].x, feats[1].x
    if kind == "reference" and cfg.reference_pca_dim and x_train.shape[1] > cfg.reference_pca_dim:
        pca = PCA.fit(x_train, cfg.reference_pca_dim, cfg.seed)
        x_train, x_test = pca(x_train), pca(x_test)
    probe = fit_linear_probe(x_train, feats[0].attributes, max_iter=cfg.probe_max_iter, seed=cfg.seed, names=names,
                             groups=factor_groups(names), progress=False)
    scores = evaluate_probe(probe, x_test, feats[1].attributes)
    return {"name": name, "kind": kind, "feature_dim": int(feats[0].x.shape[1]), "probe_dim": int(x_train.shape[1]),
            "l2": probe.l2, "macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"],
            "mean_factor_accuracy": scores["mean_factor_accuracy"], "factor_accuracy": scores["factor_accuracy"],
            "n_train": int(x_train.shape[0]), "n_test": int(x_test.shape[0]), "seconds": round(time.time() - start, 1)}


def run_probes(cfg: DemoConfig, data: dict[str, Any], vaes: dict[str, str], folder: Path) -> dict[str, Any]:
    """Step ``probe``: every VAE and reference row; each row is saved as it finishes (resumable)."""
    from torch.utils.data import Subset

    from sendvae.data.shapes import attribute_vector
    from sendvae.data.store import ImageStore
    from sendvae.eval.probe import chance_macro_f1
    from sendvae.eval.probe_features import PixelEncoder, TeacherEncoder, VAEEncoder
    from sendvae.models.vae import build_vae
    from sendvae.models.vae_formats import load_vae

    train_store, test_store = ImageStore(data["train"]), ImageStore(data["test"])
    n = min(cfg.probe_train or len(train_store), len(train_store))
    train = Subset(train_store, range(n))
    keys = (f"demo-train|{data['train_hash']}|{n}", f"demo-test|{data['test_hash']}")
    rows_dir = folder / "rows"
    rows_dir.mkdir(exist_ok=True)
    specs: list[tuple[str, str, Callable[[], Any]]] = []
    for name, path in vaes.items():
        specs.append((name, "vae", lambda path=path: VAEEncoder(load_vae(path).eval())))
    for ref in cfg.probe_references:
        if ref == "pixels":
            specs.append(("pixels", "reference", PixelEncoder))
        elif ref == "random-vae":
            def random_vae() -> Any:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    return VAEEncoder(build_vae(vae_preset(cfg), resolution=cfg.resolution).eval())
            specs.append(("random-init VAE", "reference", random_vae))
        else:
            def teacher_encoder() -> Any:
                from sendvae.models.teachers import build_teacher

                return TeacherEncoder(build_teacher(cfg.teacher, grid=latent_grid(cfg)).eval(), cfg.teacher)
            specs.append((f"teacher {cfg.teacher}", "reference", teacher_encoder))
    rows = []
    for name, kind, make in specs:
        path = rows_dir / f"{_slug(name)}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        encoder = AutocastEncoder(make(), cfg.precision == "bf16")
        row = _probe_row(name, kind, encoder, train, test_store, cfg, keys, folder / "features")
        log.info("probe %s: macro-F1 %.4f, mean factor accuracy %.4f (%.0f s)", name, row["macro_f1"],
                 row["mean_factor_accuracy"], row["seconds"])
        _atomic_json(path, row)
        rows.append(row)
    attributes = torch.from_numpy(attribute_vector(test_store.factors))
    return {"rows": rows, "chance_macro_f1": chance_macro_f1(attributes), "n_train": n, "n_test": len(test_store)}


class AutocastEncoder:
    """A probe feature encoder (:class:`sendvae.eval.probe_features.FeatureEncoder`) run under bf16 autocast.

    Evaluation features only need a few significant digits, and bf16 makes the encoders 2-3x faster
    on CPUs with native bf16 (the demo asks only where ``precision`` resolved to bf16); the
    feature-cache key records the precision."""

    def __init__(self, encoder: Any, bf16: bool) -> None:
        self.encoder, self.bf16 = encoder, bf16
        self.key = encoder.key + (":bf16" if bf16 else "")
        self.layout = encoder.layout

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(images, index).float()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# -- the evaluation classifier -------------------------------------------------------------------


class ClassifierFeatures:
    """The evaluation CNN's 256-d penultimate features as a feature extractor (``{"pool": [B, 256]}``, float64).

    ``bf16`` runs the CNN under bf16 autocast (2-3x faster on CPUs with native bf16); real and generated images go
    through the same path, so the Frechet distances compare like with like."""

    name = "clf"

    def __init__(self, model: torch.nn.Module, bf16: bool = False) -> None:
        self.model, self.bf16 = model.eval(), bf16
        self.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return {"pool": self.model.embed(images)}


def load_classifier(folder: Path) -> Any:
    from safetensors.torch import load_file

    from sendvae.data.shapes import FACTOR_SIZES
    from sendvae.eval.shapes_classifier import ShapesClassifier

    model = ShapesClassifier(list(FACTOR_SIZES))
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.eval()


def train_classifier(cfg: DemoConfig, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Step ``classifier``: the independent CNN on the real train images; test accuracy and real feature stats."""
    from safetensors.torch import save_file

    from sendvae.data.shapes import FACTOR_SIZES, FACTORS
    from sendvae.data.store import ImageStore
    from sendvae.eval.feature_metrics import FeatureStats, frechet_distance
    from sendvae.eval.shapes_classifier import factor_accuracy, train_shapes_classifier

    train, test = ImageStore(data["train"]), ImageStore(data["test"])
    model = train_shapes_classifier(
        train.images(0, len(train)), torch.from_numpy(train.factors), list(FACTOR_SIZES), steps=cfg.classifier_steps,
        batch_size=cfg.classifier_batch, seed=cfg.seed, precision=cfg.precision)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "classifier.safetensors"))
    images = test.images(0, len(test))
    accuracy = factor_accuracy(model, images, torch.from_numpy(test.factors))
    features = ClassifierFeatures(model, cfg.precision == "bf16")(images)["pool"].numpy()
    real = FeatureStats.of(features)
    np.savez(folder / "real_stats.npz", mu=real.mu, sigma=real.sigma)
    half = len(features) // 2  # the floor: two disjoint halves of the real test set
    floor = frechet_distance(FeatureStats.of(features[:half]), FeatureStats.of(features[half:2 * half]))
    return {"accuracy": {f: float(a) for f, a in zip(FACTORS, accuracy)}, "fd_real_halves": floor,
            "half_size": half}


def _real_stats(folder: Path) -> Any:
    from sendvae.eval.feature_metrics import FeatureStats

    with np.load(folder / "real_stats.npz") as f:
        return FeatureStats(f["mu"], f["sigma"])


# -- reconstruction ------------------------------------------------------------------------------


def evaluate_reconstructions(cfg: DemoConfig, data: dict[str, Any], vaes: dict[str, str], folder: Path) -> dict[str, Any]:
    """Step ``recon``: PSNR, SSIM, LPIPS (if its weights exist) and FD(recon, real) in classifier space."""
    from sendvae.data.store import ImageStore
    from sendvae.eval.feature_metrics import frechet_distance
    from sendvae.eval.generation import ImageSource, summarize
    from sendvae.eval.reconstruction import evaluate_reconstruction, vae_reconstructor
    from sendvae.losses import PerceptualLoss, default_vgg16_path
    from sendvae.models.vae_formats import load_vae
    from sendvae.pixels import to_model, to_uint8

    extractor = ClassifierFeatures(load_classifier(folder.parent / "classifier"), cfg.precision == "bf16")
    real = _real_stats(folder.parent / "classifier")
    perceptual = PerceptualLoss() if default_vgg16_path().is_file() else None
    if perceptual is None:
        log.info("LPIPS skipped: no VGG16 weights at %s", default_vgg16_path())
    test = ImageStore(data["test"])
    fd_images = test.images(0, min(cfg.fd_images or cfg.num_samples, len(test)))
    shown = fd_images[:8]
    results, grids = {}, {"real": shown.permute(0, 2, 3, 1).numpy()}
    for name, path in vaes.items():
        vae = load_vae(path).eval()
        source = ImageSource(data["test"], num_images=cfg.recon_images or None)
        metrics = evaluate_reconstruction(vae_reconstructor(vae), source, None, perceptual, batch_size=250)
        reconstruct = vae_reconstructor(vae)
        stats = summarize(((reconstruct(x), None) for x in fd_images.split(250)), [extractor], total=len(fd_images),
                          desc=f"{name} recon features")
        results[name] = {"psnr": metrics.psnr, "ssim": metrics.ssim, "lpips": metrics.lpips,
                         "fd_recon": frechet_distance(stats.stats["clf.pool"], real), "fd_images": len(fd_images)}
        with torch.inference_mode():
            grids[name] = to_uint8(vae.decode(vae.encode(to_model(shown)).mean)).permute(0, 2, 3, 1).numpy()
    np.savez(folder / "examples.npz", **{_slug(k): v for k, v in grids.items()})
    return {"metrics": results, "examples": list(grids), "lpips": perceptual is not None}


# -- stage 2 -------------------------------------------------------------------------------------


def run_generation(cfg: DemoConfig, out: Path, variant_run: str, folder: Path) -> dict[str, Any]:
    """Step ``sit-<variant>``: cache latents, train SiT + REPA, sample with and without CFG, evaluate."""
    from sendvae.data.latents import cache_latents
    from sendvae.eval.feature_metrics import frechet_distance
    from sendvae.eval.generation import ImageSource, summarize
    from sendvae.eval.shapes_classifier import class_consistency
    from sendvae.models.sit_formats import load_sit_run
    from sendvae.sampling import SampleJob, SamplingConfig, sample_to_npz
    from sendvae.train.sit import TrainSiTConfig, train_sit

    vae_path = out / variant_run / "vae"
    train_store = read_done(out / "data")["sit_train"]
    cache_latents(vae_path, str(train_store), folder / "latents", batch_size=250, precision=cfg.precision,
                  device="cpu", num_workers=0)
    log_every = max(1, cfg.log_every_steps) * cfg.sit_batch_size
    overrides = [
        f"data.cache={folder / 'latents'}", f"model.preset={cfg.sit_preset}", f"model.projector_dim={cfg.sit_projector_dim}",
        f"repa.weight={cfg.repa_weight}",
        "repa.source=online", f"teacher.name={cfg.teacher}",  # teacher tokens on the SiT token grid
        f"optim.lr={cfg.sit_lr}", f"train.total_images={cfg.sit_steps * cfg.sit_batch_size}",
        f"train.batch_size={cfg.sit_batch_size}", f"train.seed={cfg.seed}", f"train.precision={cfg.precision}",
        "train.num_workers=0", "train.device=cpu", f"train.log_every={log_every}", "train.keep_last=1",
        f"train.checkpoint_every={cfg.checkpoint_every_steps * cfg.sit_batch_size * 5}",
    ]
    summary = train_sit(load_config(TrainSiTConfig, _preset(cfg, "sit_tiny"), overrides), folder / "sit")
    _check_finished(summary, folder / "sit")

    run = load_sit_run(folder / "sit")
    from sendvae.models.vae_formats import load_vae
    from sendvae.pixels import to_uint8

    vae = load_vae(vae_path).eval()
    bf16 = cfg.precision == "bf16"

    def velocity_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return run.model(x, t, y).float()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return to_uint8(vae.decode(vae.denormalize(latents.float())))

    classifier = load_classifier(out / "classifier")
    real = _real_stats(out / "classifier")
    results: dict[str, Any] = {"sit_final_loss": summary["logs"].get("sit/denoise"), "sit_seconds": summary["seconds"]}
    for tag, scale in (("plain", 1.0), ("cfg", cfg.cfg_scale)):
        sampling = SamplingConfig(sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=scale, labels="balanced",
                                  seed=cfg.seed)
        job = SampleJob(cfg.num_samples, run.num_classes, run.latent_shape, sampling, chunk_size=max(cfg.num_samples // 4, 1),
                        source={"sit": str(folder / "sit"), "vae": str(vae_path)})
        npz = folder / f"samples_{tag}.npz"
        if not npz.is_file():
            sample_to_npz(velocity_model, decode, job, npz, null_label=run.model.null_class, batch_size=250,
                          dtype=torch.float32)
        with np.load(npz) as f:
            images, labels = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["arr_1"])
        stats = summarize(ImageSource(str(npz)).batches(250), [ClassifierFeatures(classifier, bf16)], desc=f"{tag} features")
        results[tag] = {
            "cfg_scale": scale,
            "fd_gen": frechet_distance(stats.stats["clf.pool"], real),
            "class_consistency": class_consistency(classifier, images, labels),
        }
    return results


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def summary_rows(cfg: DemoConfig, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of metrics per VAE (base + every fine-tune), joined from the probe, recon and SiT steps."""
    probe = {r["name"]: r for r in results["probe"]["rows"]}
    recon = results["recon"]["metrics"]
    rows = []
    for name in ["base"] + [n.removeprefix("vae-") for n, _, _ in run_names(cfg)]:
        variant = name.rsplit("-s", 1)[0] if name not in VARIANT_PRESETS and name != "base" else name
        p, r = probe[name], recon[name]
        row: dict[str, Any] = {
            "vae": name, "variant": variant, "macro_f1": p["macro_f1"], "mean_factor_accuracy": p["mean_factor_accuracy"],
            "shape_accuracy": p["factor_accuracy"]["shape"], "psnr": r["psnr"], "ssim": r["ssim"], "lpips": r["lpips"],
            "fd_recon": r["fd_recon"],
        }
        gen = results.get(f"sit-{name}")
        if gen is not None:
            row.update(fd_gen=gen["plain"]["fd_gen"], fd_gen_cfg=gen["cfg"]["fd_gen"],
                       fd_gap=gen["plain"]["fd_gen"] - r["fd_recon"], class_consistency=gen["plain"]["class_consistency"],
                       class_consistency_cfg=gen["cfg"]["class_consistency"])
        rows.append(row)
    return rows


SUMMARY_COLUMNS = [  # (key, header)
    ("vae", "VAE"), ("macro_f1", "probe macro-F1"), ("mean_factor_accuracy", "mean factor acc"),
    ("shape_accuracy", "shape acc"), ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("lpips", "LPIPS"),
    ("fd_recon", "FD recon"), ("fd_gen", "FD gen"), ("fd_gap", "gap gen-recon"), ("class_consistency", "class cons."),
    ("fd_gen_cfg", "FD gen CFG"), ("class_consistency_cfg", "class cons. CFG"),
]


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The summary columns that at least one row fills."""
    return [(k, h) for k, h in SUMMARY_COLUMNS if any(r.get(k) is not None for r in rows)]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The variants x metrics table as Markdown (what ``sendvae demo`` prints)."""
    from sendvae.eval.report import format_value

    columns = _columns(rows)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def finite_metrics(summary: dict[str, Any]) -> list[str]:
    """Names of the numeric metrics in a summary that are not finite (empty when all are)."""
    bad = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(path)

    walk({k: summary[k] for k in ("rows", "probe", "classifier", "generation")}, "")
    return bad


def _metrics_curve(path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                steps.append(int(record["step"]))
                values.append(float(record[key]))
    return steps, values


def _plot_losses(cfg: DemoConfig, out: Path, path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [("base VAE: L1 reconstruction", [("base", out / "vae-base", "vae/rec")]),
              ("fine-tunes: L1 reconstruction", [(n.removeprefix("vae-"), out / n, "vae/rec") for n, _, _ in run_names(cfg)]),
              ("fine-tunes: alignment loss", [(n.removeprefix("vae-"), out / n, "vae/align_loss")
                                              for n, v, _ in run_names(cfg) if v != "none"])]
    if cfg.generation:
        panels.append(("SiT: velocity MSE (not comparable across latent spaces)",
                       [(v, out / f"sit-{v}" / "sit", "sit/denoise") for v in cfg.sit_variants]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels):
        for label, run_dir, key in curves:
            steps, values = _metrics_curve(run_dir / "metrics.jsonl", key)
            if steps:
                ax.plot(steps, values, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_probe(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from sendvae.data.shapes import FACTORS

    factors = list(FACTORS)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(11, 4.4))
    for i, row in enumerate(rows):
        values = [row["factor_accuracy"][f] for f in factors]
        ax.bar(np.arange(len(factors)) + (i - (len(rows) - 1) / 2) * width, values, width,
               label=f"{row['name']} (F1 {row['macro_f1']:.3f})", hatch="//" if row["kind"] == "reference" else None)
    chance = [1 / len(v) for v in FACTORS.values()]
    ax.scatter(np.arange(len(factors)), chance, marker="_", s=400, color="k", label="chance", zorder=3)
    ax.set_xticks(np.arange(len(factors)), factors)
    ax.set_ylabel("linear-probe accuracy (test)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_probe_vs_generation(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    gen = [r for r in rows if r.get("class_consistency") is not None]
    if not gen:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for row in gen:
        axes[0].scatter(row["macro_f1"], row["class_consistency"], marker="o", color="C0")
        axes[0].scatter(row["macro_f1"], row["class_consistency_cfg"], marker="^", color="C1")
        axes[0].annotate(row["vae"], (row["macro_f1"], row["class_consistency_cfg"]), fontsize=8)
        axes[1].scatter(row["macro_f1"], row["fd_gap"], color="C2")
        axes[1].annotate(row["vae"], (row["macro_f1"], row["fd_gap"]), fontsize=8)
    axes[0].axhline(1 / 6, color="k", lw=0.8, ls="--")
    axes[0].set_title("class consistency (o no guidance, ^ CFG; dashed: chance)", fontsize=9)
    axes[1].set_title("FD(gen) - FD(recon) in classifier space", fontsize=9)
    for ax in axes:
        ax.set_xlabel("probe macro-F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _sample_grid(npz: Path, path: Path, per_class: int = 8) -> None:
    from sendvae.data.images import save_image_grid
    from sendvae.data.shapes import FACTORS

    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    picked, captions = [], []
    for c, name in enumerate(FACTORS["shape"]):
        idx = np.flatnonzero(labels == c)[:per_class]
        picked += list(idx)
        captions += [[name]] * len(idx)
    save_image_grid(images[picked], captions, path, columns=per_class, min_cell=64)


def _recon_grid(folder: Path, names: list[str], path: Path) -> None:
    from sendvae.data.images import save_image_grid

    with np.load(folder / "examples.npz") as f:
        images = np.concatenate([f[_slug(n)] for n in names])
        per = len(f[_slug(names[0])])
    captions = [[n] for n in names for _ in range(per)]
    save_image_grid(images, captions, path, columns=per, min_cell=64)


def _findings(cfg: DemoConfig, rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """Plain statements computed from this run's numbers (nothing here is hard-coded)."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)

    def mean(variant: str, key: str) -> float | None:
        values = [r[key] for r in by_variant.get(variant, []) if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    text = []
    none_f1 = mean("none", "macro_f1")
    aligned = [v for v in ALIGNED if v in by_variant]
    if none_f1 is not None and aligned:
        parts = ", ".join(f"{v} {mean(v, 'macro_f1'):.3f} ({mean(v, 'macro_f1') - none_f1:+.3f})" for v in aligned)
        text.append(f"Probe: the plain fine-tune reaches macro-F1 {none_f1:.3f}; the aligned variants reach {parts}. "
                    f"Chance (predict every attribute) is {results['probe']['chance_macro_f1']:.3f}.")
    if "vf" in by_variant and "sendvae" in by_variant:
        diff = mean("sendvae", "macro_f1") - mean("vf", "macro_f1")
        leader = "Send-VAE" if diff > 0 else "the linear VF loss"
        pilot = ("like the pilot (2 seeds: VF ahead by about 0.011, seed spread 0.002), this run does not reproduce "
                 "the paper's Send-VAE > VF ordering on linear probes" if diff <= 0 else
                 "the pilot (2 seeds) found the opposite, VF ahead by about 0.011 with a seed spread of 0.002")
        text.append(f"Send-VAE vs VF loss on the probe: {diff:+.3f} macro-F1 (ahead: {leader}; {cfg.finetune_seeds} "
                    f"fine-tune seed(s) per variant); {pilot}.")
    psnr = sorted(((mean(v, "psnr"), v) for v in by_variant if v != "base"), reverse=True)
    text.append("Reconstruction (PSNR, best first): " + ", ".join(f"{v} {p:.2f} dB" for p, v in psnr) + ".")
    if cfg.generation:
        gen = [(r["vae"], r["class_consistency"], r["class_consistency_cfg"], r["fd_gap"]) for r in rows
               if r.get("class_consistency") is not None]
        listing = "; ".join(f"{n}: {c:.3f} without / {g:.3f} with guidance, FD gap {gap:.1f}" for n, c, g, gap in gen)
        if cfg.generation_smoke:
            text.append(f"Generation is a SMOKE RUN ({cfg.sit_steps} SiT steps, {cfg.num_samples} samples): it checks that "
                        f"the pipeline runs end to end and its numbers say nothing about the variants. Class consistency "
                        f"(chance 1/6 = 0.167): {listing}.")
        else:
            baseline = next((c for n, c, _, _ in gen if n == "none"), None)
            verdict = ("" if baseline is None else
                       f" The unaligned baseline is {'well above' if baseline > 0.3 else 'not well above'} chance "
                       f"without guidance ({baseline:.3f}).")
            text.append(f"Generation ({cfg.sit_steps} SiT steps, {cfg.num_samples} samples per setting, one SiT seed): "
                        f"class consistency (chance 0.167): {listing}.{verdict}")
    return text


PILOT_CONTEXT = (
    "For comparison, the pilot (shared/PILOT.md, 2 seeds, 20k images, 600 fine-tune steps) measured macro-F1 0.569 "
    "without alignment, 0.724 with the VF loss and 0.713 with Send-VAE: alignment helps the linear probe a lot, and "
    "the linear VF loss edged out Send-VAE on it, the opposite of the paper's ordering (a linear projection to a "
    "linearly decodable teacher rewards exactly what a linear probe measures). Send-VAE kept about 0.8 dB more PSNR "
    "than VF. Its generation comparison (600 DiT steps) was inconclusive."
)


def write_report(cfg: DemoConfig, out: Path, results: dict[str, dict[str, Any]], timing: dict[str, Any]) -> dict[str, Any]:
    """Write ``OUT/report`` (report.md, index.html, plots, summary.json); return the summary."""
    from sendvae.data.shapes import FACTORS
    from sendvae.eval.report import Report

    folder = out / "report"
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    rows = summary_rows(cfg, results)
    probe_rows = results["probe"]["rows"]
    clf = results["classifier"]
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "rows": rows, "probe": results["probe"], "classifier": clf,
        "generation": {k: v for k, v in results.items() if k.startswith("sit-")}, "timing": timing,
        "table": summary_table(rows),
    }
    scale = {"smoke": "SMOKE scale (CI check, numbers meaningless)", "default": "default scale", "full": "full scale"}[cfg.scale]
    report = Report(f"sendvae demo: a miniature Send-VAE study ({scale})")
    report.paragraph(
        f"Shapes dataset at {cfg.resolution} px: {cfg.n_train} training and {cfg.n_test} held-out test images (another "
        f"seed). VAE {vae_preset(cfg)} ({latent_grid(cfg)}x{latent_grid(cfg)} latent), base {cfg.base_steps} steps, then "
        f"{cfg.finetune_steps} fine-tune steps per variant ({', '.join(cfg.variants)}; {cfg.finetune_seeds} seed(s)), "
        f"batch {cfg.batch_size}, teacher {cfg.teacher} on the latent grid, lambda_align {cfg.align_weight}. Seed {cfg.seed}. "
        "Rows: " + "; ".join(f"{v} = {VARIANT_LABELS[v]}" for v in ["base", *cfg.variants]) + ".")
    machine = timing["machine"]
    report.paragraph(
        f"Wall time of this invocation: {_minutes(timing['seconds'])} (steps already complete were skipped) on "
        f"{machine['cpus']} CPUs with {machine['torch_threads']} torch threads; load average before / after "
        f"{timing['load_before']} / {timing['load_after']} (other processes slow the run down).")
    report.heading("What this run shows")
    for line in _findings(cfg, rows, results):
        report.paragraph(line)
    report.paragraph(PILOT_CONTEXT)
    report.heading("Variants x metrics")
    columns = _columns(rows)
    report.table([h for _, h in columns], [[r.get(k) for k, _ in columns] for r in rows])
    report.paragraph(
        "Probe: a linear probe per attribute on the flattened posterior mean, fitted on the first "
        f"{results['probe']['n_train']} training images, macro-F1 over the 49 binary attributes of the "
        f"{results['probe']['n_test']} test images; factor accuracy = argmax within each factor. FD: Frechet distance "
        f"in the 256-d feature space of the evaluation classifier (trained here on real images, not the teacher) "
        f"between {cfg.num_samples} samples (FD gen) or {min(cfg.fd_images or cfg.num_samples, cfg.n_test)} "
        f"reconstructed test images (FD recon) and all {cfg.n_test} real test images; two halves of the real test set "
        f"are {clf['fd_real_halves']:.2f} apart ({clf['half_size']} images each). "
        f"PSNR / SSIM on the first {min(cfg.recon_images or cfg.n_test, cfg.n_test)} test images. "
        "'gap' = FD(gen) - FD(recon): FD(recon) measures the VAE's own blur, which FD(gen) also contains. Class "
        "consistency = share of samples whose shape the classifier reads as the requested class.")
    report.heading("Linear probes per factor")
    report.image("plots/probe_factors.png", "probe accuracy per factor (hatched: reference rows)")
    factors = list(FACTORS)
    report.table(["row", "kind", "probe dim", "macro-F1", "mean acc"] + factors,
                 [[r["name"], r["kind"], r["probe_dim"], r["macro_f1"], r["mean_factor_accuracy"]]
                  + [r["factor_accuracy"][f] for f in factors] for r in probe_rows])
    report.paragraph("Evaluation classifier, test accuracy per factor: "
                     + ", ".join(f"{f} {a:.3f}" for f, a in clf["accuracy"].items())
                     + ". Rotation is only partly identifiable (PILOT.md), so its ceiling is about 0.7.")
    report.heading("Training curves")
    _plot_losses(cfg, out, folder / "plots" / "losses.png")
    report.image("plots/losses.png", "loss curves from each run's metrics.jsonl")
    _plot_probe(probe_rows, folder / "plots" / "probe_factors.png")
    report.heading("Reconstructions")
    names = ["real"] + [r["vae"] for r in rows]
    _recon_grid(out / "recon", names, folder / "plots" / "reconstructions.png")
    report.image("plots/reconstructions.png", "first test images and their reconstructions (posterior mean)")
    if cfg.generation:
        report.heading("Samples" + (" (SMOKE RUN: too short to show shapes)" if cfg.generation_smoke else ""))
        for variant in cfg.sit_variants:
            for tag, what in (("plain", "no guidance"), ("cfg", f"CFG {cfg.cfg_scale:g}")):
                name = f"samples_{variant}_{tag}.png"
                _sample_grid(out / f"sit-{variant}" / f"samples_{tag}.npz", folder / "plots" / name)
                report.image(f"plots/{name}", f"{variant}: SiT samples, {what}, one row per requested shape")
        if _plot_probe_vs_generation(rows, folder / "plots" / "probe_vs_generation.png"):
            report.heading("Probe vs generation")
            report.image("plots/probe_vs_generation.png", "probe macro-F1 against class consistency and the FD gap")
    report.heading("How to reproduce")
    flags = {"smoke": " --smoke", "default": "", "full": " --full"}[cfg.scale]
    report.code(f"sendvae demo --out {out}{flags} --seed {cfg.seed}" + (f" --resolution {cfg.resolution}" if cfg.resolution != 32 else ""))
    report.paragraph("Settings: " + ", ".join(f"{k}={v}" for k, v in to_dict(cfg).items()))
    report.write(folder)
    _atomic_json(folder / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


_ESTIMATE = {  # seconds per image (or per fit) on a pilot-class machine (2 cores, bf16, 32 px); only for the ETA
    "render": 1 / 2000, "vae": 0.20 / 64, "teacher": 1 / 368, "mapper": 0.05 / 64, "encode": 1 / 2000,
    "probe_fit": 8.0, "classifier": 1.6e-3, "features": 0.6e-3, "recon": 1e-3, "sit": 0.12 / 128,
    "sit_teacher": 1 / 2870, "sample_eval": 1 / 4000, "overhead": 4.0,
}


def _estimates(cfg: DemoConfig) -> dict[str, float]:
    """Rough seconds per step (for the ETA shown while the demo runs; the bar re-times itself as it goes)."""
    e = _ESTIMATE
    px = (cfg.resolution / 32) ** 2
    images = cfg.batch_size
    est = {"data": (cfg.n_train + cfg.n_test + cfg.sit_images) * e["render"] * px,
           "vae-base": cfg.base_steps * images * e["vae"] * px + e["overhead"]}
    for name, variant, _ in run_names(cfg):
        per_image = e["vae"] * px + (0.0 if variant == "none" else e["teacher"]) + (e["mapper"] if "sendvae" in variant else 0)
        est[name] = cfg.finetune_steps * images * per_image + e["overhead"]
    n_probe = min(cfg.probe_train or cfg.n_train, cfg.n_train)
    rows = 1 + len(run_names(cfg))
    fit = 1.0 + e["probe_fit"] * n_probe / 10_000 * cfg.probe_max_iter / 150
    probe = rows * ((n_probe + cfg.n_test) * e["encode"] * px + fit)
    for ref in cfg.probe_references:
        probe += 1.5 * fit + ((n_probe + cfg.n_test) * e["teacher"] if ref == "teacher" else 0)
    est["probe"] = probe
    est["classifier"] = (cfg.classifier_steps * cfg.classifier_batch * e["classifier"] + cfg.n_test * e["features"]) * px
    fd_images = min(cfg.fd_images or cfg.num_samples, cfg.n_test)
    recon_images = min(cfg.recon_images or cfg.n_test, cfg.n_test)
    est["recon"] = rows * (recon_images * e["recon"] + fd_images * (e["features"] + e["recon"])) * px
    if cfg.generation:
        sit_images = cfg.sit_images or cfg.n_train
        for variant in cfg.sit_variants:
            sampling = 2 * cfg.num_samples * (cfg.sample_steps * 1.5 * e["sample_eval"] + (e["recon"] + e["features"]) * px)
            est[f"sit-{variant}"] = (2 * sit_images * e["encode"] * px + e["overhead"]
                                     + cfg.sit_steps * cfg.sit_batch_size * (e["sit"] + e["sit_teacher"]) + sampling)
    return est


def run_demo(
    out: str | Path = "demo_out",
    seed: int = 0,
    full: bool = False,
    resolution: int = 32,
    smoke: bool = False,
    overrides: Sequence[str] = (),
    config: DemoConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the miniature study into ``out`` and write ``out/report``; returns the summary.

    ``smoke`` is the smallest scale (CI), ``full`` the hour-long one; ``overrides`` are
    ``key=value`` changes to :class:`DemoConfig`; ``config`` replaces all of these. The summary
    (also ``out/report/summary.json``) holds one row of metrics per VAE, the probe rows, the
    generation results, the markdown table and the run's timing and machine.
    """
    if smoke and full:
        raise UserError("choose one of --smoke and --full")
    cfg = config or demo_config("smoke" if smoke else "full" if full else "default", seed, resolution, overrides)
    validate(cfg)
    choice = resolve_precision(cfg.precision, "cpu", "precision")
    log.info("%s", choice)
    cfg = replace(cfg, precision=choice.precision)  # every step and the recorded settings use the decision
    out = Path(out)
    _check_out(out, cfg)
    started, load_before = time.time(), _load()
    with _threads(cfg.threads):
        est = _estimates(cfg)
        data_folder = out / "data"
        vaes = {"base": str(out / "vae-base" / "vae")}
        vaes.update({name.removeprefix("vae-"): str(out / name / "vae") for name, _, _ in run_names(cfg)})

        def data() -> dict[str, Any]:
            return read_done(data_folder) or {}

        steps = [
            _Step("data", f"render {cfg.n_train} + {cfg.n_test} shapes images at {cfg.resolution} px", est["data"],
                  lambda f: render_data(cfg, out, f)),
            _Step("vae-base", f"train the base VAE ({cfg.base_steps} steps)", est["vae-base"],
                  lambda f: train_base_vae(cfg, out, f)),
        ]
        for name, variant, k in run_names(cfg):
            steps.append(_Step(name, f"fine-tune '{variant}'{f' seed {k}' if k else ''} ({cfg.finetune_steps} steps)",
                               est[name], lambda f, v=variant, k=k: finetune_vae(cfg, out, f, v, k)))
        steps += [
            _Step("probe", f"linear probes of {len(vaes)} VAEs + {len(cfg.probe_references)} references", est["probe"],
                  lambda f: run_probes(cfg, data(), vaes, f)),
            _Step("classifier", f"train the evaluation classifier ({cfg.classifier_steps} steps)", est["classifier"],
                  lambda f: train_classifier(cfg, data(), f)),
            _Step("recon", "reconstruction metrics on the test set", est["recon"],
                  lambda f: evaluate_reconstructions(cfg, data(), vaes, f)),
        ]
        if cfg.generation:
            for variant in cfg.sit_variants:
                steps.append(_Step(f"sit-{variant}", f"SiT + REPA on '{variant}' latents ({cfg.sit_steps} steps), sample, evaluate",
                                   est[f"sit-{variant}"], lambda f, v=variant: run_generation(cfg, out, f"vae-{v}", f)))
        plan = _Plan(out, steps, progress)
        results = plan.run()
    timing = {"seconds": time.time() - started, "steps": plan.timings, "load_before": load_before, "load_after": _load(),
              "machine": _machine(cfg)}
    return write_report(cfg, out, results, timing)


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _machine(cfg: DemoConfig) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": cfg.threads or torch.get_num_threads(), "torch": torch.__version__,
            "precision": cfg.precision, **describe_cpu()}


__all__ = ["SCALES", "AutocastEncoder", "ClassifierFeatures", "DemoConfig", "configs_root", "demo_config", "finite_metrics",
           "read_done", "run_demo", "summary_table", "write_report"]
