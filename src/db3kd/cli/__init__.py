"""The `db3kd` command line: a thin layer over the library, one module per command."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from .. import __version__
from ..errors import DB3KDError, Terminated

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


RESUME = "finished shards and every query sent are recorded; rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.run(args) or 0
    except DB3KDError as e:
        print(f"db3kd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not ours: a full disk, a file that cannot be written
        where = f" ({e.filename})" if e.filename else ""
        print(f"db3kd: error: {e.strerror or e}{where}; {RESUME} once it is fixed", file=sys.stderr)
        return 2
    except Terminated:
        print(f"db3kd: terminated (SIGTERM); {RESUME}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"db3kd: interrupted; {RESUME}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated()
