"""``sendvae vae``: inspect, convert and export VAEs, and compute their latent statistics.

Thin wrappers over :mod:`sendvae.models.vae_formats` (``load_vae``, ``save_vae``, ``export_diffusers``),
:mod:`sendvae.models.latent_stats` (``compute_latent_stats``) and :mod:`sendvae.models.vae` (``describe_vae``).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from sendvae.commands._common import add_command

logger = logging.getLogger(__name__)

FORMATS = """\
Accepted VAE inputs (auto-detected):
  - a sendvae VAE folder (config.json with "format": "sendvae-vae", model.safetensors, latent_stats.json)
  - a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or .bin),
    e.g. a local copy of stabilityai/sd-vae-ft-ema, or a pipeline folder with a vae/ subfolder
  - an LDM-format checkpoint (.ckpt .pt .pth .bin .safetensors) with encoder.* decoder.* quant_conv.*
    post_quant_conv.*, possibly under state_dict / model / vae and a prefix such as first_stage_model.
    (VA-VAE, REPA-E sdvae / invae / vavae / e2e-* releases); the architecture is read from the shapes.
Pickled checkpoints that torch.load(weights_only=True) refuses are not unpickled; convert a trusted one
once with `sendvae convert-pickle SRC OUT.safetensors --trust-pickle` and pass the .safetensors file."""

DESCRIPTION = f"""\
Work with the VAE (LDM AutoencoderKL) and its per-channel latent statistics.

Actions:
  info PATH                        format, preset, parameter counts, latent shape, statistics
  export CKPT OUT                  write a diffusers folder (AutoencoderKL.from_pretrained) + latent_stats.json
  stats CKPT --data SPEC -n N      compute the latent mean/std on a dataset (and store them with --out)
  convert SRC OUT                  any supported format -> a sendvae VAE folder

{FORMATS}

Examples:
  sendvae vae info checkpoints/vavae-imagenet256-f16d32-dinov2.pt
  sendvae vae convert vavae.safetensors runs/vavae --stats vavae-latents-stats.pt
  sendvae vae stats runs/vavae --data data/imagenet256 --num-images 10000 --out runs/vavae
  sendvae vae export runs/vavae exports/vavae-diffusers
"""


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats", metavar="FILE",
                        help="latent statistics to attach: latent_stats.json, REPA-E *-latents-stats.pt "
                             "(latents_bias = mean, latents_scale = 1/std) or a tensor file with mean/std")
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="key prefix of the autoencoder inside a checkpoint holding several "
                             "(e.g. first_stage_model.); found automatically otherwise")


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "vae", "inspect, convert, export a VAE; compute its latent statistics",
                         DESCRIPTION)
    actions = parser.add_subparsers(dest="vae_action", metavar="<action>")

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)

    info = add_command(actions, "info", "describe a VAE", f"""\
Print what a VAE file or folder holds: its format, preset (or "custom"), parameter counts, the latent
shape at its native resolution, the latent statistics and a fingerprint of the weights.

{FORMATS}

Example:
  sendvae vae info runs/vavae
  sendvae vae info sdvae-f8d4.pt --stats sdvae-f8d4-latents-stats.pt --json
""")
    info.add_argument("path", help="VAE folder or checkpoint file")
    _add_source_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run_info)

    export = add_command(actions, "export", "write a diffusers AutoencoderKL folder", f"""\
Write a folder that diffusers loads with AutoencoderKL.from_pretrained(OUT): config.json and
diffusion_pytorch_model.safetensors, plus latent_stats.json. The config carries the statistics as
latents_mean / latents_std with scaling_factor 1.0, i.e. diffusers' (z - latents_mean) * scaling_factor
/ latents_std equals sendvae's normalize(z). OUT is written atomically (replaced if it exists).

{FORMATS}

Example:
  sendvae vae export runs/sendvae-f16c32/vae exports/sendvae-f16c32
""")
    export.add_argument("ckpt", help="VAE folder or checkpoint file")
    export.add_argument("out", help="output folder")
    _add_source_arguments(export)
    export.set_defaults(func=run_export)

    stats = add_command(actions, "stats", "compute per-channel latent mean and std on a dataset", f"""\
Encode N images drawn at random from the whole dataset (seeded by --seed; image stores are sorted by
class, so a prefix would miss most classes) and compute the per-channel mean and std of the raw latent
over all images and positions. By default they describe the posterior samples z = mean + std * eps
that stage 2 trains on (computed exactly from the posterior moments); --latent mean uses the posterior
means only, --latent sample one drawn sample per image. Prints them; with --out, writes a sendvae VAE
folder carrying them (latent_stats.json), which every later stage applies at load time
(normalize(z) = (z - mean) / std).

SPEC is an image store folder made by `sendvae data prepare`, or shapes:N for N procedural images.

{FORMATS}

Example:
  sendvae vae stats runs/vavae --data data/imagenet256 --num-images 10000 --out runs/vavae
  sendvae vae stats checkpoints/tiny --data shapes:2000 --num-images 2000 --resolution 32
""")
    stats.add_argument("ckpt", help="VAE folder or checkpoint file")
    stats.add_argument("--data", required=True, metavar="SPEC", help="image store folder or shapes:N")
    stats.add_argument("--num-images", "-n", type=int, required=True, help="number of images to encode")
    stats.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    stats.add_argument("--resolution", type=int,
                       help="image resolution (default: the VAE's native resolution, config sample_size)")
    stats.add_argument("--out", metavar="FOLDER", help="write a sendvae VAE folder carrying the statistics")
    stats.add_argument("--latent", choices=("posterior", "mean", "sample"), default="posterior",
                       help="statistics of: posterior samples, exactly (default), posterior means, or drawn samples")
    stats.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the drawn samples")
    stats.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    stats.add_argument("--bf16", action="store_true", help="encode under bf16 autocast")
    stats.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    stats.add_argument("--prefix", metavar="PREFIX", help="key prefix of the autoencoder inside a checkpoint")
    stats.set_defaults(func=run_stats)

    convert = add_command(actions, "convert", "convert any supported VAE format to a sendvae folder", f"""\
Read a VAE in any supported format and write a sendvae VAE folder (config.json, model.safetensors,
latent_stats.json), atomically. Import maps every key or stops with the list of missing and
unexpected keys.

{FORMATS}

Example:
  sendvae vae convert e2e-vavae.pt runs/e2e-vavae --stats e2e-vavae-latents-stats.pt
""")
    convert.add_argument("src", help="VAE folder or checkpoint file")
    convert.add_argument("out", help="output folder")
    _add_source_arguments(convert)
    convert.set_defaults(func=run_convert)


def _format_info(info: dict[str, Any]) -> str:
    params = info["parameters"]
    lines = [
        f"format:       {info['format']}" + (f" ({info['source']})" if info["source"] else ""),
        f"preset:       {info['preset']}",
        (f"widths:       {info['block_out_channels']}, {info['layers_per_block']} res blocks per level, "
         f"attention per level {info['attention']}"),
        (f"parameters:   {params['total']:,} ({params['tensors']} tensors; encoder {params['encoder']:,}, "
         f"decoder {params['decoder']:,})"),
        (f"latent:       f{info['downsample_factor']}, {info['latent_channels']} channels; "
         f"{info['resolution']} px -> {'x'.join(str(s) for s in info['latent_shape'])}"),
    ]
    stats = info["latent_stats"]
    if isinstance(stats, str):
        lines.append(f"latent stats: {stats}")
    else:
        lines.append("latent stats: channel  mean  std")
        lines += [f"  {c:3d}  {m:+.5f}  {s:.5f}" for c, (m, s) in enumerate(zip(stats["mean"], stats["std"]))]
    lines.append(f"fingerprint:  {info['fingerprint']}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    from sendvae.models.vae import describe_vae
    from sendvae.models.vae_formats import load_vae

    info = describe_vae(load_vae(args.path, stats=args.stats, prefix=args.prefix))
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from sendvae.models.vae_formats import export_diffusers, load_vae

    out = export_diffusers(load_vae(args.ckpt, stats=args.stats, prefix=args.prefix), args.out)
    print(f"wrote diffusers AutoencoderKL folder {out} (with latent_stats.json)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from sendvae.models.vae_formats import load_vae, save_vae

    out = save_vae(load_vae(args.src, stats=args.stats, prefix=args.prefix), args.out)
    print(f"wrote sendvae VAE folder {out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    import torch

    from sendvae.data.store import open_image_dataset
    from sendvae.errors import UserError
    from sendvae.models.latent_stats import compute_latent_stats
    from sendvae.models.vae_formats import load_vae, save_vae
    from sendvae.hardware import resolve_device

    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be positive")
    device = resolve_device(args.device, setting="--device")
    vae = load_vae(args.ckpt, prefix=args.prefix).to(device)
    resolution = args.resolution or vae.resolution
    dataset = open_image_dataset(args.data, resolution)
    generator = torch.Generator(device).manual_seed(args.seed) if args.latent == "sample" else None
    mean, std = compute_latent_stats(vae, dataset, args.num_images, batch_size=args.batch_size,
                                     latent=args.latent, generator=generator, autocast_bf16=args.bf16,
                                     num_workers=args.workers, subset_seed=args.seed)
    print("channel  mean  std")
    for c, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
        print(f"  {c:3d}  {m:+.5f}  {s:.5f}")
    if args.out:
        vae.set_latent_stats(mean, std, info={
            "data": args.data, "num_images": min(args.num_images, len(dataset)), "resolution": resolution,
            "latent": args.latent, "seed": args.seed})
        out = save_vae(vae.to("cpu"), args.out)
        print(f"wrote sendvae VAE folder {out} with these statistics")
    return 0
