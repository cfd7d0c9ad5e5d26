"""``sendvae demo``: the embedded default, a miniature Send-VAE study that runs on a laptop CPU.

It runs the whole pipeline of DESIGN.md section 1 on the procedural shapes dataset with the offline
EfficientNet-Lite0 teacher. :func:`run_demo` builds the plan of steps and runs it
(:mod:`sendvae.demo.plan`); each step lives in the module of its part of the study:

=====================  ==========================================================================
step (OUT/...)         what it does (module)
=====================  ==========================================================================
``data/``              renders the probe study's shapes train / test stores (test: another seed) and
                       the generation study's ``shapes-gen`` stores (:mod:`~sendvae.demo.vaes`)
``vae-base/``          trains the base VAE (``tiny-f4c4``: 32 px -> 8x8x4; ``tiny-f8c4`` at 64 px)
``vae-<variant>/``     fine-tunes it with the same budget per variant: ``none``, ``vf`` (VA-VAE's linear VF
                       loss), ``sendvae`` (noise + mapper) and, in ``--full``, ``sendvae-nonoise``
``probe/``             linear probes of the 49 attributes on the flattened posterior mean, with raw
                       pixels, a random-init VAE (and the teacher) as references (:mod:`~sendvae.demo.probes`)
``classifier/``        the independent evaluation CNN on the real train images (:mod:`~sendvae.demo.evaluation`)
``recon/``             PSNR, SSIM (LPIPS when the VGG weights are present) and FD(recon, real)
``gen-classifier/``    the evaluation CNN of the generation study, on real ``shapes-gen`` images
``latents-<vae>/``     latent cache of the generation data and the VAE's reconstruction ceiling
                       (:mod:`~sendvae.demo.generation`)
``sit-<vae>[...]/``    SiT (and the LightningDiT-style recipe row), checkpoints sampled along training
                       with and without CFG: class consistency and FD curves
``report/``            ``report.md`` + ``index.html``, plots, ``summary.json`` (:mod:`~sendvae.demo.report`,
                       findings from :mod:`~sendvae.demo.findings`)
=====================  ==========================================================================

Every step marks its folder complete with ``done.json``; a rerun with the same settings skips complete
steps (training runs also resume from their checkpoints). Everything is seeded from ``seed``, so a run
is deterministic for a seed on a given machine and thread count. Scales (:func:`sendvae.demo.config.demo_config`):
``smoke`` (CI, about a minute), ``default`` (about 15 minutes on 2 CPU cores) and ``full`` (about 90
minutes: more data and steps, a second fine-tune and SiT seed, the no-noise ablation, the recipe row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sendvae.config import validate
from sendvae.demo.config import DemoConfig, demo_config
from sendvae.demo.evaluation import GEN_CLASSIFIER_WIDTH, evaluate_reconstructions, train_classifier
from sendvae.demo.generation import encode_generation_data, sit_preset, sit_runs, train_generator
from sendvae.demo.plan import Plan, Step, check_out, load_average, machine, read_done, torch_threads
from sendvae.demo.probes import run_probes
from sendvae.demo.report import write_report
from sendvae.demo.vaes import finetune_vae, render_data, run_names, train_base_vae
from sendvae.errors import UserError
from sendvae.hardware import resolve_precision

log = logging.getLogger(__name__)

_ESTIMATE = {  # seconds per image (or per fit) for the ETA only: fitted to the step times of the default demo in
    # fp32 on 2 idle AMD EPYC cores at 32 px (README, "Performance"); "teacher" is amortised by the token cache
    "render": 1 / 6000, "vae": 1 / 34, "teacher": 1 / 200, "mapper": 0.1 / 64, "encode": 1 / 350,
    "probe_fit": 14.0, "classifier": 1.4e-2, "features": 1e-3, "recon": 1.2e-2, "overhead": 4.0,
    "sit/2": 0.075 / 32, "sit/1": 0.25 / 32, "sample/2": 0.2 / 300, "sample/1": 0.8 / 300,
}


def _estimates(cfg: DemoConfig) -> dict[str, float]:
    """Rough seconds per step (for the ETA shown while the demo runs; the bar re-times itself as it goes)."""
    e = _ESTIMATE
    px = (cfg.resolution / 32) ** 2
    images = cfg.batch_size
    est = {"data": (cfg.n_train + cfg.n_test + cfg.sit_images + cfg.gen_test) * e["render"] * px,
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
    est["gen-classifier"] = (cfg.gen_classifier_steps * cfg.classifier_batch * e["classifier"] / 4
                             + cfg.gen_test * e["features"]) * px
    for vae in dict.fromkeys(r.vae for r in sit_runs(cfg)):
        est[f"latents-{vae}"] = (2 * cfg.sit_images * e["encode"] + cfg.num_samples * e["recon"]) * px + e["overhead"]
    for run in sit_runs(cfg):
        patch = "1" if sit_preset(cfg, run.recipe).endswith("/1") else "2"
        sampling = cfg.sit_points * 3 * cfg.num_samples * cfg.sample_steps * e[f"sample/{patch}"]
        est[run.name] = cfg.sit_steps * cfg.sit_batch_size * e[f"sit/{patch}"] + sampling + e["overhead"]
    return est


def _steps(cfg: DemoConfig, out: Path) -> list[Step]:
    """The plan: every step of the study in order, with its folder, title, ETA estimate and work."""
    est = _estimates(cfg)
    vaes = {"base": str(out / "vae-base" / "vae")}
    vaes.update({name.removeprefix("vae-"): str(out / name / "vae") for name, _, _ in run_names(cfg)})

    def data() -> dict[str, Any]:
        return read_done(out / "data") or {}

    steps = [
        Step("data", f"render {cfg.n_train} + {cfg.n_test} shapes images at {cfg.resolution} px", est["data"],
             lambda f: render_data(cfg, f)),
        Step("vae-base", f"train the base VAE ({cfg.base_steps} steps)", est["vae-base"],
             lambda f: train_base_vae(cfg, out, f)),
    ]
    for name, variant, k in run_names(cfg):
        steps.append(Step(name, f"fine-tune '{variant}'{f' seed {k}' if k else ''} ({cfg.finetune_steps} steps)",
                          est[name], lambda f, v=variant, k=k: finetune_vae(cfg, out, f, v, k)))
    steps += [
        Step("probe", f"linear probes of {len(vaes)} VAEs + {len(cfg.probe_references)} references", est["probe"],
             lambda f: run_probes(cfg, data(), vaes, f)),
        Step("classifier", f"train the evaluation classifier ({cfg.classifier_steps} steps)", est["classifier"],
             lambda f: train_classifier(cfg, data()["train"], data()["test"], f, cfg.classifier_steps)),
        Step("recon", "reconstruction metrics on the test set", est["recon"],
             lambda f: evaluate_reconstructions(cfg, data(), vaes, f)),
    ]
    if cfg.generation:
        steps.append(Step("gen-classifier", f"train the generation classifier on '{cfg.gen_data}' images "
                                            f"({cfg.gen_classifier_steps} steps)", est["gen-classifier"],
                          lambda f: train_classifier(cfg, data()["gen_train"], data()["gen_test"], f,
                                                     cfg.gen_classifier_steps, GEN_CLASSIFIER_WIDTH)))
        for vae in dict.fromkeys(r.vae for r in sit_runs(cfg)):
            steps.append(Step(f"latents-{vae}", f"encode the generation data with '{vae}', reconstruction ceiling",
                              est[f"latents-{vae}"], lambda f, v=vae: encode_generation_data(cfg, out, v, f)))
        for run in sit_runs(cfg):
            steps.append(Step(run.name, f"{sit_preset(cfg, run.recipe)} on '{run.vae}' latents, seed {run.seed} "
                                        f"({cfg.sit_steps} steps), sampled at {cfg.sit_points} checkpoints",
                              est[run.name], lambda f, r=run: train_generator(cfg, out, r, f)))
    return steps


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

    ``smoke`` is the smallest scale (CI), ``full`` the long one; ``overrides`` are ``key=value`` changes
    to :class:`DemoConfig`; ``config`` replaces all of these. The summary (also ``out/report/summary.json``)
    holds one row of metrics per VAE, the probe rows, the generation study (ceilings, curves, fixed-budget
    rows), the markdown table and the run's timing and machine.
    """
    if smoke and full:
        raise UserError("choose one of --smoke and --full")
    cfg = config or demo_config("smoke" if smoke else "full" if full else "default", seed, resolution, overrides)
    validate(cfg)
    choice = resolve_precision(cfg.precision, "cpu", "precision")
    log.info("%s", choice)
    cfg = replace(cfg, precision=choice.precision)  # every step and the recorded settings use the decision
    out = Path(out)
    check_out(out, cfg)
    started, load_before = time.time(), load_average()
    with torch_threads(cfg.threads):
        plan = Plan(out, _steps(cfg, out), progress)
        results = plan.run()
    timing = {"seconds": time.time() - started, "steps": plan.timings, "load_before": load_before,
              "load_after": load_average(), "machine": machine(cfg)}
    return write_report(cfg, out, results, timing)
