"""Benchmark: shapes rendering speed at 32 and 64 px against the 2,000 images/s target.

Renders batches with the fast path (``render_batch``) and one item at a time (``ShapesDataset``
indexing, what a DataLoader without batching does) and prints images per second and the ratio to
the target. Run: ``.venv/bin/python bench/bench_shapes.py [--batch 1024] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sendvae.data.shapes import ShapesDataset, render_batch

TARGET = 2000.0  # images per second at 64 px on 2 cores (issue 2)


def rate(fn, n_per_call: int, seconds: float) -> float:
    """Images per second: the median of timed calls filling ``seconds`` after one warm-up call."""
    fn(0)
    times, start, call = [], time.perf_counter(), 1
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn(call)
        times.append(time.perf_counter() - t0)
        call += 1
    return n_per_call / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024, help="images per render_batch call")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent per measurement")
    args = parser.parse_args()
    print(f"shapes rendering, {os.cpu_count()} CPUs visible, numpy {np.__version__}")
    for resolution in (32, 64):
        def batch_call(c: int, res: int = resolution) -> None:
            render_batch(np.arange(c * args.batch, (c + 1) * args.batch), res, seed=0)

        def item_calls(c: int, dataset: ShapesDataset = ShapesDataset(10**9, resolution, seed=0)) -> None:
            for k in range(64):
                dataset[c * 64 + k]

        batched = rate(batch_call, args.batch, args.seconds)
        single = rate(item_calls, 64, args.seconds / 2)
        print(f"{resolution:3d} px: render_batch {batched:9.0f} img/s (ratio to {TARGET:.0f} target: "
              f"{batched / TARGET:5.2f}x); per item {single:7.0f} img/s")


if __name__ == "__main__":
    main()
