"""`db3kd report`: summarise a run directory as report.md and accuracy_vs_queries.png.

One row per (method, student) with mean ± std over seeds of accuracy, fidelity, teacher queries and time;
writes RUN_DIR/report.md and RUN_DIR/accuracy_vs_queries.png. Given several run directories, one table with a
column per dataset (and the paper's figures, as reported), written to --out if given.
"""

from __future__ import annotations

from .common import command


def register(subparsers) -> None:
    parser = command(subparsers, "report", run, "write and print the Markdown report of `db3kd run` directories")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", metavar="FILE", help="several run directories: also write the table to FILE")


def run(args) -> int:
    from ..report import write_combined_report, write_report

    if len(args.run_dirs) == 1:
        print(write_report(args.run_dirs[0]))
    else:
        print(write_combined_report(args.run_dirs, args.out))
    return 0
