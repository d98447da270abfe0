"""The embedded demo: the whole DB3KD path on scikit-learn's digits, with no data files and no network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import load_dataset
from .jobs import teacher_labels, train_to_dir, write_json
from .losses import KDLoss
from .soft_labels import SoftLabelConfig, compute_soft_labels
from .teachers import open_oracle
from .training import TrainConfig
from .transfer import load_transfer_set

DEMO_DATASET = "digits"
TEACHER_ARCH = "lenet5"
STUDENT_ARCH = "lenet5-half"


def run_demo(out_dir: str | os.PathLike = "runs/demo", epochs: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Train a teacher on digits, then two students that only see its labels.

    The students never see the teacher's weights: they talk to its exported ONNX file through a
    `LabelOracle`, which counts every image sent. One student learns from the teacher's top-1 labels
    (the paper's CE-only baseline), the other from DB3KD soft labels built from BD boundary distances.
    Returns a summary, also written to summary.json.
    """
    out = Path(out_dir)
    data = load_dataset(DEMO_DATASET)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, seed=seed)  # small data: fewer, larger steps
    test = (data.x_test, data.y_test)
    teacher = train_to_dir(out / "teacher", TEACHER_ARCH, data.info, (data.x_train, data.y_train), test, config,
                           progress=progress)
    teacher_spec = str(out / "teacher" / "model.onnx")

    oracle = open_oracle(teacher_spec)
    labels, label_queries = teacher_labels(oracle, data.x_train)
    ce = train_to_dir(out / "student-ce", STUDENT_ARCH, data.info, (data.x_train, labels), test, config, oracle=oracle,
                      extra_metrics={"teacher_queries_transfer": label_queries}, progress=progress)

    oracle = open_oracle(teacher_spec)
    manifest = compute_soft_labels(oracle, data.x_train, np.arange(len(data.x_train)), SoftLabelConfig(method="bd"),
                                   out / "soft-labels-bd", {"teacher": teacher_spec, "dataset": DEMO_DATASET,
                                                            "split": "train"}, progress=progress)
    transfer = load_transfer_set(out / "soft-labels-bd")
    bd = train_to_dir(out / "student-db3kd-bd", STUDENT_ARCH, data.info, (transfer.images, transfer.labels), test,
                      config, oracle=oracle, soft_logits=transfer.logits, kd=KDLoss(),
                      extra_metrics={"teacher_queries_transfer": manifest["total_queries"]}, progress=progress)

    def row(name, metrics):
        return {"model": name, "arch": metrics["arch"], "test_accuracy": metrics["test_accuracy"],
                "fidelity": metrics.get("fidelity"), "teacher_queries": metrics.get("teacher_queries_transfer"),
                "seconds": metrics["seconds"]}

    summary = {
        "dataset": DEMO_DATASET,
        "train_samples": len(data.x_train),
        "test_samples": len(data.x_test),
        "bd_median_distance": manifest["median_distance"],
        "bd_queries_per_pair": manifest["queries_per_pair"],
        "rows": [row("teacher", teacher), row("student, CE on top-1 labels", ce), row("student, DB3KD-BD", bd)],
    }
    write_json(out / "summary.json", summary)
    return summary
