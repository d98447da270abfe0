"""`db3kd report`: summarise a run directory as report.md and accuracy_vs_queries.png.

One row per (method, student) with mean ± std over seeds of accuracy, fidelity, teacher queries and time;
writes RUN_DIR/report.md and RUN_DIR/accuracy_vs_queries.png.
"""

from __future__ import annotations

from .common import command


def register(subparsers) -> None:
    parser = command(subparsers, "report", run, "write and print the Markdown report of a `db3kd run` directory")
    parser.add_argument("run_dir", metavar="RUN_DIR")


def run(args) -> int:
    from ..report import write_report

    print(write_report(args.run_dir))
    return 0
