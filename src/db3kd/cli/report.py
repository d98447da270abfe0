"""`db3kd report`: summarise a run directory as report.md and accuracy_vs_queries.png."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write and print the Markdown report of a `db3kd run` directory",
        description="One row per (method, student) with mean ± std over seeds of accuracy, fidelity, teacher "
                    "queries and time; writes RUN_DIR/report.md and RUN_DIR/accuracy_vs_queries.png.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..report import write_report

    print(write_report(args.run_dir))
    return 0
