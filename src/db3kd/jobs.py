"""Train a classifier and write its run directory: `model.pt`, `model.onnx` and `metrics.json`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import ModelSpec, export_onnx, save_checkpoint
from .data import Dataset
from .errors import ConfigError
from .models import build_model, count_parameters
from .oracle import LabelOracle
from .training import TrainConfig, predict, train_classifier


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as indented JSON, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def onnx_agreement(onnx_path: Path, model, x: np.ndarray) -> float:
    """Fraction of `x` on which the exported ONNX file and the PyTorch model give the same arg-max."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_labels = np.concatenate(
        [session.run(None, {"image": x[i:i + 1000]})[0].argmax(axis=1) for i in range(0, len(x), 1000)]
    )
    return float((onnx_labels == predict(model, x)).mean())


def train_to_dir(
    out_dir: str | os.PathLike,
    arch: str,
    dataset: Dataset,
    config: TrainConfig,
    oracle: LabelOracle | None = None,
    teacher_labels: bool = False,
    progress: bool = True,
) -> dict:
    """Train `arch` on `dataset` with cross-entropy and write model.pt, model.onnx and metrics.json.

    The targets are the dataset's ground-truth labels (a teacher, or the paper's "CE only" student), or
    with `teacher_labels` the oracle's top-1 labels of the training images. Given an oracle, the
    student's fidelity (agreement with the teacher on the test split) is measured too; the queries
    spent on labels and on evaluation are recorded separately.

    Returns the metrics written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dataset.info
    spec = ModelSpec(arch=arch, input_shape=info.input_shape, num_classes=info.num_classes, dataset=info.name)
    model = build_model(arch, info.input_shape, info.num_classes)
    metrics: dict = {"arch": arch, "dataset": info.name, "parameters": count_parameters(model), "version": __version__}
    if teacher_labels and oracle is None:
        raise ConfigError("teacher_labels=True needs an oracle to ask for the labels")
    targets = dataset.y_train
    metrics["labels"] = "teacher" if teacher_labels else "dataset"
    if oracle is not None:
        metrics.update(teacher=oracle.name, teacher_queries_transfer=0)
    if teacher_labels:
        before = oracle.queries
        targets = oracle.labels(dataset.x_train)
        metrics.update(teacher_queries_transfer=oracle.queries - before,
                       train_label_agreement=float((targets == dataset.y_train).mean()))
    started = time.perf_counter()
    result = train_classifier(model, dataset.x_train, targets, config, eval_set=(dataset.x_test, dataset.y_test), progress=progress)
    save_checkpoint(out / "model.pt", model.cpu(), spec)
    onnx_path = export_onnx(model, spec, out / "model.onnx")
    metrics.update(
        test_accuracy=result.final_accuracy,
        best_test_accuracy=max(h["test_accuracy"] for h in result.history),
        epochs=config.epochs,
        seconds=round(time.perf_counter() - started, 2),
        onnx_argmax_agreement=onnx_agreement(onnx_path, model, dataset.x_test),
        config=vars(config),
        history=result.history,
    )
    if oracle is not None:
        before = oracle.queries
        teacher_test = oracle.labels(dataset.x_test)
        metrics["fidelity"] = float((predict(model, dataset.x_test) == teacher_test).mean())
        metrics["teacher_queries_eval"] = oracle.queries - before
    write_json(out / "metrics.json", metrics)
    return metrics
