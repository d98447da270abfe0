"""`db3kd demo`: the embedded default job, runnable with no data and no network.

Train a teacher on scikit-learn's 8x8 digits, then students from the teacher's labels alone (CE-only, DB3KD-
BD, and zero-shot ZSDB3KD-BD on pseudo samples from noise and teacher-labelled mixtures of them), and print a
table.
"""

from __future__ import annotations

from .common import command


def register(subparsers) -> None:
    parser = command(subparsers, "demo", run, "run the whole path on the bundled digits data (no downloads)")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ..demo import run_demo
    from ..report import write_report

    s = run_demo(args.out, epochs=args.epochs, seed=args.seed)
    print(f"\ndb3kd demo on {s['dataset']} ({s['train_samples']} train / {s['test_samples']} test images): the "
          f"teacher has test accuracy {s['teacher_accuracy']:.4f}; its students learnt from its labels alone.\n")
    for run_dir in s["run_dirs"]:
        print(write_report(run_dir))
    return 0
