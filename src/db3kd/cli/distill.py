"""`db3kd distill`: train a student on a transfer set's soft labels (DB3KD)."""

from __future__ import annotations

from .common import add_data_args, add_teacher_args, open_teacher


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill", help="train a student on soft labels (CE + KL at temperature T)",
        description="Train a student on a transfer set written by `db3kd soft-labels` with the DB3KD loss "
                    "CE(student, c) + KL(softmax(logits/T) || softmax(student/T)); evaluate on the dataset's "
                    "test split each epoch; measure fidelity to the teacher.")
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
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..data import dataset_info, load_split
    from ..jobs import train_to_dir
    from ..losses import KDLoss
    from ..training import TrainConfig
    from ..mixtures import load_mixtures
    from ..transfer import load_transfer_set, with_hard_labels

    kd = KDLoss(temperature=args.temperature, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                t2_scaling=args.t2_scaling, reduction=args.kd_reduction)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    transfer = load_transfer_set(args.transfer, args.data_dir)
    test = load_split(args.dataset, "test", args.data_dir)
    teacher = args.teacher or transfer.manifest.get("teacher")  # fidelity is measured against the same teacher
    oracle = open_teacher(teacher, args.api_key) if teacher and not args.no_fidelity else None
    extra = {"transfer": str(args.transfer), "method": transfer.manifest.get("method"),
             "teacher": teacher, "teacher_queries_transfer": transfer.manifest.get("total_queries")}
    if args.mixtures:
        images, labels, mixed = load_mixtures(args.mixtures)
        transfer = with_hard_labels(transfer, images, labels)
        extra.update(mixtures=str(args.mixtures), teacher_queries_mixtures=mixed["total_queries"])
    metrics = train_to_dir(args.out, args.student, dataset_info(args.dataset), (transfer.images, transfer.labels), test,
                           config, oracle=oracle, soft_logits=transfer.logits, kd=kd, extra_metrics=extra)
    fidelity = f", fidelity {metrics['fidelity']:.4f}" if "fidelity" in metrics else ""
    print(f"{args.student} distilled from {len(transfer.images)} samples ({extra['method']} soft labels): test accuracy "
          f"{metrics['test_accuracy']:.4f} (best {metrics['best_test_accuracy']:.4f}){fidelity}; wrote {args.out}")
    return 0
