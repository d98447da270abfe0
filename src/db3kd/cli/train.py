"""`db3kd train-teacher` and `db3kd train-student`: supervised training to a run directory."""

from __future__ import annotations

import argparse

from .common import add_data_args, add_teacher_args, add_training_args, command, teacher_spec, train_config

STUDENT_DESCRIPTION = (
    "The paper's baselines. CE only: a student trained with cross-entropy on ground-truth labels (--labels "
    "dataset) or on the teacher's top-1 labels (--labels teacher, queries counted). Standard KD: --labels "
    "whitebox-logits reads the teacher's LOGITS (white-box: needs the model file, which DB3KD does not) and trains "
    "with the same KD loss as `db3kd distill`.")


def register(subparsers) -> None:
    teacher = command(subparsers, "train-teacher", run_teacher, "train a classifier on a dataset's labels",
                      "Train a network with cross-entropy; write model.pt, model.onnx, metrics.json.")
    _add_training_args(teacher, default_arch="lenet5")
    student = command(subparsers, "train-student", run_student,
                      "train a student with plain cross-entropy (the CE-only baseline)", STUDENT_DESCRIPTION)
    _add_training_args(student, default_arch="lenet5-half")
    student.add_argument("--labels", choices=("dataset", "teacher", "whitebox-logits"), default="dataset",
                         help="the targets (default dataset); teacher and whitebox-logits need --teacher")
    student.add_argument("--temperature", type=float, default=20.0, help="KD temperature for whitebox-logits")
    add_teacher_args(student, required=False)


def _add_training_args(parser: argparse.ArgumentParser, default_arch: str) -> None:
    add_data_args(parser)
    parser.add_argument("--arch", default=default_arch, help=f"network from the model registry (default {default_arch})")
    parser.add_argument("--subset", type=int, metavar="N", help="train on the first N training images only")
    add_training_args(parser)
    parser.add_argument("--out", required=True, help="run directory to write")


def _train(args, labels: str = "dataset") -> int:
    from dataclasses import replace

    from ..errors import ConfigError
    from ..data import load_dataset
    from ..jobs.students import student_summary, teacher_labels, train_student
    from ..oracle import open_oracle
    from ..transfer import TransferCost, TransferSet

    config = train_config(args)
    data = load_dataset(args.dataset, args.data_dir)
    if args.subset is not None:
        if not 1 <= args.subset <= len(data.x_train):
            raise ConfigError(f"--subset: expected 1 to {len(data.x_train)} (the training split's size), got {args.subset}")
        data = replace(data, x_train=data.x_train[:args.subset], y_train=data.y_train[:args.subset])
    extra, kd = {"labels": labels}, None
    if labels == "whitebox-logits":  # before the oracle: a label service is refused before any connection
        from ..losses import KDLoss
        from ..standard_kd import standard_kd_transfer

        transfer = standard_kd_transfer(teacher_spec(args), data.x_train, "train split")
        kd = KDLoss(temperature=args.temperature)
    oracle = open_oracle(teacher_spec(args)) if getattr(args, "teacher", None) else None
    if oracle is not None:
        oracle.check_fits(data.info.input_shape, data.info.num_classes, f"the {args.dataset} dataset")
    if labels == "teacher":
        targets, queries = teacher_labels(oracle, data.x_train)
        transfer = TransferSet(data.x_train, targets, None, TransferCost(labels=queries), "train split")
        extra["train_label_agreement"] = float((targets == data.y_train).mean())
    elif labels == "dataset":
        transfer = TransferSet(data.x_train, data.y_train, None, TransferCost(), "train split (dataset labels)")
    if oracle is not None:
        extra["teacher"] = oracle.name
    metrics = train_student(args.out, args.arch, data.info, transfer, (data.x_test, data.y_test), config, kd=kd,
                            oracle=oracle, extra_metrics=extra)
    print(f"{args.arch} on {args.dataset}: {student_summary(metrics)} ({metrics['seconds']:.0f} s); wrote {args.out}/model.pt, model.onnx, metrics.json, curve.png")
    if oracle is not None:
        cost = metrics["teacher_queries"]
        print(f"fidelity to the teacher {metrics['fidelity']:.4f}; teacher queries: {cost['labels']} for labels, "
              f"{cost['evaluation']} for evaluation")
    return 0


def run_teacher(args) -> int:
    return _train(args)


def run_student(args) -> int:
    from ..errors import ConfigError

    if args.labels != "dataset" and not args.teacher:
        raise ConfigError(f"--labels {args.labels} needs --teacher SPEC (a model.pt, model.onnx or http(s):// URL)")
    return _train(args, labels=args.labels)
