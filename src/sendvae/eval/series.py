"""Generation metrics over the checkpoints of one ``train-sit`` run (``sendvae evaluate --checkpoints RUN``).

For every checkpoint ``RUN/checkpoints/ckpt-<images seen>`` (oldest first) the series draws N samples
from the checkpoint's EMA weights (:func:`sendvae.generator.load_sit_source`) with one fixed sampling
config: sample i depends only on (seed, i), so every checkpoint gets the same labels and the same
initial noise, and the curve shows the model, not the draw. The samples go to ``OUT/ckpt-<images>.npz``
(with its grid ``OUT/ckpt-<images>.png``), their metrics to ``OUT/ckpt-<images>.metrics.json`` (with the
protocol, see :mod:`sendvae.eval.generation`), and one row per checkpoint to ``OUT/series.csv`` and
``OUT/series.json`` (rewritten after each checkpoint). A rerun reuses the samples already drawn with
the same settings and recomputes the metrics, so an interrupted series resumes and a series can be
extended while training goes on. The feature networks are loaded once for the whole series.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sendvae.errors import UserError
from sendvae.eval.generation import GenerationMetrics, build_extractors, evaluate_files, write_metrics
from sendvae.progress import bars_enabled
from sendvae.generator import sample_from_run
from sendvae.sampling import SamplingConfig, read_sample_metadata

log = logging.getLogger(__name__)

SERIES_COLUMNS = ("checkpoint", "images_seen", "fid", "sfid", "inception_score", "precision", "recall", "kid")


def series_row(checkpoint: str, images_seen: int, metrics: GenerationMetrics) -> dict[str, Any]:
    """One row of the series: the checkpoint, its progress, ADM's metrics and ``fd_<space>`` for each FD space."""
    data = metrics.to_json()
    row = {"checkpoint": checkpoint, "images_seen": images_seen, **{k: data[k] for k in SERIES_COLUMNS[2:]}}
    row.update({f"fd_{name}": value for name, value in metrics.frechet.items()})
    return row


def _reusable(samples: Path, config: SamplingConfig, num_samples: int) -> bool:
    """Whether ``samples`` exists and was drawn with ``config`` and ``num_samples`` (else refuse to replace it)."""
    if not samples.exists():
        return False
    metadata = read_sample_metadata(samples)
    if metadata is not None and metadata["sampling"] == config.to_json() and metadata["num_samples"] == num_samples:
        return True
    raise UserError(
        f"{samples} exists but was not drawn with these settings (--num-samples {num_samples} and the sampling "
        "options); choose another --out-dir or delete it"
    )


def _write_table(out_dir: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """``series.json`` (the settings and the rows) and ``series.csv`` (the rows), each written atomically."""
    write_metrics({**header, "rows": rows}, out_dir / "series.json")
    columns = list(SERIES_COLUMNS) + sorted({k for row in rows for k in row if k.startswith("fd_")})
    tmp = out_dir / ".tmp-series.csv"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_dir / "series.csv")


def evaluate_checkpoints(
    run: str | Path,
    reference: str | Path,
    out_dir: str | Path,
    config: SamplingConfig,
    num_samples: int,
    *,
    vae: str | Path | None = None,
    inception: str | Path | None = None,
    features: Sequence[str] = (),
    dinov2: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    kid: bool = True,
    grid: tuple[int, int] | None = (8, 10),
) -> list[dict[str, Any]]:
    """Sample and evaluate every checkpoint of ``run`` (see the module notes); returns the rows of the series."""
    from sendvae.train.checkpoint import list_checkpoints, load_checkpoint

    run, out_dir = Path(run), Path(out_dir)
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints:
        raise UserError(f"--checkpoints {run}: no checkpoints under {run / 'checkpoints'} (ckpt-<images seen>)")
    if not Path(reference).is_file():
        raise UserError(f"--ref {reference} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    extractors = build_extractors(inception, features, device, dinov2=dinov2)
    header = {"run": str(run), "reference": str(reference), "num_samples": num_samples, "sampling": config.to_json()}
    rows: list[dict[str, Any]] = []
    for checkpoint in tqdm(checkpoints, desc="checkpoints", unit="ckpt", disable=not bars_enabled()):
        samples = out_dir / f"{checkpoint.name}.npz"
        if not _reusable(samples, config, num_samples):
            sample_from_run(
                checkpoint, samples, config, num_samples, vae=vae, batch_size=batch_size, grid=grid,
                device=device, dtype=dtype,
            )
        metrics = evaluate_files(
            str(samples), reference, batch_size=batch_size, device=device, kid=kid,
            json_out=out_dir / f"{checkpoint.name}.metrics.json", extractors=extractors,
        )
        images_seen = load_checkpoint(checkpoint, verify=False).images_seen
        rows.append(series_row(checkpoint.name, images_seen, metrics))
        _write_table(out_dir, rows, header)
        log.info("%s (%d images seen): gFID %.4g", checkpoint.name, images_seen, metrics.fid)
    return rows
