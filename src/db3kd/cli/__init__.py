"""The `db3kd` command line: a thin layer over the library, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import DB3KDError

# Each module defines `register(subparsers)`, which adds its command(s) with `common.command`.
COMMAND_MODULES = ("train", "serve", "soft_labels", "synthesize", "distill", "demo", "run", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="db3kd", description="Decision-based black-box knowledge distillation from label-only teachers.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"db3kd {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except DB3KDError as e:
        print(f"db3kd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("db3kd: interrupted", file=sys.stderr)
        return 130
