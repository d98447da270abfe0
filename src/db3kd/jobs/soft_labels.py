"""Soft labels for a set of samples: boundary distances toward every class, computed shard by shard.

This is the job behind `db3kd soft-labels`. It asks the teacher for the labels of the reference samples
(the candidate directions, normally the whole split) once, then runs an SD / BD / MBD estimator over the
selected samples in shards (`db3kd.jobs.runner`), so an interrupted run resumes where it stopped. The merged
result is `soft_labels.npz` with distances and the paper's logits, and `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checks import integer
from ..data.images import ImageStore
from ..errors import BudgetExceededError, ConfigError, DataError, TeacherError
from ..executors import ATTEMPTS_FILE, AttemptLog, Executor
from ..executors.base import describe
from ..io import load_npz, save_npz
from ..oracle import LabelOracle
from ..robustness import ESTIMATORS, distances_to_logits, estimator_from_name
from ..robustness.guide import check_guide
from .runner import ShardedJob, run_job

RESULTS = "soft_labels.npz"


@dataclass
class SoftLabelConfig:
    """What determines a soft-label run's results (its shards are refused if any of this changes).

    Args:
        method: the estimator: sd, bd or mbd (`db3kd.robustness`).
        params: its hyper-parameters (checked by the estimator itself).
        seed: seeds randomised estimators (mbd's probes).
        shard_size: samples per shard: ~4500 pairs, a few seconds of BD work, a small loss on a crash.
        save_points: also keep the boundary point of every pair (N x K images: for subsets).
    """

    method: str = "bd"
    params: dict = field(default_factory=dict)
    seed: int = 0
    shard_size: int = 500
    save_points: bool = False

    def __post_init__(self):
        integer(self.shard_size, "shard_size", 1)
        try:
            self.estimator = estimator_from_name(self.method, **self.params)
        except ConfigError as e:  # say which field: an unknown method, or its parameters
            raise ConfigError(f"{'method' if self.method not in ESTIMATORS else 'params'}: {e}") from None


def read_indices(path: str | os.PathLike, size: int) -> np.ndarray:
    """Dataset indices from a text file (one per line) or a .npy of integers, checked against `size`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"indices file not found: {path}")
    try:
        raw = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{path}: expected one integer dataset index per line (or a .npy of integers): {e}") from e
    return check_indices(np.asarray(raw), size, str(path))


def check_indices(indices: np.ndarray, size: int, source: str = "indices") -> np.ndarray:
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or len(indices) == 0:
        raise DataError(f"{source}: expected a non-empty list of integers, got shape {indices.shape} dtype {indices.dtype}")
    bad = indices[(indices < 0) | (indices >= size)]
    if len(bad):
        raise DataError(f"{source}: index {int(bad[0])} is outside the split's range [0, {size})")
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{source}: index {int(unique[counts > 1][0])} appears more than once")
    return indices.astype(np.int64)


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: what a run records of a student that chose or guided its queries."""
    return digest(*(t.detach().cpu().numpy() for t in model.state_dict().values()))


def digest(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' bytes: what a run records of data no dataset name identifies (indices, pseudo samples)."""
    h = hashlib.sha256()
    for array in arrays:
        for _, part in array.chunks() if isinstance(array, ImageStore) else [(0, array)]:  # a folder: in chunks
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


@dataclass
class SoftLabelJob(ShardedJob):
    """The estimator over shards of samples (a `db3kd.jobs.runner.ShardedJob`; a shard may run on a Ray worker).

    `reference_labels` are the teacher's labels of `x` when already known (pseudo samples, labelled during
    synthesis); otherwise `prepare` asks for them once and keeps them in the run directory.
    """

    config: SoftLabelConfig
    x: np.ndarray = field(repr=False)  # the whole split: the references
    indices: np.ndarray = field(repr=False)  # which samples of x get soft labels
    # (len(indices), K) the pairs to search; the others get their sample distance (SD), free. None: every pair.
    targets: np.ndarray | None = field(default=None, repr=False)
    guide: torch.nn.Module | None = field(default=None, repr=False)  # a student guiding BD (robustness.guide)
    reference_labels: np.ndarray | None = field(default=None, repr=False)
    store_images: bool = False  # also store x[indices] (pseudo samples, which no dataset holds)
    synthesis_queries: int = 0  # what made x (pseudo samples): recorded for the transfer set's cost
    num_classes: int = 2
    out: str = ""  # the run directory, for messages
    prepaid_queries: int = 0
    unit = "pair"

    @property
    def name(self) -> str:
        return f"{self.config.method} soft labels"

    def fingerprint(self) -> dict:
        c = self.config
        return {"method": c.method, "params": c.params, "seed": c.seed, "shard_size": c.shard_size,
                "save_points": c.save_points, "num_samples": len(self.indices),
                "indices_sha256": digest(self.indices.astype(np.int64)), "split_size": len(self.x),
                **({} if self.targets is None else {"targets_sha256": digest(self.targets)}),
                **({} if self.guide is None else {"guide_sha256": model_digest(self.guide)})}

    def prepare(self, oracle: LabelOracle, out: Path) -> None:
        self.out = str(out)
        if self.reference_labels is None:
            self.reference_labels, self.prepaid_queries = reference_labels(out, oracle, self.x)

    def chunk(self, shard: int) -> np.ndarray:
        return self.indices[self._rows(shard)]

    def _rows(self, shard: int) -> slice:
        return slice(shard * self.config.shard_size, (shard + 1) * self.config.shard_size)

    def shard_sizes(self) -> list[int]:
        n = -(-len(self.indices) // self.config.shard_size)
        if self.targets is not None:  # own-class pairs are never searched, whatever the mask says
            searched = self.targets & (np.arange(self.num_classes) != self.reference_labels[self.indices, None])
            return [int(searched[self._rows(s)].sum()) for s in range(n)]
        return [len(self.chunk(s)) * (self.num_classes - 1) for s in range(n)]

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        idx = self.chunk(shard)
        y = self.reference_labels
        targets = None if self.targets is None else self.targets[self._rows(shard)]
        result = self.config.estimator(oracle, self.x[idx], y[idx], self.x, y, targets=targets, seed=self.config.seed,
                                       return_points=self.config.save_points, guide=self.guide)
        if targets is not None:
            # A pair not searched gets its sample distance: an upper bound of the boundary distance, which the
            # reference labels already paid for (no query).
            free = result.sample_distances
            result.distances = np.where(targets, result.distances, free)
            if result.distances_at is not None:
                result.distances_at = np.where(targets[None], result.distances_at, free[None])
        if result.budget_exhausted:
            raise BudgetExceededError(oracle.queries, oracle.budget, result.refused, advice=(
                f"It ran out during shard {shard}; finished shards are kept in {self.out}: rerun the same command "
                "with a larger budget to resume."))
        arrays = dict(indices=idx, labels=y[idx], distances=result.distances, queries=result.queries)
        if result.distances_at is not None:
            arrays["distances_at"] = np.moveaxis(result.distances_at, 0, 1)  # (n, checkpoints, K): concatenable
            arrays["checkpoints"] = np.array([result.checkpoints])
        if self.config.save_points:
            arrays["points"] = result.points
        return arrays

    def merge(self, merged: dict[str, np.ndarray], out: Path) -> dict:
        arrays = {key: merged[key] for key in ("indices", "labels", "distances", "queries")}
        if self.store_images:
            arrays["images"] = self.x[merged["indices"]]
        arrays["logits"] = distances_to_logits(merged["distances"], merged["labels"])
        if "distances_at" in merged:
            arrays["distances_at"] = np.moveaxis(merged["distances_at"], 1, 0)  # (checkpoints, N, K)
            arrays["checkpoints"] = merged["checkpoints"][0]
        if "points" in merged:
            arrays["points"] = merged["points"]
        save_npz(out / RESULTS, **arrays)
        distances, queries = arrays["distances"], arrays["queries"]
        finite = np.isfinite(distances)
        pair_mask = finite | (queries > 0)
        return {"method": self.config.method, "params": self.config.params, "estimator": repr(self.config.estimator),
                "seed": self.config.seed, "num_samples": int(len(arrays["indices"])),
                "reference_label_queries": self.prepaid_queries, "estimator_queries": int(queries.sum()),
                "synthesis_queries": self.synthesis_queries,
                "queries_per_pair": float(queries.sum() / max(pair_mask.sum(), 1)),
                "median_distance": float(np.median(distances[finite])) if finite.any() else None}


def reference_labels(out: Path, oracle: LabelOracle, reference_x: np.ndarray) -> tuple[np.ndarray, int]:
    """The teacher's labels of the reference samples, asked once per run directory and kept there (for this
    teacher and these images only). Their queries are recorded in attempts.jsonl whatever happens next."""
    path = out / "reference_labels.npz"
    key = json.dumps({"teacher_identity": oracle.identity, "images_sha256": digest(reference_x)})
    if path.exists():
        cached = load_npz(path, "delete it and rerun: the references are labelled again")
        if str(cached.get("key")) == key:
            return _two_classes(cached["labels"], oracle), int(cached["queries"])
    n = len(reference_x)
    if oracle.remaining is not None and oracle.remaining < n:
        raise BudgetExceededError(oracle.queries, oracle.budget, n, advice=(
            f"Labelling the split's {n:,} reference images (the candidate directions, once per run directory) "
            "needs that many queries before any soft label: nothing was sent. Raise --budget-total."))
    log, before = AttemptLog(out / ATTEMPTS_FILE), oracle.queries
    try:
        labels = oracle.labels(reference_x)
        save_npz(path, labels=labels, queries=oracle.queries - before, key=key)
    except BaseException as e:  # the queries sent are paid for: recorded before anything else
        log.record("driver", None, 1, oracle.queries - before, kept=False, error=describe(e))
        if isinstance(e, OSError):
            raise DataError(f"cannot write {path} ({e.strerror or e}): the {oracle.queries - before:,} queries of "
                            f"the reference labels are recorded in {ATTEMPTS_FILE} but their answers are lost. Free "
                            "space and rerun the same command") from e
        raise
    log.record("driver", None, 1, oracle.queries - before, kept=True)
    return _two_classes(labels, oracle), oracle.queries - before


def _two_classes(labels: np.ndarray, oracle: LabelOracle) -> np.ndarray:
    """`labels` if the teacher gave the references at least two classes (else no class has a direction)."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise TeacherError(f"teacher {oracle.name} labels all {len(labels):,} reference images class {classes[0]}: no "
                           "other class has a sample to search toward. Is it the teacher of this data?")
    return labels


def compute_soft_labels(oracle: LabelOracle, x: np.ndarray, indices: np.ndarray, config: SoftLabelConfig,
                        out_dir: str | os.PathLike, run_info: dict, progress: bool = True,
                        reference_y: np.ndarray | None = None, store_images: bool = False,
                        synthesis_queries: int = 0, executor: Executor | None = None,
                        targets: np.ndarray | None = None, guide: torch.nn.Module | None = None) -> dict:
    """Distances and soft labels for `x[indices]`, with `x` (the whole split) as the reference samples, into
    `out_dir` (soft_labels.npz, manifest.json; resumed from its shards). Returns the manifest.

    `oracle`'s budget caps the run; `run_info` (teacher, dataset, split) goes into the fingerprint and the
    manifest. For pseudo samples, `reference_y` are their labels (asked during synthesis: none are asked
    again), `store_images` keeps the images in soft_labels.npz and `synthesis_queries` records what made them.
    `executor` (`db3kd.executors`) computes the shards, here by default. `targets`, a (len(indices), K) boolean
    mask, limits the search to those pairs; the others get their sample distance (SD: no query). `guide`, a
    student of the teacher, gives BD and MBD its adversarial directions to search first.
    """
    if guide is not None:  # before any query
        check_guide(guide, tuple(oracle.input_shape), oracle.num_classes)
    if targets is not None and np.shape(targets) != (len(indices), oracle.num_classes):
        raise ConfigError(f"expected targets as a ({len(indices)}, {oracle.num_classes}) mask, got {np.shape(targets)}")
    job = SoftLabelJob(config, x, indices, None if targets is None else np.asarray(targets, dtype=bool),
                       guide, None if reference_y is None else np.asarray(reference_y, dtype=np.int64),
                       store_images, synthesis_queries, oracle.num_classes)
    info = {**run_info, "teacher_input_shape": list(oracle.input_shape), "num_classes": oracle.num_classes}
    return run_job(job, oracle, out_dir, info, executor, progress)
