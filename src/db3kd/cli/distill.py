"""`db3kd distill`: train a student on a transfer set's soft labels (DB3KD).

Train a student on a transfer set written by `db3kd soft-labels` with the DB3KD loss CE(student, c) +
KL(softmax(logits/T) || softmax(student/T)); evaluate on the dataset's test split each epoch; measure fidelity
to the teacher.
"""

from __future__ import annotations

from .common import add_data_args, add_teacher_args, add_training_args, command, teacher_spec, train_config


def register(subparsers) -> None:
    parser = command(subparsers, "distill", run, "train a student on soft labels (CE + KL at temperature T)")
    parser.add_argument("--transfer", required=True, metavar="DIR", help="output directory of `db3kd soft-labels`")
    parser.add_argument("--mixtures", metavar="DIR",
                        help="also train on the teacher-labelled mixtures of `db3kd synthesize --mixtures M --out DIR` "
                             "(cross-entropy on their labels; they have no soft labels)")
    parser.add_argument("--hard-labels-for-rest", action="store_true",
                        help="also train on the split's images that have no soft labels (a --subset run), with the "
                             "teacher's labels its reference labelling already paid for: no further query")
    parser.add_argument("--student", required=True, metavar="ARCH", help="student network, e.g. lenet5-half")
    add_data_args(parser, required=False, images=True)
    parser.add_argument("--test-dataset", metavar="NAME|PATH",
                        help="the images to evaluate on: a dataset's name (its test split), a labelled folder or "
                             "arrays (accuracy and fidelity), or unlabelled images (fidelity only); default: the "
                             "test split of the transfer set's dataset. Needed when the transfer set is of your images")
    parser.add_argument("--temperature", type=float, default=20.0, help="KD temperature T (paper: 20)")
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--t2-scaling", action="store_true", help="multiply the KL term by T^2 (paper: off)")
    parser.add_argument("--kd-reduction", choices=("sum", "batchmean"), default="sum",
                        help="KL summed over the batch (paper's code) or averaged")
    add_training_args(parser)
    add_teacher_args(parser, required=False)
    parser.add_argument("--no-fidelity", action="store_true", help="do not query the teacher on the test split")
    parser.add_argument("--out", required=True)


def run(args) -> int:
    from ..errors import ConfigError
    from ..jobs.mixtures import load_mixtures
    from ..jobs.students import train_student, student_summary
    from ..losses import KDLoss
    from ..transfer import load_transfer_set

    kd = KDLoss(temperature=args.temperature, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                t2_scaling=args.t2_scaling, reduction=args.kd_reduction)
    config = train_config(args)
    transfer = load_transfer_set(args.transfer, args.data_dir, hard_labels_for_rest=args.hard_labels_for_rest)
    if args.teacher is None:  # fidelity is measured against the same teacher
        args.teacher = transfer.manifest.get("teacher")
    info = _dataset_info(args, transfer)
    x_test, y_test, oracle = _test_set(args, transfer, info)
    extra = {"transfer": str(args.transfer), "method": transfer.manifest.get("method"), "teacher": args.teacher,
             "test_set": args.test_dataset or f"{info.name} test split"}
    if args.mixtures:
        images, labels, mixed = load_mixtures(args.mixtures)
        transfer = transfer.with_mixtures(images, labels, mixed["total_queries"])
        extra["mixtures"] = str(args.mixtures)
    if args.no_fidelity and y_test is None:
        raise ConfigError(f"--test-dataset {args.test_dataset} has no labels, so fidelity is all that can be measured: "
                          "drop --no-fidelity")
    metrics = train_student(args.out, args.student, info, transfer, (x_test, y_test), config, kd=kd,
                            oracle=None if args.no_fidelity else oracle, extra_metrics=extra)
    print(f"{args.student} distilled from {len(transfer.images)} samples ({extra['method']} soft labels): "
          f"{student_summary(metrics)}; "
          f"{metrics['teacher_queries']['total']:,} teacher queries behind its training data; wrote {args.out}")
    return 0


def _dataset_info(args, transfer):
    """What the student is made for: the named dataset the transfer set was made on (`--dataset` must agree),
    else the transfer set's own images and classes (your images, or pseudo samples)."""
    from pathlib import Path

    from ..data import DATASETS, DatasetInfo, dataset_info
    from ..errors import ConfigError

    made_on = transfer.manifest.get("dataset")  # a name, the path of your images, or None for pseudo samples
    shape, classes = transfer.images.shape[1:], transfer.logits.shape[1]
    if made_on is not None and made_on not in DATASETS:
        if args.dataset is not None and Path(args.dataset).resolve() != Path(made_on):
            raise ConfigError(f"--dataset {args.dataset} is not the data of {args.transfer} ({made_on}): leave it out")
        return DatasetInfo(Path(made_on).name, tuple(shape), classes, tuple(str(c) for c in range(classes)))
    name = args.dataset or made_on
    if name is None:
        if args.test_dataset is None:
            raise ConfigError(f"{args.transfer} holds pseudo samples: pass --dataset NAME (the data its teacher was made "
                              "for) or --test-dataset PATH (your test images)")
        return DatasetInfo("pseudo samples", tuple(shape), classes, tuple(str(c) for c in range(classes)))
    if name not in DATASETS:
        raise ConfigError(f"--dataset {name}: {args.transfer} was made on pseudo samples; pass a dataset's name "
                          f"({', '.join(DATASETS)}) or your test images with --test-dataset")
    info = dataset_info(name)
    if made_on not in (None, name) or shape != info.input_shape or classes != info.num_classes:
        fix = f"pass --dataset {made_on}" if made_on else "pass the dataset its teacher was made for"
        raise ConfigError(f"--dataset {name} (images {info.input_shape}, {info.num_classes} classes) is not the "
                          f"data of {args.transfer} ({made_on or 'pseudo samples'}: images {shape}, {classes} classes); "
                          f"{fix}")
    return info


def _test_set(args, transfer, info):
    """(test images, their labels or None, the teacher's oracle or None): a dataset's test split, or the
    images at --test-dataset converted to the teacher's input as the transfer set's were."""
    from ..data import DATASETS, load_split
    from ..errors import ConfigError
    from ..oracle import open_oracle
    from ..transfer import dataset_images

    test = args.test_dataset or info.name
    # The teacher is needed for fidelity, and to convert your test images to its input; not otherwise.
    wanted = args.teacher and (not args.no_fidelity or test not in DATASETS)
    oracle = open_oracle(teacher_spec(args)) if wanted else None
    if test not in DATASETS and args.test_dataset is None:
        raise ConfigError(f"{args.transfer} is of your images ({transfer.manifest.get('dataset') or 'pseudo samples'}): "
                          "pass --test-dataset PATH, a folder or arrays of test images (labelled for accuracy, "
                          "else fidelity only)")
    if test in DATASETS:
        if test != info.name and info.name in DATASETS:
            raise ConfigError(f"--test-dataset {test} is not the dataset of {args.transfer} ({info.name})")
        x, y = load_split(test, "test", args.data_dir)
        if x.shape[1:] != info.input_shape:
            raise ConfigError(f"--test-dataset {test}: images {x.shape[1:]}, the student's are {info.input_shape}")
        return x, y, oracle
    if oracle is None:
        raise ConfigError(f"--test-dataset {test}: converting your images to the teacher's input needs the teacher; "
                          f"pass --teacher SPEC ({args.transfer} records none)")
    resize = transfer.manifest.get("images", {}).get("transform", {}).get("resize", args.resize)
    x, y, _ = dataset_images(test, "test", oracle, args.data_dir, resize, args.skip_bad_images)
    return x[:len(x)], y, oracle  # in memory: the test set is read every few epochs
