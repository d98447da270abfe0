"""`db3kd soft-labels`: boundary distances and soft labels for dataset samples, resumable."""

from __future__ import annotations

from .common import add_budget_arg, add_data_args, add_executor_args, add_teacher_args, make_executor, open_teacher


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "soft-labels", help="estimate boundary distances (sd, bd, mbd) and soft labels",
        description="For each selected sample and each other class, estimate the distance to the teacher's "
                    "decision boundary and turn the distances into soft labels (DB3KD). Results are written "
                    "in shards; rerunning the same command after an interruption resumes.")
    add_teacher_args(parser)
    add_data_args(parser, required=False)
    parser.add_argument("--pseudo", metavar="DIR",
                        help="instead of --dataset: the pseudo samples of `db3kd synthesize --out DIR` (zero-shot); "
                             "their labels are the teacher's already, so no labelling queries are sent, and the "
                             "images are stored in soft_labels.npz")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--subset", type=int, metavar="N", help="the first N samples of the split")
    chosen.add_argument("--indices", metavar="FILE", help="dataset indices, one per line, or a .npy of integers")
    parser.add_argument("--method", choices=("sd", "bd", "mbd"), required=True)
    parser.add_argument("--budget", type=int, metavar="Q", help="queries per (sample, target) pair at most")
    parser.add_argument("--checkpoints", metavar="Q1,Q2,...",
                        help="mbd: also record the distance reached at these queries per pair, e.g. 250,500,1000")
    add_budget_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    parser.add_argument("--save-points", action="store_true",
                        help="also store the boundary point of every pair (N x K images: for subsets)")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    add_executor_args(parser)
    parser.set_defaults(run=run)


def estimator_params(args) -> dict:
    """Estimator hyper-parameters from the command line (validated by the estimator itself)."""
    from ..errors import ConfigError

    params = {}
    if args.budget is not None:
        if args.method == "sd":
            raise ConfigError("--budget does not apply to --method sd, which spends no queries")
        params["max_queries" if args.method == "bd" else "budget"] = args.budget
    if args.checkpoints:
        if args.method != "mbd":
            raise ConfigError("--checkpoints applies to --method mbd only")
        try:
            params["checkpoints"] = [int(q) for q in args.checkpoints.split(",")]
        except ValueError:
            raise ConfigError(f"--checkpoints: expected comma-separated integers like 250,500,1000, got {args.checkpoints!r}") from None
    elif args.method == "mbd" and args.budget is not None:
        # Without --checkpoints: the usual ones below the budget, and the budget itself.
        params["checkpoints"] = [q for q in (250, 500, 1000, 2000) if q < args.budget] + [args.budget]
    return params


def run(args) -> int:
    import numpy as np

    from ..data import load_split
    from ..errors import ConfigError
    from ..soft_labels import SoftLabelConfig, check_indices, compute_soft_labels, read_indices

    config = SoftLabelConfig(method=args.method, params=estimator_params(args), seed=args.seed,
                             shard_size=args.shard_size, save_points=args.save_points)
    executor = make_executor(args)  # before any query: a missing Ray or a bad option costs nothing
    if (args.dataset is None) == (args.pseudo is None):
        raise ConfigError("expected exactly one of --dataset (real samples) or --pseudo DIR (synthesized samples), "
                          f"got {'both' if args.dataset else 'neither'}")
    reference_y = None
    if args.pseudo:
        from ..synthesis import load_pseudo_samples

        x, reference_y, _ = load_pseudo_samples(args.pseudo)
        run_info = {"teacher": args.teacher, "pseudo": str(args.pseudo), "split": "pseudo",
                    "pseudo_sha256": _digest(x, reference_y)}
    else:
        x, _ = load_split(args.dataset, args.split, args.data_dir)
        run_info = {"teacher": args.teacher, "dataset": args.dataset, "split": args.split}
    if args.indices:
        indices = read_indices(args.indices, len(x))
    elif args.subset is not None:
        if not 0 < args.subset <= len(x):
            raise ConfigError(f"--subset must be between 1 and {len(x)} (the {args.split} split's size), got {args.subset}")
        indices = np.arange(args.subset)
    else:
        indices = check_indices(np.arange(len(x)), len(x))
    oracle = open_teacher(args.teacher, args.api_key, budget=args.max_queries)
    manifest = compute_soft_labels(oracle, x, indices, config, args.out, run_info, reference_y=reference_y,
                                   store_images=reference_y is not None, executor=executor)
    print(f"{manifest['method']} soft labels for {manifest['num_samples']} samples: median distance "
          f"{manifest['median_distance']:.3f}, {manifest['queries_per_pair']:.1f} queries per pair, "
          f"{manifest['total_queries']} teacher queries in all; wrote {args.out}/soft_labels.npz and manifest.json")
    return 0


def _digest(x, y) -> str:
    """SHA-256 of pseudo samples and labels: a rerun on regenerated samples is refused, not mixed."""
    import hashlib

    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
