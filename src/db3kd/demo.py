"""The embedded demo: the whole path on scikit-learn's digits, with no data files and no network."""

from __future__ import annotations

import os
from pathlib import Path

from .data import load_dataset
from .jobs import teacher_labels, train_to_dir, write_json
from .teachers import open_oracle
from .training import TrainConfig

DEMO_DATASET = "digits"
TEACHER_ARCH = "lenet5"
STUDENT_ARCH = "lenet5-half"


def run_demo(out_dir: str | os.PathLike = "runs/demo", epochs: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Train a teacher on digits, then a CE-only student from the teacher's labels alone.

    The student never sees the teacher's weights: it talks to the exported ONNX file through a
    `LabelOracle`, which counts every image it sends. Returns a summary, also written to summary.json.
    """
    out = Path(out_dir)
    dataset = load_dataset(DEMO_DATASET)
    config = TrainConfig(epochs=epochs, batch_size=64, seed=seed)
    test = (dataset.x_test, dataset.y_test)
    teacher = train_to_dir(out / "teacher", TEACHER_ARCH, dataset.info, (dataset.x_train, dataset.y_train), test,
                           config, progress=progress)
    oracle = open_oracle(out / "teacher" / "model.onnx")
    labels, _ = teacher_labels(oracle, dataset.x_train)
    student = train_to_dir(out / "student-ce", STUDENT_ARCH, dataset.info, (dataset.x_train, labels), test, config,
                           oracle=oracle, progress=progress)
    summary = {
        "dataset": DEMO_DATASET,
        "train_samples": len(dataset.x_train),
        "test_samples": len(dataset.x_test),
        "teacher": {"arch": TEACHER_ARCH, "test_accuracy": teacher["test_accuracy"], "seconds": teacher["seconds"]},
        "student_ce_teacher_labels": {
            "arch": STUDENT_ARCH,
            "test_accuracy": student["test_accuracy"],
            "fidelity": student["fidelity"],
            "seconds": student["seconds"],
        },
        "teacher_queries": oracle.queries,
    }
    write_json(out / "summary.json", summary)
    return summary
