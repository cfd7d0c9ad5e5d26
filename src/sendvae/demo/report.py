"""The demo's report: the variants x metrics table, the generation tables and curves, plots and ``summary.json``.

:func:`write_report` joins the steps' results into ``OUT/report`` (``report.md`` + ``index.html`` through
:class:`sendvae.eval.report.Report`, ``plots/``, ``summary.json``); the findings text comes from
:mod:`sendvae.demo.findings`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sendvae.config import to_dict
from sendvae.demo.config import DemoConfig
from sendvae.demo.findings import PILOT_CONTEXT, findings
from sendvae.demo.generation import GUIDANCE, budget_rows, convergence, sit_runs
from sendvae.demo.plan import atomic_json, minutes, slug
from sendvae.demo.vaes import VARIANT_LABELS, latent_grid, run_names, vae_preset

SUMMARY_COLUMNS = [  # (key, header)
    ("vae", "VAE"), ("macro_f1", "probe macro-F1"), ("mean_factor_accuracy", "mean factor acc"),
    ("shape_accuracy", "shape acc"), ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("lpips", "LPIPS"),
    ("fd_recon", "FD recon"), ("ceiling_class_accuracy", "gen: recon class acc"),
    ("class_consistency", "gen: class cons."), ("class_consistency_cfg", "gen: class cons. CFG"),
    ("ceiling_fd", "gen: FD recon"), ("fd_gen", "gen: FD"), ("fd_gen_cfg", "gen: FD CFG"),
]
BUDGET_COLUMNS = [  # (key, header) of the fixed-budget generation table
    ("generator", "VAE / generator"), ("seeds", "SiT seeds"), ("images_seen", "images seen"),
    ("class_consistency_plain", "class cons."), ("class_consistency_plain_spread", "+-"),
    ("class_consistency_cfg", "class cons. CFG"), ("class_consistency_cfg_spread", "+-"),
    ("ceiling_class_accuracy", "recon class acc (ceiling)"),
    ("fd_plain", "FD"), ("fd_plain_spread", "+-"), ("fd_cfg", "FD CFG"), ("fd_cfg_spread", "+-"),
    ("ceiling_fd", "FD recon (ceiling)"),
]


def generation_results(cfg: DemoConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The generation study's numbers: ceilings per VAE, the SiT runs, their curves and the fixed-budget rows."""
    if not cfg.generation:
        return {}
    ceilings = {v: results[f"latents-{v}"]["ceiling"] for v in dict.fromkeys(r.vae for r in sit_runs(cfg))}
    runs = [results[r.name] for r in sit_runs(cfg)]
    curves = convergence(runs)
    return {"ceilings": ceilings, "runs": runs, "curves": curves, "budget": budget_rows(curves, ceilings),
            "classifier": results["gen-classifier"]}


def summary_rows(cfg: DemoConfig, results: dict[str, dict[str, Any]], generation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row of metrics per VAE (base + every fine-tune), joined from the probe, recon and generation steps
    (generation: the last checkpoint of the REPA SiT, mean over SiT seeds, and the VAE's ceiling)."""
    probe = {r["name"]: r for r in results["probe"]["rows"]}
    recon = results["recon"]["metrics"]
    budget = {r["generator"]: r for r in generation.get("budget", [])}
    rows = []
    for name in ["base"] + [n.removeprefix("vae-") for n, _, _ in run_names(cfg)]:
        variant = name.rsplit("-s", 1)[0] if name not in VARIANT_LABELS else name
        p, r = probe[name], recon[name]
        row: dict[str, Any] = {
            "vae": name, "variant": variant, "macro_f1": p["macro_f1"], "mean_factor_accuracy": p["mean_factor_accuracy"],
            "shape_accuracy": p["factor_accuracy"]["shape"], "psnr": r["psnr"], "ssim": r["ssim"], "lpips": r["lpips"],
            "fd_recon": r["fd_recon"],
        }
        gen = budget.get(name)
        if gen is not None:
            row.update(class_consistency=gen["class_consistency_plain"], class_consistency_cfg=gen["class_consistency_cfg"],
                       fd_gen=gen["fd_plain"], fd_gen_cfg=gen["fd_cfg"], ceiling_fd=gen["ceiling_fd"],
                       ceiling_class_accuracy=gen["ceiling_class_accuracy"])
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The columns that at least one row fills."""
    return [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The variants x metrics table as Markdown (what ``sendvae demo`` prints)."""
    from sendvae.eval.report import format_value

    columns = _columns(rows, SUMMARY_COLUMNS)
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


# -- plots ---------------------------------------------------------------------------------------


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
                       [(r.name.removeprefix("sit-"), out / r.name / "sit", "sit/denoise") for r in sit_runs(cfg)]))
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


def plot_convergence(generation: dict[str, Any], path: Path) -> None:
    """FD and class consistency against images seen, one line per VAE / generator (mean over SiT seeds, band =
    the seeds' range); dotted lines: each VAE's reconstruction ceiling."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("class consistency, no guidance", "class_consistency_plain", "class_consistency"),
              ("class consistency, CFG", "class_consistency_cfg", "class_consistency"),
              ("FD(samples, real), no guidance", "fd_plain", "fd")]
    for i, (name, curve) in enumerate(generation["curves"].items()):
        color = f"C{i}"
        ceiling = generation["ceilings"][name.split("-lightning")[0]]
        for ax, (title, metric, ceiling_key) in zip(axes, panels):
            x = curve["images_seen"]
            ax.plot(x, curve[metric]["mean"], marker="o", color=color, label=f"{name} ({curve['seeds']} seed(s))",
                    ls="--" if "lightning" in name else "-")
            ax.fill_between(x, curve[metric]["low"], curve[metric]["high"], color=color, alpha=0.2)
            if "lightning" not in name:  # a recipe row shares its VAE's ceiling with that VAE's line
                ax.axhline(ceiling[ceiling_key], color=color, ls=":", lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("SiT training images seen")
    for ax in axes[:2]:
        ax.axhline(1 / 6, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1.02)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _recon_grid(folder: Path, names: list[str], path: Path) -> None:
    from sendvae.data.images import save_image_grid

    with np.load(folder / "examples.npz") as f:
        images = np.concatenate([f[slug(n)] for n in names])
        per = len(f[slug(names[0])])
    captions = [[n] for n in names for _ in range(per)]
    save_image_grid(images, captions, path, columns=per, min_cell=64)


# -- the report ----------------------------------------------------------------------------------


def _generation_section(report: Any, cfg: DemoConfig, out: Path, generation: dict[str, Any], plots: Path) -> None:
    from sendvae.data.shapes import get_variant

    clf = generation["classifier"]
    variant = get_variant(cfg.gen_data)
    report.heading("Generation" + (" (SMOKE RUN: too short to show shapes)" if cfg.generation_smoke else ""))
    report.paragraph(
        f"Data: the '{variant.name}' variant of the shapes data ({variant.description}; "
        f"{cfg.sit_images} training and {cfg.gen_test} held-out images, class = shape, 6 classes). The VAEs, trained on "
        f"the full shapes data, encode it; SiT {cfg.sit_preset} ({cfg.sit_posterior} latents, batch {cfg.sit_batch_size}, "
        f"lr {cfg.sit_lr:g}, REPA weight {cfg.repa_weight:g}) trains {cfg.sit_steps} steps per VAE and SiT seed; "
        f"{cfg.sit_points} checkpoints along training are sampled ({cfg.num_samples} class-balanced samples each, "
        f"{cfg.sampler} {cfg.sample_steps} steps, without guidance and with CFG {cfg.cfg_scale:g}; the same labels and "
        "noise at every checkpoint). Metrics in the feature space of a classifier trained on real images of the "
        "variant (test accuracy: " + ", ".join(f"{f} {clf['accuracy'][f]:.3f}" for f in ("shape", "object_hue",
                                                                                       "background")) +
        f"; FD between two halves of its test set {clf['fd_real_halves']:.2f}). Ceiling: the same metrics on the "
        f"VAE's own reconstructions of the first {cfg.num_samples} test images (class accuracy with their true labels): "
        "no sample decoded by that VAE is expected to beat it. Chance class consistency: 1/6 = 0.167.")
    report.image("plots/convergence.png", "class consistency and FD along SiT training (band: range over SiT seeds; "
                 "dotted: the VAE's reconstruction ceiling; dashed black: chance)")
    rows = generation["budget"]
    columns = _columns(rows, BUDGET_COLUMNS)
    report.table([h for _, h in columns], [[r.get(k) for k, _ in columns] for r in rows])
    report.paragraph("At the last checkpoint, mean over SiT seeds; '+-' is half the range over seeds (0 with one seed). "
                     f"A binomial standard error of class consistency with {cfg.num_samples} samples is about "
                     f"{math.sqrt(0.25 / cfg.num_samples):.3f} at 0.5.")
    for run in generation["runs"]:
        final = run["curve"][-1]["checkpoint"]
        for tag in GUIDANCE:
            source = out / run["run"] / "samples" / f"{final}_{tag}.png"
            name = f"samples_{slug(run['run'])}_{tag}.png"
            shutil.copyfile(source, plots / name)
            what = "no guidance" if tag == "plain" else f"CFG {cfg.cfg_scale:g}"
            report.image(f"plots/{name}", f"{run['run']} ({run['preset']}): samples at the last checkpoint, {what}, "
                                          "one row per requested shape (circle, square, triangle, star, heart, ellipse)")


def write_report(cfg: DemoConfig, out: Path, results: dict[str, dict[str, Any]], timing: dict[str, Any]) -> dict[str, Any]:
    """Write ``OUT/report`` (report.md, index.html, plots, summary.json); return the summary."""
    from sendvae.data.shapes import FACTORS
    from sendvae.eval.report import Report

    folder = out / "report"
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    generation = generation_results(cfg, results)
    rows = summary_rows(cfg, results, generation)
    probe_rows = results["probe"]["rows"]
    clf = results["classifier"]
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "rows": rows, "probe": results["probe"], "classifier": clf,
        "generation": generation, "timing": timing, "table": summary_table(rows),
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
        f"Wall time of this invocation: {minutes(timing['seconds'])} (steps already complete were skipped) on "
        f"{machine['cpus']} CPUs with {machine['torch_threads']} torch threads, precision {machine['precision']}; load "
        f"average before / after {timing['load_before']} / {timing['load_after']} (other processes slow the run down).")
    report.heading("What this run shows")
    for line in findings(cfg, rows, results, generation):
        report.paragraph(line)
    report.paragraph(PILOT_CONTEXT)
    report.heading("Variants x metrics")
    columns = _columns(rows, SUMMARY_COLUMNS)
    report.table([h for _, h in columns], [[r.get(k) for k, _ in columns] for r in rows])
    report.paragraph(
        "Probe: a linear probe per attribute on the flattened posterior mean, fitted on the first "
        f"{results['probe']['n_train']} training images, macro-F1 over the 49 binary attributes of the "
        f"{results['probe']['n_test']} test images; factor accuracy = argmax within each factor. FD recon: Frechet "
        f"distance in the 256-d feature space of the evaluation classifier (trained here on real images, not the teacher) "
        f"between {min(cfg.fd_images or cfg.num_samples, cfg.n_test)} reconstructed test images and all {cfg.n_test} real "
        f"test images; two halves of the real test set are {clf['fd_real_halves']:.2f} apart ({clf['half_size']} images "
        f"each). PSNR / SSIM on the first {min(cfg.recon_images or cfg.n_test, cfg.n_test)} test images. 'gen:' columns "
        "come from the generation study below (its own data variant and classifier; 'gen: FD recon' and 'gen: recon "
        "class acc' are the VAE's reconstruction ceiling there).")
    report.heading("Linear probes per factor")
    _plot_probe(probe_rows, plots / "probe_factors.png")
    report.image("plots/probe_factors.png", "probe accuracy per factor (hatched: reference rows)")
    factors = list(FACTORS)
    report.table(["row", "kind", "probe dim", "macro-F1", "mean acc"] + factors,
                 [[r["name"], r["kind"], r["probe_dim"], r["macro_f1"], r["mean_factor_accuracy"]]
                  + [r["factor_accuracy"][f] for f in factors] for r in probe_rows])
    report.paragraph("Evaluation classifier, test accuracy per factor: "
                     + ", ".join(f"{f} {a:.3f}" for f, a in clf["accuracy"].items())
                     + ". Rotation is only partly identifiable (PILOT.md), so its ceiling is about 0.7.")
    report.heading("Training curves")
    _plot_losses(cfg, out, plots / "losses.png")
    report.image("plots/losses.png", "loss curves from each run's metrics.jsonl")
    report.heading("Reconstructions")
    _recon_grid(out / "recon", ["real"] + [r["vae"] for r in rows], plots / "reconstructions.png")
    report.image("plots/reconstructions.png", "first test images and their reconstructions (posterior mean)")
    if generation:
        plot_convergence(generation, plots / "convergence.png")
        _generation_section(report, cfg, out, generation, plots)
    report.heading("How to reproduce")
    flags = {"smoke": " --smoke", "default": "", "full": " --full"}[cfg.scale]
    report.code(f"sendvae demo --out {out}{flags} --seed {cfg.seed}" + (f" --resolution {cfg.resolution}" if cfg.resolution != 32 else ""))
    report.paragraph("Settings: " + ", ".join(f"{k}={v}" for k, v in to_dict(cfg).items()))
    report.write(folder)
    atomic_json(folder / "summary.json", summary)
    return summary
