"""`db3kd demo`: the embedded default job, runnable with no data and no network."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole path on the bundled digits data (no downloads)",
                                   description="Train a teacher on scikit-learn's 8x8 digits, then students from "
                                               "the teacher's labels alone (CE-only, DB3KD-BD, and zero-shot "
                                               "ZSDB3KD-BD on pseudo samples from noise and teacher-labelled "
                                               "mixtures of them), and print a table.")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    s = run_demo(args.out, epochs=args.epochs, seed=args.seed)
    print(f"\ndb3kd demo on {s['dataset']} ({s['train_samples']} train / {s['test_samples']} test images); "
          f"results in {args.out}/")
    print(f"BD soft labels: median boundary distance {s['bd_median_distance']:.3f}, "
          f"{s['bd_queries_per_pair']:.1f} queries per (sample, class) pair")
    print(f"Zero-shot: {s['pseudo_samples']:,} pseudo samples synthesized from noise ({s['synthesis_queries']:,} teacher "
          f"queries), BD soft labels on them ({s['zero_shot_soft_label_queries']:,}), {s['mixtures']:,} teacher-labelled "
          f"mixtures of them ({s['mixture_queries']:,}); no real training image\n")
    print(f"| {'model':<32} | {'arch':<12} | test accuracy | fidelity | teacher queries | seconds |")
    print(f"| {'-' * 32} | {'-' * 12} | ------------- | -------- | --------------- | ------- |")
    for r in s["rows"]:
        fidelity = f"{r['fidelity']:.4f}" if r["fidelity"] is not None else "-"
        queries = f"{r['teacher_queries']:,}" if r["teacher_queries"] is not None else "-"
        print(f"| {r['model']:<32} | {r['arch']:<12} | {r['test_accuracy']:>13.4f} | {fidelity:>8} | "
              f"{queries:>15} | {r['seconds']:>7.0f} |")
    return 0
