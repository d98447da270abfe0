"""Which (sample, class) pairs are worth a boundary search: those a student of the teacher's hard labels is
unsure about.

A boundary search costs up to `queries_per_pair` queries per pair; a hard label, one query per image. Most
images sit deep inside their class, where a soft label says little a hard label did not. The selector is a
student trained on the hard labels of every transfer image, which a soft-label run's reference labelling has
already paid for (no query): the images it separates least surely (the smallest gap between its two most
probable classes) get soft labels first, and for each of them the classes it finds most plausible. The pairs
left out get their sample distance (SD), free (`db3kd.jobs.soft_labels.SoftLabelJob.targets`). The same
student can guide the searches (`db3kd.robustness.guide`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..data import DatasetInfo
from ..errors import ConfigError
from ..training import TrainConfig, probabilities
from ..transfer import TransferCost, TransferSet
from .students import METRICS, train_student

SELECTIONS = ("first", "uncertain")  # which images: the first ones, or those the selector is least sure of


def margins(probs: np.ndarray) -> np.ndarray:
    """(N,) the gap between the two most probable classes of each row of (N, K) `probs`: small where the
    selector is unsure."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def select_pairs(labels: np.ndarray, count: int, select: str = "first", classes_per_image: int | None = None,
                 probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices, targets): the `count` images to search from (sorted), and a (count, K) mask of the classes to
    search toward for each (None: every other class).

    Args:
        labels: (N,) the teacher's label of every image (its own class is never a target).
        count: images to choose.
        select: "first" (the first `count`) or "uncertain" (the `count` of smallest selector margin).
        classes_per_image: search only this many classes per image, the selector's most probable other ones.
        probs: (N, K) the selector's probabilities; needed unless select is "first" and every class searched.
    """
    if select not in SELECTIONS:
        raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    n = len(labels)
    if not 0 < count <= n:
        raise ConfigError(f"expected between 1 and {n} images to select, got {count}")
    if probs is None:
        if select != "first" or classes_per_image is not None:
            raise ConfigError(f"select {select!r} with classes_per_image {classes_per_image} needs a selector's "
                              "probabilities")
        return np.arange(count), None
    if probs.shape[0] != n:
        raise ConfigError(f"expected the selector's probabilities of all {n} images, got {probs.shape[0]}")
    if select == "first":
        indices = np.arange(count)
    else:
        indices = np.sort(np.argsort(margins(probs), kind="stable")[:count])
    if classes_per_image is None:
        return indices, None
    k = probs.shape[1]
    if not 0 < classes_per_image < k:
        raise ConfigError(f"classes_per_image must be between 1 and {k - 1} (the other classes), got {classes_per_image}")
    others = probs[indices].copy()
    others[np.arange(len(indices)), labels[indices]] = -1.0  # the image's own class: never a target
    ranked = np.argsort(-others, axis=1, kind="stable")[:, :classes_per_image]
    targets = np.zeros((len(indices), k), dtype=bool)
    np.put_along_axis(targets, ranked, True, axis=1)
    return indices, targets


def train_selector(out_dir: str | os.PathLike, arch: str, info: DatasetInfo,
                   transfer: TransferSet | Callable[[], TransferSet], config: TrainConfig,
                   test: tuple[np.ndarray, np.ndarray | None], progress: bool = True) -> torch.nn.Module:
    """A selector student of `arch` trained on `transfer` (the teacher's labels, already paid for: no query; or
    a function making it, called only if needed) into `out_dir`; a finished selector there is reused, an
    interrupted one resumes. Its metrics.json records its test accuracy and what its data cost."""
    out = Path(out_dir)
    if not (out / METRICS).is_file():
        train_student(out, arch, info, transfer() if callable(transfer) else transfer, test, config,
                      extra_metrics={"method": "selector"}, progress=progress)
    return load_checkpoint(out / "model.pt")[0]


def selector_probabilities(out_dir: str | os.PathLike, arch: str, info: DatasetInfo, x: np.ndarray,
                           labels: np.ndarray, cost: TransferCost, config: TrainConfig,
                           test: tuple[np.ndarray, np.ndarray | None],
                           progress: bool = True) -> tuple[torch.nn.Module, np.ndarray]:
    """A selector (`train_selector`) trained on `x` with the teacher's `labels`, which cost `cost`, and its (N, K)
    probabilities of `x`."""
    transfer = TransferSet(x, labels.astype(np.int64), None, cost, "teacher's labels")
    model = train_selector(out_dir, arch, info, transfer, config, test, progress)
    return model, probabilities(model, x)
