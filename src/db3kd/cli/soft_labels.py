"""`db3kd soft-labels`: boundary distances and soft labels for dataset samples, resumable.

For each selected sample and each other class, estimate the distance to the teacher's decision boundary and
turn the distances into soft labels (DB3KD). Results are written in shards; rerunning the same command after
an interruption resumes.
"""

from __future__ import annotations

from .common import add_budget_arg, add_data_args, add_executor_args, add_teacher_args, command, executor_config, teacher_spec


def register(subparsers) -> None:
    parser = command(subparsers, "soft-labels", run, "estimate boundary distances (sd, bd, mbd) and soft labels")
    add_teacher_args(parser)
    add_data_args(parser, required=False, images=True)
    parser.add_argument("--pseudo", metavar="DIR",
                        help="instead of --dataset: the pseudo samples of `db3kd synthesize --out DIR` (zero-shot); "
                             "their labels are the teacher's already, so no labelling queries are sent, and the "
                             "images are stored in soft_labels.npz")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--subset", type=int, metavar="N", help="the first N samples of the split")
    chosen.add_argument("--indices", metavar="FILE", help="dataset indices, one per line, or a .npy of integers")
    parser.add_argument("--method", choices=("sd", "bd", "mbd"), required=True)
    parser.add_argument("--queries-per-pair", type=int, metavar="Q", help="queries per (sample, target) pair at most")
    parser.add_argument("--checkpoints", metavar="Q1,Q2,...",
                        help="mbd: also record the distance reached at these queries per pair, e.g. 250,500,1000")
    parser.add_argument("--guide", metavar="MODEL.pt",
                        help="bd, mbd: a student of this teacher (e.g. `db3kd train-student --out DIR`'s DIR/model.pt) "
                             "whose adversarial direction toward each class is searched first: nearer boundaries for "
                             "the same queries (its gradients are ours; the teacher still answers labels only)")
    add_budget_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    parser.add_argument("--save-points", action="store_true",
                        help="also store the boundary point of every pair (N x K images: for subsets)")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    add_executor_args(parser)


def estimator_params(args) -> dict:
    """Estimator hyper-parameters from the command line (validated by the estimator itself)."""
    from ..errors import ConfigError

    params = {}
    if args.queries_per_pair is not None:
        if args.method == "sd":
            raise ConfigError("--queries-per-pair does not apply to --method sd, which spends no queries")
        params["queries_per_pair"] = args.queries_per_pair
    if args.checkpoints:
        if args.method != "mbd":
            raise ConfigError("--checkpoints applies to --method mbd only")
        try:
            params["checkpoints"] = [int(q) for q in args.checkpoints.split(",")]
        except ValueError:
            raise ConfigError(f"--checkpoints: expected comma-separated integers like 250,500,1000, got {args.checkpoints!r}") from None
    elif args.method == "mbd" and args.queries_per_pair is not None:
        # Without --checkpoints: the usual ones below the per-pair cap, and the cap itself.
        q = args.queries_per_pair
        params["checkpoints"] = [c for c in (250, 500, 1000, 2000) if c < q] + [q]
    return params


def run(args) -> int:
    import numpy as np

    from ..errors import ConfigError
    from ..jobs.soft_labels import SoftLabelConfig, check_indices, compute_soft_labels, digest, read_indices
    from ..oracle import open_oracle
    from ..transfer import dataset_images

    config = SoftLabelConfig(method=args.method, params=estimator_params(args), seed=args.seed,
                             shard_size=args.shard_size, save_points=args.save_points)
    executor = executor_config(args).build(teacher_spec(args))  # before any query: a bad option costs none
    if (args.dataset is None) == (args.pseudo is None):
        raise ConfigError("expected exactly one of --dataset (real samples) or --pseudo DIR (synthesized samples), "
                          f"got {'both' if args.dataset else 'neither'}")
    guide = None
    if args.guide:
        if args.method == "sd":
            raise ConfigError("--guide applies to --method bd or mbd (sd searches nothing)")
        from ..checkpoint import load_checkpoint

        guide = load_checkpoint(args.guide)[0]
    pseudo = {}
    teacher = teacher_spec(args)
    oracle = open_oracle(teacher, budget=args.budget)
    if args.pseudo:
        from ..jobs.synthesis import load_pseudo_samples

        x, reference_y, synthesis = load_pseudo_samples(args.pseudo)
        run_info = {"teacher": args.teacher, "pseudo": str(args.pseudo), "split": "pseudo",
                    "pseudo_sha256": digest(x, reference_y)}
        pseudo = {"reference_y": reference_y, "store_images": True, "synthesis_queries": synthesis["total_queries"]}
    else:  # before any query: a teacher of other data is refused
        x, _, data = dataset_images(args.dataset, args.split, oracle, args.data_dir, args.resize, args.skip_bad_images)
        run_info = {"teacher": args.teacher, **data}
    if args.indices:
        indices = read_indices(args.indices, len(x))
    elif args.subset is not None:
        if not 0 < args.subset <= len(x):
            raise ConfigError(f"--subset must be between 1 and {len(x)} (the {args.split} split's size), got {args.subset}")
        indices = np.arange(args.subset)
    else:
        indices = check_indices(np.arange(len(x)), len(x))
    with teacher.thread_policy():
        manifest = compute_soft_labels(oracle, x, indices, config, args.out, run_info, executor=executor,
                                       guide=guide, **pseudo)
    median = "none found" if manifest["median_distance"] is None else f"{manifest['median_distance']:.3f}"
    print(f"{manifest['method']} soft labels for {manifest['num_samples']} samples: median distance "
          f"{median}, {manifest['queries_per_pair']:.1f} queries per pair, "
          f"{manifest['total_queries']} teacher queries in all; wrote {args.out}/soft_labels.npz and manifest.json")
    return 0
