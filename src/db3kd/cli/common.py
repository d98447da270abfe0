"""Options shared by several commands."""

from __future__ import annotations

import argparse
import os


def add_teacher_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--teacher", required=required, metavar="SPEC",
                        help="the teacher: a model.pt, a model.onnx or an http(s):// label service URL")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token for a label service (default: $DB3KD_API_KEY)")


def open_teacher(spec: str, api_key: str | None = None, budget: int | None = None):
    """A `LabelOracle` for a teacher spec; the API key goes only to HTTP services."""
    from ..teachers import open_oracle

    options = {"api_key": api_key} if api_key and spec.startswith(("http://", "https://")) else {}
    return open_oracle(spec, budget=budget, **options)


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from ..data import DATASETS

    parser.add_argument("--dataset", required=required, choices=DATASETS, help="dataset name")
    parser.add_argument("--data-dir", default=None,
                        help="directory holding the datasets (default: $DB3KD_DATA, else ~/.cache/db3kd/data)")


def add_budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-total", "--max-queries", dest="max_queries", type=int, metavar="TOTAL",
                        help="stop (resumably) once the teacher has seen this many images in this invocation, "
                             "summed over every worker of a distributed run")


def add_executor_args(parser: argparse.ArgumentParser, default: str | None = "local",
                      default_note: str = "default") -> None:
    """--executor and the Ray options; `default` None leaves them all None when not given (a recipe decides)."""
    group = parser.add_argument_group("where shards are computed")
    group.add_argument("--executor", choices=("local", "ray"), default=default,
                       help=f"local: in this process ({default_note}); ray: each shard a Ray task with its own oracle, "
                            "on a Ray cluster (needs pip install 'db3kd[ray]')")
    group.add_argument("--ray-address", metavar="auto|HOST:PORT|local",
                       help="the Ray cluster to join: auto (the one started on this machine with `ray start --head`), "
                            "its head's HOST:PORT, or local (a new Ray instance on this machine alone); default: "
                            "$RAY_ADDRESS, else the latest cluster started here, else a new instance")
    group.add_argument("--workers", type=int, metavar="N",
                       help="shards computed at once on Ray (default: the cluster's CPUs)")
    group.add_argument("--max-retries", type=int, metavar="R",
                       help="further attempts at a shard whose Ray worker died (default 3)")


def make_executor(args):
    """The executor the command line asks for; refuses Ray options without --executor ray."""
    from ..errors import ConfigError
    from ..executors import LocalExecutor, RayExecutor, TeacherSource

    if args.executor == "local":
        for flag, value in (("--ray-address", args.ray_address), ("--workers", args.workers),
                            ("--max-retries", args.max_retries)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --executor ray only")
        return LocalExecutor()
    retries = 3 if args.max_retries is None else args.max_retries
    return RayExecutor(TeacherSource.from_spec(args.teacher, args.api_key), address=args.ray_address,
                       workers=args.workers, max_retries=retries)
