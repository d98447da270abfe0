"""Options shared by several commands."""

from __future__ import annotations

import argparse
import os
import sys


def command(subparsers, name: str, run, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """Subcommand `name` running `run(args)`; its description is, by default, its module's docstring after the
    first line. Abbreviated options are refused: one must never silently pick another (--budget-total)."""
    if description is None:
        description = sys.modules[run.__module__].__doc__.split("\n\n", 1)[1].strip()
    parser = subparsers.add_parser(name, help=help, description=description, allow_abbrev=False)
    parser.set_defaults(run=run)
    return parser


def add_teacher_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--teacher", required=required, metavar="SPEC",
                        help="the teacher: a model.pt, a model.onnx, an http(s):// label service URL, a "
                             "v2+http(s)://host:port/models/NAME inference server model, or python:module:function")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token for a label service or inference server (default: $DB3KD_API_KEY)")
    group = parser.add_argument_group("asking a remote or Python teacher")
    group.add_argument("--concurrency", type=int, metavar="N",
                       help="requests in flight at once to a service, inference server or Python teacher (default 1)")
    group.add_argument("--max-rps", type=float, metavar="R",
                       help="at most R requests per second to it, over all those in flight (default: no limit)")
    group.add_argument("--price-per-1000", type=float, metavar="USD",
                       help="what the teacher charges per 1000 images, to report money spent")
    group.add_argument("--budget-usd", type=float, metavar="USD",
                       help="stop (resumably) before the teacher's charges would pass USD (needs --price-per-1000)")


# TeacherSpec's fields, as the command line names them.
TEACHER_FLAGS = {"concurrency": "--concurrency", "max_rps": "--max-rps", "price_per_1000": "--price-per-1000",
                 "budget_usd": "--budget-usd"}


def teacher_spec(args):
    """The parsed `--teacher` (with `--api-key` and the options of `add_teacher_args`), or None when not given;
    errors name the option."""
    from ..errors import ConfigError
    from ..teachers import TeacherSpec

    options = {key: getattr(args, key, None) for key in TEACHER_FLAGS}
    if args.teacher is None:
        given = [TEACHER_FLAGS[key] for key, value in options.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} applies to a teacher: give --teacher too")
        return None
    try:
        return TeacherSpec.parse(args.teacher, args.api_key).with_options(**options)
    except ConfigError as e:
        message = str(e)
        if not message.startswith(tuple(f"{key}:" for key in TEACHER_FLAGS)):
            raise
        for key, flag in TEACHER_FLAGS.items():
            message = message.replace(key, flag)
        raise ConfigError(message) from None


def add_data_args(parser: argparse.ArgumentParser, required: bool = True, images: bool = False) -> None:
    """--dataset and --data-dir; with `images`, --dataset may also be a path, with the options of such data."""
    from ..data import DATASETS

    if not images:
        parser.add_argument("--dataset", required=required, choices=DATASETS, help="dataset name")
    else:
        parser.add_argument("--dataset", required=required, metavar="NAME|PATH",
                            help=f"a dataset ({', '.join(DATASETS)}) or your images: a folder (one subfolder per "
                                 "class, or flat and unlabelled) or an .npy/.npz, converted to the teacher's input")
        parser.add_argument("--resize", choices=("crop", "pad"), default="crop",
                            help="images of another size: resize the shorter side and crop the centre (default), or "
                                 "resize the longer side and pad with the lower bound")
        parser.add_argument("--skip-bad-images", action="store_true",
                            help="leave out files that cannot be decoded (listed in the manifest) instead of stopping")
    parser.add_argument("--data-dir", default=None,
                        help="directory holding the datasets (default: $DB3KD_DATA, else ~/.cache/db3kd/data)")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The `TrainConfig` options; sizes left out are derived by the profile from the transfer set's size."""
    group = parser.add_argument_group("training")
    group.add_argument("--profile", choices=("auto", "paper"), default="auto",
                       help="auto (default): batch size and epochs from the set's size, light augmentation, a "
                            "held-out tenth of the transfer set choosing the epoch; paper: batch 512, 10 epochs, "
                            "nothing else (the DB3KD reference code)")
    group.add_argument("--epochs", type=int, help="default: from the profile")
    group.add_argument("--steps", type=int,
                       help="optimizer steps over the run instead of --epochs (auto profile's default: 5000)")
    group.add_argument("--batch-size", type=int, help="default: from the profile")
    group.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, cosine-decayed (default 1e-3)")
    group.add_argument("--augment", choices=("auto", "none", "shift", "crop-flip"), default="auto",
                       help="auto (default): shifts of grey images, random crops and flips of colour ones "
                            "(none with --profile paper)")
    group.add_argument("--holdout", type=float, metavar="FRACTION",
                       help="part of the transfer set held out to choose the epoch (default: 0.1 with the auto "
                            "profile, 0 with paper)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def train_config(args):
    """The `TrainConfig` of `add_training_args`' options."""
    from ..training import TrainConfig

    return TrainConfig(profile=args.profile, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, augment=args.augment, holdout=args.holdout, seed=args.seed, device=args.device)


def add_budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-total", dest="budget", type=int, metavar="TOTAL",
                        help="stop (resumably) once the teacher has seen this many images in this invocation, "
                             "summed over every worker of a distributed run")


def add_executor_args(parser: argparse.ArgumentParser, default: str | None = "local",
                      default_note: str = "default") -> None:
    """--executor and the Ray options; `default` None leaves them all None when not given (a recipe decides)."""
    group = parser.add_argument_group("where shards are computed")
    group.add_argument("--executor", choices=("local", "ray"), default=default,
                       help=f"local: in this process ({default_note}); ray: each shard a Ray task with its own oracle, "
                            "on a Ray cluster (needs pip install 'db3kd[ray]')")
    group.add_argument("--ray-address", dest="address", metavar="auto|HOST:PORT|local",
                       help="the Ray cluster to join: auto (the one started on this machine with `ray start --head`), "
                            "its head's HOST:PORT, or local (a new Ray instance on this machine alone); default: "
                            "$RAY_ADDRESS, else the latest cluster started here, else a new instance")
    group.add_argument("--workers", type=int, metavar="N",
                       help="shards computed at once on Ray (default: the cluster's CPUs)")
    group.add_argument("--max-retries", type=int, metavar="R",
                       help="further attempts at a shard whose Ray worker died (default 3)")


def executor_config(args, base=None):
    """The `ExecutorConfig` the command line asks for: `base` (a recipe's; default local) overridden by
    `--executor` and the Ray options, which are refused for a local executor; errors name the option."""
    from dataclasses import replace

    from ..errors import ConfigError
    from ..executors import ExecutorConfig

    flags = {"address": "--ray-address", "workers": "--workers", "max_retries": "--max-retries"}
    given = {key: getattr(args, key) for key in flags if getattr(args, key) is not None}
    base = base or ExecutorConfig()
    kind = args.executor or base.kind
    if kind == "local" and given:
        raise ConfigError(f"{flags[next(iter(given))]} applies to --executor ray only")
    try:
        return replace(base if kind == base.kind else ExecutorConfig(), kind=kind, **given)
    except ConfigError as e:
        name, _, rest = str(e).partition(": ")
        raise ConfigError(f"{flags.get(name, name)}: {rest}") from None
