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
