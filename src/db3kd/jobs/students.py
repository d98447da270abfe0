"""Train a model on a transfer set into a run directory: `model.pt`, `model.onnx`, `metrics.json`, `curve.png`.

Every student (the CLI's `distill` and `train-student`, every recipe stage, the demo) and every teacher
db3kd trains goes through `train_student`, which writes the one metrics.json layout the report reads: the
transfer set's description and its `TransferCost` (`teacher_queries`, with the evaluation queries apart).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import ModelSpec, export_onnx, save_checkpoint
from ..data import DatasetInfo
from ..io import write_json
from ..losses import KDLoss
from ..models import build_model, count_parameters
from ..oracle import LabelOracle
from ..training import TrainConfig, accuracy, predict, train_classifier
from ..transfer import TransferSet

METRICS = "metrics.json"
TRAIN_STATE = "train_state.pt"  # the training's state after its last finished epoch, while it runs


def teacher_labels(oracle: LabelOracle, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The teacher's top-1 labels of `x` and the queries they cost."""
    before = oracle.queries
    labels = oracle.labels(x)
    return labels, oracle.queries - before


def train_student(out_dir: str | os.PathLike, arch: str, info: DatasetInfo, transfer: TransferSet,
                  test: tuple[np.ndarray, np.ndarray | None], config: TrainConfig, kd: KDLoss | None = None,
                  oracle: LabelOracle | None = None, extra_metrics: dict | None = None,
                  progress: bool = True) -> dict:
    """Train `arch` on `transfer` into `out_dir`, evaluate it on `test`, and write the run directory.

    The loss is cross-entropy on the transfer set's labels, or with `kd` the distillation loss against its
    soft-label logits. `test` is (images, labels), labels None for unlabelled images: then no accuracy is
    given (None), only fidelity. Given an oracle, the student's fidelity (agreement with the teacher's labels
    on the test images) is measured, its queries recorded as the cost's `evaluation`. Training resumes from
    its last finished epoch after a crash (the state in `out_dir`). Returns the metrics written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch=arch, input_shape=info.input_shape, num_classes=info.num_classes, dataset=info.name)
    with torch.random.fork_rng():  # the initial weights come from the seed alone, and the caller's RNG is untouched
        torch.manual_seed(config.seed)
        model = build_model(arch, info.input_shape, info.num_classes)
    metrics: dict = {"arch": arch, "dataset": info.name, "parameters": count_parameters(model),
                     "train_samples": len(transfer.images), "version": __version__, **(extra_metrics or {}),
                     **transfer.description()}
    x_test, y_test = test
    evaluate = None if y_test is None else (lambda m: {"test_accuracy": accuracy(m, x_test, y_test)})
    started = time.perf_counter()
    result = train_classifier(model, transfer.images, transfer.labels, config, evaluate=evaluate, progress=progress,
                              soft_logits=None if kd is None else transfer.logits, kd=kd,
                              checkpoint=out / TRAIN_STATE, holdout_pool=transfer.samples)  # not mixtures
    save_checkpoint(out / "model.pt", model.cpu(), spec)
    onnx_path = export_onnx(model, spec, out / "model.onnx")
    cost = transfer.cost
    if oracle is not None:
        labels, queries = teacher_labels(oracle, x_test)
        cost = replace(cost, evaluation=queries)
        metrics["fidelity"] = float((predict(model, x_test) == labels).mean())
    metrics.update(
        test_accuracy=result.final_accuracy,  # of the kept weights: the final epoch's, or the hold-out's choice
        test_labelled=y_test is not None,
        epochs=result.plan.epochs,
        chosen_epoch=result.chosen_epoch,
        plan=asdict(result.plan),
        seconds=round(time.perf_counter() - started, 2),
        onnx_argmax_agreement=onnx_agreement(onnx_path, model, x_test),
        config=config.to_dict(),
        loss=asdict(kd) if kd is not None else "cross-entropy",
        teacher_queries=cost.to_dict(),
        history=result.history,
    )
    if result.resumed_from_epoch:
        metrics["resumed_from_epoch"] = result.resumed_from_epoch
    write_json(out / METRICS, metrics)
    plot_curve(result.history, out / "curve.png", title=f"{arch} on {info.name}")
    return metrics


def student_summary(metrics: dict) -> str:
    """One line on a trained student: accuracy (or why there is none), fidelity, the epoch kept."""
    parts = [f"test accuracy {metrics['test_accuracy']:.4f}" if metrics["test_accuracy"] is not None
             else "no test accuracy (unlabelled test images)"]
    if "fidelity" in metrics:
        parts.append(f"fidelity {metrics['fidelity']:.4f}")
    kept = "final" if metrics["chosen_epoch"] == metrics["epochs"] else "hold-out's choice"
    parts.append(f"epoch {metrics['chosen_epoch']}/{metrics['epochs']} kept ({kept})")
    return ", ".join(parts)


def onnx_agreement(onnx_path: Path, model, x: np.ndarray) -> float:
    """Fraction of `x` on which the exported ONNX file and the PyTorch model give the same arg-max."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_labels = np.concatenate(
        [session.run(None, {"image": x[i:i + 1000]})[0].argmax(axis=1) for i in range(0, len(x), 1000)]
    )
    return float((onnx_labels == predict(model, x)).mean())


def plot_curve(history: list[dict], path: Path, title: str) -> Path:
    """Test accuracy (where measured), hold-out agreement and training loss per epoch, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    acc_ax = fig.subplots()
    for key, style, label in (("test_accuracy", "o-", "test accuracy"), ("holdout_agreement", "s:", "hold-out agreement")):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            acc_ax.plot(*zip(*points), style, label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    loss_ax = acc_ax.twinx()
    loss_ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "--", color="tab:gray")
    loss_ax.set_ylabel("training loss")
    if acc_ax.lines:
        acc_ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
