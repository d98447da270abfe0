"""`db3kd distill`: train a student on a transfer set's soft labels (DB3KD).

Train a student on a transfer set written by `db3kd soft-labels` with the DB3KD loss CE(student, c) +
KL(softmax(logits/T) || softmax(student/T)); evaluate on the dataset's test split each epoch; measure fidelity
to the teacher.
"""

from __future__ import annotations

from .common import add_data_args, add_teacher_args, command, teacher_spec


def register(subparsers) -> None:
    parser = command(subparsers, "distill", run, "train a student on soft labels (CE + KL at temperature T)")
    parser.add_argument("--transfer", required=True, metavar="DIR", help="output directory of `db3kd soft-labels`")
    parser.add_argument("--mixtures", metavar="DIR",
                        help="also train on the teacher-labelled mixtures of `db3kd synthesize --mixtures M --out DIR` "
                             "(cross-entropy on their labels; they have no soft labels)")
    parser.add_argument("--student", required=True, metavar="ARCH", help="student network, e.g. lenet5-half")
    add_data_args(parser)
    parser.add_argument("--temperature", type=float, default=20.0, help="KD temperature T (paper: 20)")
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--t2-scaling", action="store_true", help="multiply the KL term by T^2 (paper: off)")
    parser.add_argument("--kd-reduction", choices=("sum", "batchmean"), default="sum",
                        help="KL summed over the batch (paper's code) or averaged")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512, help="paper's code: 512")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_teacher_args(parser, required=False)
    parser.add_argument("--no-fidelity", action="store_true", help="do not query the teacher on the test split")
    parser.add_argument("--out", required=True)


def run(args) -> int:
    from ..data import dataset_info, load_split
    from ..errors import ConfigError
    from ..jobs.mixtures import load_mixtures
    from ..jobs.students import train_student
    from ..losses import KDLoss
    from ..oracle import open_oracle
    from ..training import TrainConfig
    from ..transfer import load_transfer_set

    kd = KDLoss(temperature=args.temperature, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                t2_scaling=args.t2_scaling, reduction=args.kd_reduction)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    transfer = load_transfer_set(args.transfer, args.data_dir)
    info = dataset_info(args.dataset)
    made_on = transfer.manifest.get("dataset")  # None for pseudo samples
    if made_on not in (None, args.dataset) or transfer.images.shape[1:] != info.input_shape \
            or transfer.logits.shape[1] != info.num_classes:
        fix = f"pass --dataset {made_on}" if made_on else "pass the dataset its teacher was made for"
        raise ConfigError(f"--dataset {args.dataset} (images {info.input_shape}, {info.num_classes} classes) is not the "
                          f"data of {args.transfer} ({made_on or 'pseudo samples'}: images {transfer.images.shape[1:]}, "
                          f"{transfer.logits.shape[1]} classes); {fix}")
    test = load_split(args.dataset, "test", args.data_dir)
    if args.teacher is None:  # fidelity is measured against the same teacher
        args.teacher = transfer.manifest.get("teacher")
    oracle = open_oracle(teacher_spec(args)) if args.teacher and not args.no_fidelity else None
    extra = {"transfer": str(args.transfer), "method": transfer.manifest.get("method"), "teacher": args.teacher}
    if args.mixtures:
        images, labels, mixed = load_mixtures(args.mixtures)
        transfer = transfer.with_mixtures(images, labels, mixed["total_queries"])
        extra["mixtures"] = str(args.mixtures)
    metrics = train_student(args.out, args.student, info, transfer, test, config, kd=kd,
                            oracle=oracle, extra_metrics=extra)
    fidelity = f", fidelity {metrics['fidelity']:.4f}" if "fidelity" in metrics else ""
    print(f"{args.student} distilled from {len(transfer.images)} samples ({extra['method']} soft labels): test accuracy "
          f"{metrics['test_accuracy']:.4f} (best {metrics['best_test_accuracy']:.4f}){fidelity}; "
          f"{metrics['teacher_queries']['total']:,} teacher queries behind its training data; wrote {args.out}")
    return 0
