"""Benchmark: LeNet-5 on MNIST with `train_student` (issue: >= 99.0% test accuracy within 10 epochs on CPU).

Also checks that the exported ONNX file gives the same arg-max as the PyTorch model on the whole test set.
Writes benchmarks/results/train_teacher.json.

    python benchmarks/train_teacher.py [--data-dir ../shared/data] [--epochs 10] [--out runs/bench-teacher]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
from pathlib import Path

import torch

from db3kd import __version__
from db3kd.data import load_dataset
from db3kd.io import write_json
from db3kd.jobs.students import train_student
from db3kd.training import TrainConfig
from db3kd.transfer import TransferCost, TransferSet

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--arch", default="lenet5")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-teacher"))
    args = parser.parse_args()

    dataset = load_dataset("mnist", args.data_dir)
    labelled = TransferSet(dataset.x_train, dataset.y_train, None, TransferCost(), "train split (dataset labels)")
    metrics = train_student(args.out, args.arch, dataset.info, labelled, (dataset.x_test, dataset.y_test),
                            TrainConfig(profile="paper", epochs=args.epochs, batch_size=128, seed=args.seed))  # as recorded
    figures = {
        "benchmark": "train_teacher",
        "arch": args.arch,
        "dataset": "mnist",
        "epochs": args.epochs,
        "test_accuracy": metrics["test_accuracy"],
        "accuracy_per_epoch": [round(h["test_accuracy"], 4) for h in metrics["history"]],
        "wall_seconds": metrics["seconds"],
        "onnx_argmax_agreement_test_set": metrics["onnx_argmax_agreement"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "configuration": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                          "python": platform.python_version(), "db3kd": __version__, "train": metrics["config"]},
        "target_met": metrics["test_accuracy"] >= 0.99 and metrics["onnx_argmax_agreement"] == 1.0,
    }
    out = write_json(ROOT / "benchmarks" / "results" / "train_teacher.json", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
