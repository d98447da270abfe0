"""`db3kd synthesize`: pseudo samples for zero-shot distillation (ZSDB3KD), resumable.

Draw low-frequency noise until the teacher labels it with each wanted class, then for a few rounds move every
sample away from its nearest decision boundary without leaving its class (ZSDB3KD). No real image is used.
Results are written in shards; rerunning the same command after an interruption resumes.
"""

from __future__ import annotations

from pathlib import Path

from .common import add_budget_arg, add_executor_args, add_teacher_args, command, executor_config, teacher_spec


def register(subparsers) -> None:
    parser = command(subparsers, "synthesize", run, "make pseudo samples from noise, far from the teacher's boundaries (zero-shot)")
    add_teacher_args(parser)
    parser.add_argument("--per-class", type=int, required=True, metavar="N", help="pseudo samples per class")
    parser.add_argument("--queries-per-sample", type=int, default=2000, metavar="Q",
                        help="teacher queries per sample over all rounds (default 2000; rejection sampling apart)")
    parser.add_argument("--rounds", type=int, default=8, metavar="R", help="boundary-push rounds (default 8)")
    parser.add_argument("--step", type=float, default=2.0,
                        help="move length as a fraction of the boundary distance, halved while the class would "
                             "change (default 2)")
    parser.add_argument("--max-draws", type=int, default=200_000,
                        help="noise images drawn per shard at most while a class lacks samples (default 200000)")
    add_budget_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500, metavar="M", help="samples per shard (default 500)")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    group = parser.add_argument_group("teacher-labelled mixtures (extra transfer data, one query each)")
    group.add_argument("--mixtures", type=int, default=0, metavar="M",
                       help="after the pseudo samples, label M random mixtures of them (blend of two, shifted, "
                            "dimmed) into OUT/mixtures; `db3kd distill --mixtures OUT` trains on them (default 0)")
    group.add_argument("--mixture-max-shift", type=int, default=3, metavar="PX", help="largest shift (default 3)")
    group.add_argument("--mixture-min-brightness", type=float, default=0.3, metavar="B",
                       help="smallest dimming factor in (0, 1] (default 0.3)")
    group.add_argument("--mixture-mask", type=float, default=0.0, metavar="SHARE",
                       help="share of the mixtures also cut out by a random smooth mask, the rest set to the lower "
                            "bound: shapes on a background (default 0)")
    group.add_argument("--mixture-max-rotation", type=float, default=0.0, metavar="DEG",
                       help="rotate each mixture by up to DEG degrees either way (default 0)")
    group.add_argument("--mixture-max-scale", type=float, default=0.0, metavar="S",
                       help="zoom each mixture by a factor in [1 - S, 1 + S] (default 0)")
    add_executor_args(parser)


def run(args) -> int:
    from ..jobs.mixtures import MixtureConfig, label_mixtures
    from ..jobs.synthesis import SynthesisConfig, load_pseudo_samples, synthesize
    from ..oracle import open_oracle

    mixtures = None if args.mixtures == 0 else MixtureConfig(
        count=args.mixtures, max_shift=args.mixture_max_shift, min_brightness=args.mixture_min_brightness,
        mask=args.mixture_mask, max_rotation=args.mixture_max_rotation, max_scale=args.mixture_max_scale,
        seed=args.seed)
    config = SynthesisConfig(per_class=args.per_class, queries_per_sample=args.queries_per_sample, rounds=args.rounds,
                             step=args.step, max_draws=args.max_draws, seed=args.seed, shard_size=args.shard_size)
    executor = executor_config(args).build(teacher_spec(args))  # before any query: a bad option costs none
    teacher = teacher_spec(args)
    oracle = open_oracle(teacher, budget=args.budget)
    with teacher.thread_policy():
        manifest = synthesize(oracle, config, args.out, {"teacher": args.teacher}, executor=executor)
        if mixtures is not None:
            mixed = label_mixtures(oracle, load_pseudo_samples(args.out)[0], mixtures, Path(args.out) / "mixtures",
                                   {"teacher": args.teacher}, executor=executor)
    rates = manifest["acceptance_rates"].values()
    first, last = (f"{d:.3f}" if d is not None else "n/a"
                   for d in (manifest["mean_initial_distance"], manifest["mean_distance_per_round"][-1]))
    print(f"{manifest['num_samples']} pseudo samples: mean boundary distance {first} -> {last} after {config.rounds} "
          f"rounds; acceptance rates "
          f"{min(rates):.2%}..{max(rates):.2%}; {manifest['total_queries']} teacher queries "
          f"({manifest['rejection_sampling_queries']} sampling, {manifest['round_queries']} rounds); wrote {args.out}")
    if mixtures is not None:
        print(f"{mixed['count']} teacher-labelled mixtures ({mixed['total_queries']} queries), labels per class "
              f"{mixed['label_counts']}; wrote {Path(args.out) / 'mixtures'}")
    return 0
