"""The embedded demo: the whole DB3KD path on scikit-learn's digits, with no data files and no network,
and its zero-shot variant (ZSDB3KD), whose student sees no real image at all."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from .data import load_dataset
from .jobs import teacher_labels, train_to_dir, write_json
from .losses import KDLoss
from .mixtures import MixtureConfig, label_mixtures, read_mixtures
from .soft_labels import SoftLabelConfig, compute_soft_labels
from .synthesis import SynthesisConfig, load_pseudo_samples, synthesize
from .teachers import open_oracle
from .training import TrainConfig
from .transfer import load_transfer_set, with_hard_labels

DEMO_DATASET = "digits"
TEACHER_ARCH = "lenet5"
STUDENT_ARCH = "lenet5-half"
# The zero-shot row's synthesis (keyword arguments of SynthesisConfig; the rest are its defaults): 1,000 pseudo
# samples of 8x8 pixels, a small budget, so that the demo stays within a few minutes on 2 CPU cores.
DEMO_SYNTHESIS = {"per_class": 100, "budget_per_sample": 500, "rounds": 4}
# ... and its teacher-labelled mixtures of the pseudo samples (keyword arguments of MixtureConfig): one query
# each, hard labels only. They lift the zero-shot student from ~80% to ~92% test accuracy for 20,000 queries
# (under 3% of its total). Shifts of at most 1 pixel: the images are 8x8.
DEMO_MIXTURES = {"count": 20_000, "max_shift": 1}
# With the mixtures the zero-shot student sees 21x more images per epoch: a third of the demo's epochs (10 of
# 30; at least 1) adds about 8 s to the demo on 2 idle cores (30 epochs: +26 s for ~1 point more).
ZERO_SHOT_EPOCH_FRACTION = 1 / 3


def run_demo(out_dir: str | os.PathLike = "runs/demo", epochs: int = 30, seed: int = 0, progress: bool = True,
             synthesis: dict | None = None, mixtures: dict | None = None) -> dict:
    """Train a teacher on digits, then three students that only see its labels.

    The students never see the teacher's weights: they talk to its exported ONNX file through a
    `LabelOracle`, which counts every image sent. One student learns from the teacher's top-1 labels
    (the paper's CE-only baseline), one from DB3KD soft labels built from BD boundary distances, and one
    zero-shot (ZSDB3KD): from BD soft labels on pseudo samples synthesized from noise, no real image, plus
    teacher-labelled mixtures of them. `synthesis` overrides `DEMO_SYNTHESIS` (SynthesisConfig's keyword
    arguments), `mixtures` `DEMO_MIXTURES` (MixtureConfig's).
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
    with _one_torch_thread():
        manifest = compute_soft_labels(oracle, data.x_train, np.arange(len(data.x_train)), SoftLabelConfig(method="bd"),
                                       out / "soft-labels-bd", {"teacher": teacher_spec, "dataset": DEMO_DATASET,
                                                                "split": "train"}, progress=progress)
    transfer = load_transfer_set(out / "soft-labels-bd")
    bd = train_to_dir(out / "student-db3kd-bd", STUDENT_ARCH, data.info, (transfer.images, transfer.labels), test,
                      config, oracle=oracle, soft_logits=transfer.logits, kd=KDLoss(),
                      extra_metrics={"teacher_queries_transfer": manifest["total_queries"]}, progress=progress)

    zero_shot, synth, zs_soft, mixed = _zero_shot_student(
        out, teacher_spec, data.info, test, config, {**DEMO_SYNTHESIS, "seed": seed, **(synthesis or {})},
        {**DEMO_MIXTURES, "seed": seed, **(mixtures or {})}, progress)

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
        "pseudo_samples": synth["num_samples"],
        "synthesis_queries": synth["total_queries"],
        "zero_shot_soft_label_queries": zs_soft["total_queries"],
        "mixtures": mixed["count"],
        "mixture_queries": mixed["total_queries"],
        "rows": [row("teacher", teacher), row("student, CE on top-1 labels", ce), row("student, DB3KD-BD", bd),
                 row("student, ZSDB3KD-BD (zero-shot)", zero_shot)],
    }
    write_json(out / "summary.json", summary)
    return summary


def _zero_shot_student(out: Path, teacher_spec: str, info, test, config: TrainConfig, synthesis: dict,
                       mixtures: dict, progress: bool) -> tuple[dict, dict, dict, dict]:
    """ZSDB3KD: pseudo samples from noise, BD soft labels on them, teacher-labelled mixtures of them, a student
    on both (cross-entropy only on the mixtures); no real training image read.

    Returns the student's metrics and the synthesis, soft-label and mixtures manifests.
    """
    oracle = open_oracle(teacher_spec)
    with _one_torch_thread():
        synth = synthesize(oracle, SynthesisConfig(**synthesis), out / "synthesize", {"teacher": teacher_spec},
                           progress=progress)
        x, y, _ = load_pseudo_samples(out / "synthesize")
        # The pseudo samples' labels are the teacher's already: BD sends no labelling query for them.
        soft = compute_soft_labels(oracle, x, np.arange(len(x)), SoftLabelConfig(method="bd"), out / "soft-labels-zero-shot",
                                   {"teacher": teacher_spec, "pseudo": str(out / "synthesize"), "split": "pseudo"},
                                   progress=progress, reference_y=y, store_images=True)
        mixed = label_mixtures(oracle, x, MixtureConfig(**mixtures), out / "mixtures",
                               {"teacher": teacher_spec, "pseudo": str(out / "synthesize")}, progress=progress)
    transfer = load_transfer_set(out / "soft-labels-zero-shot")
    transfer = with_hard_labels(transfer, *read_mixtures(out / "mixtures", x)[:2])
    config = dataclasses.replace(config, epochs=max(1, round(config.epochs * ZERO_SHOT_EPOCH_FRACTION)))
    queries = synth["total_queries"] + soft["total_queries"] + mixed["total_queries"]
    metrics = train_to_dir(out / "student-zsdb3kd-bd", STUDENT_ARCH, info, (transfer.images, transfer.labels), test,
                           config, oracle=oracle, soft_logits=transfer.logits, kd=KDLoss(), progress=progress,
                           extra_metrics={"teacher_queries_transfer": queries,
                                          "teacher_queries_synthesis": synth["total_queries"],
                                          "teacher_queries_soft_labels": soft["total_queries"],
                                          "teacher_queries_mixtures": mixed["total_queries"],
                                          "transfer_set": "synthesized", "transfer_samples": len(x),
                                          "mixture_samples": mixed["count"]})
    return metrics, synth, soft, mixed


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread inside: the searches use it only to keep their books while ONNX Runtime answers,
    and its idle OpenMP threads would spin against ONNX Runtime's on the same cores (several times slower on a
    loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
