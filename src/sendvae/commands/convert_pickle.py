"""``sendvae convert-pickle``: the one explicit way to use a trusted legacy pickle (:mod:`sendvae.pickles`)."""

from __future__ import annotations

import argparse
from typing import Any

from sendvae.commands._common import add_command

DESCRIPTION = """\
Convert a legacy pickled checkpoint (.pt .pth .ckpt .bin) that you trust into a .safetensors file.

Every sendvae loader reads torch files with torch.load(weights_only=True) and refuses pickles that
hold Python objects, because unpickling can run any code. This command is the only place that loads
with weights_only=False, and only with --trust-pickle: use it on files from a source you trust.

Input:  SRC, a torch pickle. --entry picks a nested dict first (dotted: state_dict, model.ema).
Output: OUT.safetensors holding every tensor, nested dicts flattened with '.' keys (a module is
        taken as its state_dict; numbers, strings and other objects are dropped). Pass this file
        wherever the pickle was refused (VAE, discriminator, teacher, SiT, Inception weights).

Examples:
  sendvae convert-pickle vavae-imagenet256-f16d32-dinov2.pt vavae.safetensors --trust-pickle
  sendvae vae convert vavae.safetensors runs/vavae
  sendvae convert-pickle repae-sit-xl.pt sit-ema.safetensors --entry ema --trust-pickle
"""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "convert-pickle", "convert a trusted legacy pickle into .safetensors",
                         DESCRIPTION)
    parser.add_argument("src", metavar="SRC", help="the pickled torch file")
    parser.add_argument("out", metavar="OUT.safetensors", help="the tensor file to write")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="required: you trust SRC (unpickling it can run any code it holds)")
    parser.add_argument("--entry", metavar="KEY", help="take this nested dict (dotted path) instead of the whole file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sendvae.pickles import convert_pickle

    out = convert_pickle(args.src, args.out, trust_pickle=args.trust_pickle, entry=args.entry)
    print(out)
    return 0
