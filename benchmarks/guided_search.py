"""Benchmark: BD and MBD with and without a student guide, on benchmarks/robustness.py's cases.

The guide is a `lenet5-half` student trained (default training profile) on the shared MNIST LeNet-5's labels of
the 60,000 training images: the selector a budgeted run trains anyway, at no query beyond those labels. BD at 20
queries per pair on the 9,000 pairs (first 100 training images of each class x 9 targets), and MBD at 500 on
the 900 all-targets pairs (first 10 of each class), both with every other setting default.

Writes benchmarks/results/guided_search.json.

    python benchmarks/guided_search.py [--guide MODEL.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from db3kd.checkpoint import load_checkpoint
from db3kd.data import dataset_info, load_split
from db3kd.io import write_json
from db3kd.jobs.students import train_student
from db3kd.oracle import open_oracle
from db3kd.robustness import BoundaryDistance, MinimalBoundaryDistance
from db3kd.training import TrainConfig
from db3kd.transfer import TransferCost, TransferSet

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "teachers" / "lenet5_mnist.onnx"
RESULTS = ROOT / "benchmarks" / "results" / "guided_search.json"


def first_per_class(y: np.ndarray, per_class: int) -> np.ndarray:
    return np.concatenate([np.nonzero(y == c)[0][:per_class] for c in range(10)])


def measure(estimator, x, labels, x_ref, y_ref, guide=None) -> dict:
    oracle = open_oracle(TEACHER)
    started = time.perf_counter()
    result = estimator(oracle, x, labels, x_ref, y_ref, guide=guide)
    seconds = time.perf_counter() - started
    asked = result.queries > 0
    assert oracle.queries == result.queries.sum()
    figures = {"estimator": repr(estimator), "guided": guide is not None, "pairs": int(asked.sum()),
               "median_distance": float(np.median(result.distances[asked])),
               "queries_per_pair": float(result.queries[asked].mean()), "seconds": round(seconds, 1)}
    if result.distances_at is not None:
        figures["checkpoint_medians"] = {str(c): float(np.median(result.distances_at[i][asked]))
                                         for i, c in enumerate(estimator.checkpoints)}
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guide", help="a student's model.pt (default: train one into runs/bench-guide)")
    args = parser.parse_args()
    x, y = load_split("mnist", "train", SHARED / "data")
    x_test, y_test = load_split("mnist", "test", SHARED / "data")
    labels = open_oracle(TEACHER).labels(x)
    guide_path = Path(args.guide or ROOT / "runs" / "bench-guide" / "model.pt")
    if not guide_path.is_file():
        transfer = TransferSet(x, labels, None, TransferCost(labels=len(x)), "train split (teacher's labels)")
        train_student(guide_path.parent, "lenet5-half", dataset_info("mnist"), transfer, (x_test, y_test),
                      TrainConfig(seed=0), progress=False)
    guide, _ = load_checkpoint(guide_path)
    report = {"teacher": str(TEACHER), "guide": str(guide_path),
              "guide_test_accuracy": json.loads((guide_path.parent / "metrics.json").read_text())["test_accuracy"],
              "load_average_at_start": os.getloadavg()}
    bd_pairs = first_per_class(y, 100)
    bd = BoundaryDistance(queries_per_pair=20)
    report["bd@20"] = measure(bd, x[bd_pairs], labels[bd_pairs], x, labels)
    report["bd@20_guided"] = measure(bd, x[bd_pairs], labels[bd_pairs], x, labels, guide)
    mbd_pairs = first_per_class(y, 10)
    mbd = MinimalBoundaryDistance(queries_per_pair=500, checkpoints=(250, 500))
    report["mbd@500"] = measure(mbd, x[mbd_pairs], labels[mbd_pairs], x, labels)
    report["mbd@500_guided"] = measure(mbd, x[mbd_pairs], labels[mbd_pairs], x, labels, guide)
    write_json(RESULTS, report)


if __name__ == "__main__":
    main()
