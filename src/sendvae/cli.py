"""The ``sendvae`` command line: one subcommand per step of the pipeline.

Each module in :mod:`sendvae.commands` contributes one top-level command through a
``register(subparsers)`` function, so adding a command is adding a file. Commands stay thin: they
parse arguments, build a config and call one library function that Python users can call too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from sendvae import __version__, commands
from sendvae.errors import UserError
from sendvae.threads import apply_thread_policy

DESCRIPTION = """\
Send-VAE toolkit (arXiv 2601.05823): fine-tune a VAE with disentangled representation
alignment, probe its latent for attributes, train SiT + REPA on it, sample and evaluate.

Pipeline:  data prepare -> train-vae -> probe / cache-latents -> train-sit -> sample -> evaluate
Run `sendvae <command> --help` for each command's inputs, outputs and an example.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sendvae", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sendvae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    policy = apply_thread_policy()  # before any command imports torch
    if policy is not None:
        logging.getLogger("sendvae").info("%s", policy)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"sendvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
