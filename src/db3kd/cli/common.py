"""Options shared by several commands."""

from __future__ import annotations

import argparse
import os


def add_teacher_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--teacher", required=required, metavar="SPEC",
                        help="the teacher: a model.pt, a model.onnx or an http(s):// label service URL")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token for a label service (default: $DB3KD_API_KEY)")


def teacher_options(args: argparse.Namespace) -> dict:
    """Backend options from parsed teacher arguments (only what applies to the spec)."""
    if args.teacher.startswith(("http://", "https://")) and args.api_key:
        return {"api_key": args.api_key}
    return {}


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from ..data import DATASETS

    parser.add_argument("--dataset", required=required, choices=DATASETS, help="dataset name")
    parser.add_argument("--data-dir", default=None,
                        help="directory holding the datasets (default: $DB3KD_DATA, else ~/.cache/db3kd/data)")
