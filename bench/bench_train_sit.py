"""Benchmark: SiT-S/2 + REPA training steps on CPU, as a fraction of a matmul peak measured in the same run.

Model: SiT-S/2 (12 blocks, width 384, 6 heads) on 16x16x4 latents (64 tokens), 1000 classes, REPA
projector (384 -> 2048 -> 2048 -> 768) after block 4, batch 32. One step = forward (velocity MSE +
0.5 x REPA negative cosine against given teacher tokens, as read from a teacher-feature cache),
backward, gradient clipping and an AdamW update: the work of ``SiTStage.loss`` plus the optimiser.

Achieved FLOP/s = 3 x (analytic forward matmul FLOPs, ``sendvae.models.sit.forward_flops``) x
images/s. The peak is large square matmuls (``torch.mm``) in the same precision, timed in the same
process: once up front (best of 1024/2048/3072) and again (2048) just before every timed step; the
ratio reported is the median over steps of (step FLOP/s) / (matmul FLOP/s just before it), which
stays meaningful when other processes share the CPU.

    python bench/bench_train_sit.py [--batch 32] [--steps 8] [--threads 1]
    python bench/bench_train_sit.py --preset SiT-T/2 --latent-size 8 --teacher-dim 112 --batch 128   # the demo's SiT

The precision ``precision: auto`` picks on this machine is marked with ``*``.

With one thread (the default) every time is CPU time of this process, so the numbers hold on a
machine shared with other jobs; ``--threads N`` uses wall-clock time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sendvae.hardware import describe_cpu, resolve_precision
from sendvae.models.sit import SiT, SiTArgs, forward_flops, preset_args, repa_loss
from sendvae.train.sit import OptimConfig, build_optimizer


def clock() -> float:
    """Seconds of CPU time of this process with one thread (immune to other processes taking the
    cores), wall-clock seconds with several (where CPU time would count idle spinning)."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def matmul_rate(dtype: torch.dtype, n: int = 2048, seconds: float = 0.3) -> float:
    """FLOP/s of repeated ``a @ b`` for square n x n matrices (2 n^3 FLOPs each) over ``seconds``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    reps, start = 0, clock()
    while clock() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (clock() - start)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072)) -> float:
    """Best FLOP/s over a few large square matmul sizes (512 only for bf16 on a CPU that emulates it,
    where one 2048^3 product takes tens of seconds)."""
    if dtype == torch.bfloat16 and resolve_precision("auto", "cpu").precision != "bf16":
        sizes = (512,)
    return max(matmul_rate(dtype, n) for n in sizes)


def train_step_rates(model_args: SiTArgs, batch: int, steps: int, bf16: bool, warmup: int = 3
                     ) -> list[tuple[float, float]]:
    """Per timed step: (seconds, matmul peak FLOP/s measured just before it, in the same precision).

    Pairing each step with a peak measured right before it keeps the ratio honest on a machine
    shared with other work: both see the same load.
    """
    torch.manual_seed(0)
    model = SiT(model_args).train()
    opt = build_optimizer(model, OptimConfig())  # what train-sit uses (fused AdamW, lr 1e-4)
    size, tokens = model_args.input_size, (model_args.input_size // model_args.patch_size) ** 2
    z = torch.randn(batch, model_args.in_channels, size, size)
    noise = torch.randn_like(z)
    t = torch.rand(batch)
    y = torch.randint(0, model_args.num_classes + 1, (batch,))
    teacher = torch.randn(batch, tokens, model_args.teacher_dims[0])
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step() -> None:
        x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v, tokens = model(x_t, t, y, return_tokens=True)
        loss = F.mse_loss(v.float(), noise - z) + 0.5 * repa_loss(tokens, [teacher])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        peak = matmul_peak(dtype, sizes=(2048,))
        start = clock()
        step()
        out.append((clock() - start, peak))
    return out


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: timed in CPU time)")
    parser.add_argument("--preset", default="SiT-S/2", help="SiT preset (the demo's: SiT-T/2)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (4 channels)")
    parser.add_argument("--teacher-dim", type=int, default=768, help="REPA target width (effnet-lite0: 112)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_args = preset_args(args.preset, input_size=args.latent_size, in_channels=4, num_classes=1000,
                             teacher_dims=[args.teacher_dim])
    flops_per_image = 3 * forward_flops(model_args)
    timing = "CPU time of this process" if torch.get_num_threads() == 1 else "wall clock"
    auto = resolve_precision("auto", "cpu")
    print(f"{args.preset} + REPA, {args.latent_size}x{args.latent_size}x4 latents, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {timing}; {flops_per_image / 1e9:.2f} GFLOP per image per training "
          f"step (3 x forward); CPU {describe_cpu()['cpu_model']}; {auto}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    for name, peak in peaks.items():
        print(f"matmul peak {name} (best large square torch.mm): {peak / 1e9:.1f} GFLOP/s")
    for name in ("fp32", "bf16"):
        runs = train_step_rates(model_args, args.batch, args.steps, bf16=name == "bf16")
        per_step = median([s for s, _ in runs])
        achieved = args.batch * flops_per_image / per_step
        ratio = median([args.batch * flops_per_image / s / p for s, p in runs])
        mark = "*" if name == auto.precision else ""
        print(f"{name}{mark}: {args.batch / per_step:.1f} images/s ({per_step * 1e3:.0f} ms/step), {achieved / 1e9:.1f} "
              f"GFLOP/s = {achieved / peaks[name]:.0%} of the {name} peak above, {achieved / peaks['bf16']:.0%} of "
              f"the bf16 peak; per step vs the {name} matmul rate measured just before it: median {ratio:.0%}")


if __name__ == "__main__":
    main()
