"""Benchmark: SiT-XL/1 + REPA training on one CUDA GPU (the paper's stage-2 model), bf16 autocast.

Model: SiT-XL/1 (28 blocks, width 1152, 16 heads) on 32x16x16 latents (256 tokens, the Send-VAE
f16d32 latent), 1000 classes, REPA projector (1152 -> 2048 -> 2048 -> 768) after block 8. One step
= forward (velocity MSE + 0.5 x REPA against given DINOv2-B-sized teacher tokens, as from a token
cache), backward, gradient clipping, fused AdamW and the EMA update: what ``train-sit`` does per
step apart from data loading and the teacher.

Reports images/s, model FLOPs utilisation (3 x analytic forward matmul FLOPs x images/s) against a
bf16 matmul peak measured in the same run (8192^3 ``torch.mm``) and against the card's nominal dense
bf16 peak when known, and the peak GPU memory. Without CUDA it says so and exits.

    python bench/gpu_train_sit.py [--batch 64 128] [--steps 20] [--preset SiT-XL/1] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from sendvae.models.sit import SiT, forward_flops, preset_args, repa_loss
from sendvae.train.sit import OptimConfig, build_optimizer

NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "B200": 2250.0}  # dense


def nominal_peak(name: str) -> float | None:
    """The card's nominal dense bf16 FLOP/s from its name, or None when unknown."""
    for key, tflops in NOMINAL_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n matmul on ``device`` (best of three timings)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(3):
        torch.mm(a, b)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def bench(preset: str, latent: tuple[int, int, int], batch: int, steps: int, device: torch.device,
          compile_model: bool) -> dict[str, float]:
    """images/s, seconds per step and peak memory (GiB) of one training configuration."""
    c, h, _ = latent
    args = preset_args(preset, input_size=h, in_channels=c, num_classes=1000, teacher_dims=[768])
    torch.manual_seed(0)
    model = SiT(args).to(device).train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, OptimConfig())
    forward = torch.compile(model) if compile_model else model
    z = torch.randn(batch, *latent, device=device)
    noise = torch.randn_like(z)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 1001, (batch,), device=device)
    teacher = torch.randn(batch, (h // args.patch_size) ** 2, 768, device=device)
    params = list(model.parameters())

    def step() -> None:
        x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v, tokens = forward(x_t, t, y, return_tokens=True)
        loss = F.mse_loss(v.float(), noise - z) + 0.5 * repa_loss(tokens, [teacher])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)  # EMA 0.9999

    for _ in range(5 if compile_model else 3):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    per_step = (time.perf_counter() - start) / steps
    flops = 3 * forward_flops(args) * batch / per_step
    return {"images_per_s": batch / per_step, "step_s": per_step, "flops": flops,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="SiT-XL/1")
    parser.add_argument("--latent", default="32x16x16", help="C x H x W of the latents")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128], help="per-GPU batch sizes to time")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_sit: no CUDA device visible to torch; this benchmark needs one (nothing was run).")
        return 0
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    latent = tuple(int(v) for v in args.latent.lower().split("x"))
    name = torch.cuda.get_device_name(device)
    peak = matmul_peak(device)
    nominal = nominal_peak(name)
    c, h, w = latent
    model_args = preset_args(args.preset, input_size=h, in_channels=c, num_classes=1000, teacher_dims=[768])
    print(f"{name}, torch {torch.__version__}; {args.preset} + REPA on {c}x{h}x{w} latents, bf16 autocast, "
          f"{3 * forward_flops(model_args) / 1e9:.0f} GFLOP per image per step")
    print(f"bf16 matmul peak (8192^3 mm): {peak / 1e12:.0f} TFLOP/s"
          + (f"; nominal dense bf16: {nominal / 1e12:.0f} TFLOP/s" if nominal else ""))
    for compile_model in ([False, True] if args.compile else [False]):
        for batch in args.batch:
            try:
                r = bench(args.preset, latent, batch, args.steps, device, compile_model)
            except torch.OutOfMemoryError:
                print(f"batch {batch}{' compiled' if compile_model else ''}: out of memory")
                torch.cuda.empty_cache()
                continue
            print(f"batch {batch:4d}{' (torch.compile)' if compile_model else ''}: {r['images_per_s']:.0f} images/s, "
                  f"{r['step_s'] * 1e3:.0f} ms/step, {r['flops'] / 1e12:.0f} TFLOP/s = MFU {r['flops'] / peak:.0%} "
                  f"of the measured peak" + (f", {r['flops'] / nominal:.0%} of nominal" if nominal else "")
                  + f", peak memory {r['peak_gib']:.1f} GiB")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
