"""Benchmark: the offline teacher's throughput (EfficientNet-Lite0 tokens on the 8x8 grid, 128-px input).

The teacher runs on every aligned fine-tune batch (or once per image with the token cache), so its
speed sets part of the demo's budget. Measured in one run, alternating: the module as built (its
weights and input in NHWC, ``channels_last``) against the same module in NCHW, in fp32 and in bf16
autocast; the precision ``auto`` picks on this machine is marked. Prints images/s and the ratios.

Run: ``.venv/bin/python bench/bench_teacher.py [--batch 64] [--rounds 3] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sendvae.hardware import autocast, describe_cpu, resolve_precision
from sendvae.models.teachers import build_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of 3 batches; the best counts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nhwc = build_teacher("effnet-lite0", None, grid=8).eval()
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    nchw.features = lambda x: nchw.blocks(nchw.stem(x.contiguous())).flatten(2).transpose(1, 2)  # NCHW throughout
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    chosen = resolve_precision("auto", "cpu").precision
    best: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                for layout, teacher in (("NHWC (as built)", nhwc), ("NCHW", nchw)):
                    with autocast(precision, "cpu"):
                        teacher(images)
                        start = time.perf_counter()
                        for _ in range(3):
                            teacher(images)
                    rate = 3 * args.batch / (time.perf_counter() - start)
                    best[precision, layout] = max(best.get((precision, layout), 0.0), rate)
    print(f"CPU: {describe_cpu()['cpu_model']}, {args.threads} threads; effnet-lite0 blocks[4] at 128 px, batch {args.batch}")
    for precision in ("fp32", "bf16"):
        mark = "  <- precision auto" if precision == chosen else ""
        built, plain = best[precision, "NHWC (as built)"], best[precision, "NCHW"]
        print(f"{precision}: NHWC {built:7.1f} img/s, NCHW {plain:7.1f} img/s, NHWC/NCHW {built / plain:.2f}x{mark}")


if __name__ == "__main__":
    main()
