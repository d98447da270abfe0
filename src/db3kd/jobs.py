"""Train a classifier and write its run directory: `model.pt`, `model.onnx`, `metrics.json`, `curve.png`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import ModelSpec, export_onnx, save_checkpoint
from .data import DatasetInfo
from .losses import KDLoss
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


def teacher_labels(oracle: LabelOracle, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The teacher's top-1 labels of `x` and the queries they cost."""
    before = oracle.queries
    labels = oracle.labels(x)
    return labels, oracle.queries - before


def train_to_dir(
    out_dir: str | os.PathLike,
    arch: str,
    info: DatasetInfo,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    oracle: LabelOracle | None = None,
    soft_logits: np.ndarray | None = None,
    kd: KDLoss | None = None,
    extra_metrics: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train `arch` on `train` = (images, labels), evaluate on `test` each epoch, and write the run directory.

    Writes model.pt, model.onnx, metrics.json and curve.png (test accuracy per epoch). The loss is
    cross-entropy, or the distillation loss `kd` against `soft_logits`. Given an oracle, the student's
    fidelity (agreement with the teacher's labels on the test images) is measured, and the queries it
    cost are recorded as `teacher_queries_eval`.

    Returns the metrics written (with `extra_metrics` merged in).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch=arch, input_shape=info.input_shape, num_classes=info.num_classes, dataset=info.name)
    torch.manual_seed(config.seed)  # the initial weights too: a run is reproducible from its seed alone
    model = build_model(arch, info.input_shape, info.num_classes)
    metrics: dict = {"arch": arch, "dataset": info.name, "parameters": count_parameters(model),
                     "train_samples": len(train[0]), "version": __version__, **(extra_metrics or {})}
    started = time.perf_counter()
    result = train_classifier(model, *train, config, eval_set=test, progress=progress, soft_logits=soft_logits, kd=kd)
    save_checkpoint(out / "model.pt", model.cpu(), spec)
    onnx_path = export_onnx(model, spec, out / "model.onnx")
    metrics.update(
        test_accuracy=result.final_accuracy,
        best_test_accuracy=max(h["test_accuracy"] for h in result.history),
        epochs=config.epochs,
        seconds=round(time.perf_counter() - started, 2),
        onnx_argmax_agreement=onnx_agreement(onnx_path, model, test[0]),
        config=vars(config),
        loss=asdict(kd) if kd is not None else "cross-entropy",
        history=result.history,
    )
    if oracle is not None:
        labels, queries = teacher_labels(oracle, test[0])
        metrics.update(fidelity=float((predict(model, test[0]) == labels).mean()), teacher_queries_eval=queries)
    write_json(out / "metrics.json", metrics)
    plot_curve(result.history, out / "curve.png", title=f"{arch} on {info.name}")
    return metrics


def plot_curve(history: list[dict], path: Path, title: str) -> Path:
    """Test accuracy and training loss per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, acc_ax = plt.subplots(figsize=(6, 3.5))
    acc_ax.plot(epochs, [h["test_accuracy"] for h in history], "o-", color="tab:blue")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title=title)
    loss_ax = acc_ax.twinx()
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "--", color="tab:gray")
    loss_ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
