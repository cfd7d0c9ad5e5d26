"""GPU benchmark: 1,000 samples from a SiT-XL/1-sized random model on 32x16x16 latents (f16c32), images/s.

Runs :func:`sendvae.sampling.generate_latents` (float64 sampler state, per-sample seeded noise, the
model in bf16 or fp32) in batches on one CUDA device, optionally decoding with a random f16c32 VAE
at 256 px, and prints images/s, model passes per image and the achieved model TFLOP/s (analytic
forward FLOPs of :func:`sendvae.models.sit.forward_flops`). Weights are random: the speed, not the
images, is measured. Without CUDA it says so and exits with status 1.
Run: ``python bench/gpu_sample.py [--images 1000] [--batch 250] [--steps 50] [--sampler sde]
[--cfg 2.5 --interval 0,0.75] [--decode]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sendvae.models.sit import build_sit, forward_flops
from sendvae.sampling import SamplingConfig, evaluations_per_sample, generate_latents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (the paper: 250; time scales linearly)")
    parser.add_argument("--sampler", choices=("sde", "euler", "heun"), default="sde")
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--interval", default="0,1")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--decode", action="store_true", help="also decode with a random f16c32 VAE (256 px)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_sample.py needs a CUDA device and torch sees none; run bench/bench_sample.py for the CPU numbers")
        return 1
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = build_sit("SiT-XL/1", input_size=16, in_channels=32, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    low, high = (float(v) for v in args.interval.split(","))
    config = SamplingConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, guidance_interval=(low, high))
    passes = evaluations_per_sample(config)
    vae = None
    if args.decode:
        from sendvae.models.vae import build_vae

        vae = build_vae("f16c32").to(device).eval()
    print(
        f"{torch.cuda.get_device_name(device)}: SiT-XL/1 (random) on 32x16x16 latents, {args.dtype}, "
        f"{args.sampler} {args.steps} steps, cfg {args.cfg} on {[low, high]} -> {passes} passes/image, "
        f"batch {args.batch}"
    )
    labels = torch.arange(args.images) % 1000

    def run(indices: range) -> None:
        z = generate_latents(
            model,
            indices,
            labels[indices.start : indices.stop],
            (32, 16, 16),
            config,
            null_label=1000,
            device=device,
            dtype=dtype,
        )
        if vae is not None:
            with torch.inference_mode():
                vae.decode(z.float()).clamp(-1, 1)

    run(range(0, min(args.batch, 16)))  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, args.images, args.batch):
        run(range(b, min(b + args.batch, args.images)))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = forward_flops(model.args, with_projector=False) * passes * args.images
    print(
        f"{args.images} images in {seconds:.1f} s: {args.images / seconds:.2f} images/s"
        f"{' (with decoding)' if vae is not None else ''}; model {flops / seconds / 1e12:.0f} TFLOP/s; "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    print(
        f"at 250 steps that is about {args.images / seconds * args.steps / 250:.2f} images/s "
        f"(50,000 images: {50_000 / (args.images / seconds * args.steps / 250) / 3600:.1f} h on this GPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
