"""The demo's stage-1 steps: the data, the base VAE and its fine-tunes (one per alignment variant).

The stage-1 method settings come from the presets ``configs/shapes/{base,none,vf,sendvae,
sendvae_nonoise}.yaml``; the demo overrides only the data, budget, seeds and logging, so it runs the
same code path as ``sendvae train-vae``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sendvae.config import load_config
from sendvae.demo.config import VARIANT_PRESETS, DemoConfig
from sendvae.errors import UserError

VARIANT_LABELS = {
    "base": "base VAE (no fine-tune)",
    "none": "fine-tune, no alignment",
    "vf": "VA-VAE VF loss (linear)",
    "sendvae": "Send-VAE (mapper + noise)",
    "sendvae-nonoise": "Send-VAE without noise",
}


def configs_root() -> Path:
    """``configs/`` of this checkout (the presets live beside ``src/``)."""
    return Path(__file__).resolve().parents[3] / "configs"


def preset_path(cfg: DemoConfig, name: str) -> Path:
    """The stage preset ``name``.yaml in the demo's presets folder (``configs/shapes`` unless ``presets`` is set)."""
    folder = Path(cfg.presets) if cfg.presets else configs_root() / "shapes"
    if not folder.is_dir():
        raise UserError(f"presets folder {folder} does not exist (set presets=FOLDER with base.yaml, none.yaml, vf.yaml, "
                        "sendvae.yaml and sit_tiny.yaml)")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"preset {path} is missing; the demo reads the stage presets from {path.parent}")
    return path


def vae_preset(cfg: DemoConfig) -> str:
    """The VAE architecture: tiny-f4c4 at 32 px, tiny-f8c4 at 64 px (both give an 8x8 latent)."""
    return cfg.vae_preset or ("tiny-f4c4" if cfg.resolution <= 32 else "tiny-f8c4")


def latent_grid(cfg: DemoConfig) -> int:
    """Latent tokens per side (8 for both demo VAEs)."""
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


def check_finished(summary: dict[str, Any], folder: Path) -> None:
    """Stop the demo (resumably) when the training run in ``folder`` was interrupted."""
    if summary.get("status") != "finished":
        raise KeyboardInterrupt(f"training in {folder} was interrupted; run the demo again to resume it")


def render_data(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    """Step ``data``: the train and test stores of the probe study (full shapes distribution, test drawn with
    another seed) and, with generation on, those of the generation study (``cfg.gen_data`` variant)."""
    from sendvae.data.shapes import format_spec
    from sendvae.data.store import prepare_store

    train_seed, test_seed = data_seeds(cfg.seed)
    train = prepare_store(format_spec(cfg.n_train, train_seed), folder / "train", cfg.resolution)
    test = prepare_store(format_spec(cfg.n_test, test_seed), folder / "test", cfg.resolution)
    result = {"train": str(folder / "train"), "test": str(folder / "test"), "train_hash": train["content_hash"],
              "test_hash": test["content_hash"], "train_seed": train_seed, "test_seed": test_seed}
    if cfg.generation:
        prepare_store(format_spec(cfg.sit_images, train_seed, cfg.gen_data), folder / "gen-train", cfg.resolution)
        prepare_store(format_spec(cfg.gen_test, test_seed, cfg.gen_data), folder / "gen-test", cfg.resolution)
        result.update(gen_train=str(folder / "gen-train"), gen_test=str(folder / "gen-test"))
    return result


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
    summary = train_vae(load_config(TrainVAEConfig, preset_path(cfg, "base"), overrides), folder)
    check_finished(summary, folder)
    return {"vae": str(folder / "vae"), "seconds": summary["seconds"], "logs": summary["logs"]}


def finetune_vae(cfg: DemoConfig, out: Path, folder: Path, variant: str, seed_index: int) -> dict[str, Any]:
    """Step ``vae-<variant>``: fine-tune the base VAE with one alignment variant and the common budget."""
    from sendvae.train.vae import TrainVAEConfig, train_vae

    preset = preset_path(cfg, VARIANT_PRESETS[variant])
    overrides = _stage1_overrides(cfg, out, cfg.finetune_steps, cfg.finetune_lr, cfg.seed * 100 + 1 + seed_index)
    overrides += [f"model.init={out / 'vae-base' / 'vae'}", f"alignment.weight={cfg.align_weight}",
                  f"teacher.cache={out / 'teacher-tokens'}"]  # the aligned fine-tunes share one data order
    train_cfg = load_config(TrainVAEConfig, preset, overrides)
    expected = variant.split("-")[0]
    wrong_noise = expected == "sendvae" and train_cfg.alignment.noise != (variant == "sendvae")
    if train_cfg.alignment.kind != expected or wrong_noise:
        raise UserError(f"preset {preset} sets alignment.kind={train_cfg.alignment.kind} "
                        f"noise={train_cfg.alignment.noise}, which is not the {variant} variant")
    summary = train_vae(train_cfg, folder)
    check_finished(summary, folder)
    return {"vae": str(folder / "vae"), "variant": variant, "seed_index": seed_index,
            "seconds": summary["seconds"], "logs": summary["logs"]}
