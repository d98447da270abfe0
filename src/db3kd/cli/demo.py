"""`db3kd demo`: the embedded default job, runnable with no data and no network."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole path on the bundled digits data (no downloads)",
                                   description="Train a teacher on scikit-learn's 8x8 digits, then a student "
                                               "from the teacher's labels alone, and print what happened.")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    s = run_demo(args.out, epochs=args.epochs, seed=args.seed)
    t, st = s["teacher"], s["student_ce_teacher_labels"]
    print(f"\ndb3kd demo on {s['dataset']} ({s['train_samples']} train / {s['test_samples']} test images), results in {args.out}/")
    print(f"  teacher  {t['arch']:<12} test accuracy {t['test_accuracy']:.4f}  ({t['seconds']:.0f} s)")
    print(f"  student  {st['arch']:<12} test accuracy {st['test_accuracy']:.4f}  fidelity {st['fidelity']:.4f}  "
          f"trained on the teacher's top-1 labels only")
    print(f"  teacher queries (label-only, counted by the oracle): {s['teacher_queries']}")
    return 0
