"""Small pieces shared by the command modules: help formatting and config loading."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from sendvae.config import describe, load_config

T = TypeVar("T")


def add_command(subparsers: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows ``description`` verbatim (examples keep their layout)."""
    return subparsers.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """``--config FILE`` and trailing ``key=value`` overrides; the epilog lists every key."""
    parser.add_argument("--config", help="YAML preset (see configs/); keys not in it keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. optim.lr=1e-4")
    keys = "\n".join(describe(config_cls))
    parser.epilog = ((parser.epilog or "") + "\n\nconfig keys (default, meaning):\n" + keys).strip()


def config_from_args(config_cls: type[T], args: argparse.Namespace) -> T:
    """Defaults, then ``--config``, then the ``key=value`` overrides."""
    return load_config(config_cls, args.config, args.overrides)
