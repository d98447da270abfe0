"""Soft labels for a set of samples: boundary distances toward every class, computed shard by shard.

This is the job behind `db3kd soft-labels`. It asks the teacher for the labels of the reference samples
(the candidate directions, normally the whole split) once, then runs an SD / BD / MBD estimator over the
selected samples in shards written as they finish, so an interrupted run resumes where it stopped. The
merged result is `soft_labels.npz` with distances and the paper's logits, and `manifest.json`.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .errors import BudgetExceededError, ConfigError, DataError
from .executors import ATTEMPTS_FILE, AttemptLog, LocalExecutor, ShardDone, query_accounting, run_shards
from .jobs import write_json
from .oracle import LabelOracle
from .robustness import ESTIMATORS, distances_to_logits, estimator_from_name
from .shards import ShardStore, save_npz_atomic


@dataclass
class SoftLabelConfig:
    """What determines a soft-label run's results (its shards are refused if any of this changes)."""

    method: str = "bd"  # sd | bd | mbd
    params: dict = field(default_factory=dict)  # estimator hyper-parameters (see db3kd.robustness)
    seed: int = 0
    shard_size: int = 500  # samples per shard: ~4500 pairs, a few seconds of BD work, small loss on a crash
    save_points: bool = False

    def __post_init__(self):
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        params = dict(self.params)
        if self.method in ESTIMATORS and "seed" in inspect.signature(ESTIMATORS[self.method]).parameters:
            params["seed"] = self.seed  # deterministic estimators take none
        self.estimator = estimator_from_name(self.method, **params)


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


def reference_labels(store: ShardStore, oracle: LabelOracle, reference_x: np.ndarray) -> tuple[np.ndarray, int]:
    """The teacher's labels of the reference samples, asked once per run directory and kept there."""
    path = store.root / "reference_labels.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            return cached["labels"], int(cached["queries"])
    before = oracle.queries
    labels = oracle.labels(reference_x)
    queries = oracle.queries - before
    save_npz_atomic(path, labels=labels, queries=queries)
    AttemptLog(store.root / ATTEMPTS_FILE).record("driver", None, 1, queries, kept=True)
    return labels, queries


def compute_soft_labels(
    oracle: LabelOracle,
    x: np.ndarray,
    indices: np.ndarray,
    config: SoftLabelConfig,
    out_dir: str | os.PathLike,
    run_info: dict,
    progress: bool = True,
    reference_y: np.ndarray | None = None,
    store_images: bool = False,
    executor=None,
) -> dict:
    """Distances and soft labels for `x[indices]`, with `x` (the whole split) as reference samples.

    Args:
        oracle: the teacher.
        x: (M, C, H, W) images of the split; also the candidate directions.
        indices: which samples of `x` to label.
        config: method, estimator parameters, seed, sharding.
        out_dir: run directory; shards resume from it.
        run_info: what the manifest records about where the data came from (teacher spec, dataset,
            split); part of the fingerprint.
        reference_y: the teacher's labels of `x` when already known (pseudo samples of `db3kd synthesize`,
            labelled during synthesis): no labelling queries are then sent.
        store_images: also store `x[indices]` as `images` in soft_labels.npz (pseudo samples, which no
            dataset holds).
        executor: where the shards are computed (`db3kd.executors`); default in this process. The
            reference labels are always asked here, with `oracle`, whose budget then caps the executor's.

    Returns the manifest (also written to out_dir/manifest.json); arrays go to out_dir/soft_labels.npz.
    """
    out = Path(out_dir)
    fingerprint = {**run_info, "method": config.method, "params": config.params, "seed": config.seed,
                   "shard_size": config.shard_size, "save_points": config.save_points,
                   "num_samples": len(indices), "indices_sha256": _sha256(indices), "split_size": len(x),
                   "teacher_input_shape": list(oracle.input_shape), "num_classes": oracle.num_classes}
    store = ShardStore(out, fingerprint)
    if reference_y is None:
        ref_labels, label_queries = reference_labels(store, oracle, x)
    else:
        ref_labels, label_queries = np.asarray(reference_y, dtype=np.int64), 0
    k = oracle.num_classes
    chunks = [indices[i:i + config.shard_size] for i in range(0, len(indices), config.shard_size)]
    shards = range(len(chunks))
    todo = [s for s in shards if not store.done(s)]
    pairs_per_sample = k - 1
    bar = tqdm(total=len(indices) * pairs_per_sample, unit="pair", desc=f"{config.method} soft labels",
               disable=not progress, mininterval=1 if sys.stderr.isatty() else 30)  # sparse lines in logs
    bar.update((len(indices) - sum(len(chunks[s]) for s in todo)) * pairs_per_sample)

    def written(done: ShardDone) -> None:
        bar.update(len(chunks[done.shard]) * pairs_per_sample)
        bar.set_postfix(queries_per_s=f"{done.queries / max(done.seconds, 1e-9):,.0f}")

    job = SoftLabelShard(config, x, ref_labels, chunks, str(out))
    try:
        summary = run_shards(executor or LocalExecutor(), job, todo, oracle, store, written)
    finally:
        bar.close()
    return _finish(store, shards, label_queries, run_info, config, out, x if store_images else None, summary)


@dataclass
class SoftLabelShard:
    """The estimator over one shard's samples (a `db3kd.executors.ShardJob`: it may run on a Ray worker)."""

    config: SoftLabelConfig
    x: np.ndarray  # the whole split: the references
    reference_labels: np.ndarray
    chunks: list[np.ndarray]  # dataset indices of each shard
    out: str  # the run directory, for messages

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        idx = self.chunks[shard]
        started, before = time.perf_counter(), oracle.queries
        result = _estimate(self.config, oracle, self.x, idx, self.reference_labels)
        if result.budget_exhausted:
            raise BudgetExceededError(oracle.queries, oracle.budget, 1, advice=(
                f"It ran out during shard {shard}; finished shards are kept in {self.out}: rerun the same command "
                "with a larger budget to resume."))
        arrays = dict(indices=idx, labels=self.reference_labels[idx], distances=result.distances,
                      queries=result.queries, shard_queries=np.array([oracle.queries - before]),
                      shard_seconds=np.array([time.perf_counter() - started]))
        if result.distances_at is not None:
            arrays["distances_at"] = np.moveaxis(result.distances_at, 0, 1)  # (n, checkpoints, K): concatenable
            arrays["checkpoints"] = np.array([result.checkpoints])
        if self.config.save_points:
            arrays["points"] = result.points
        return arrays


def _estimate(config: SoftLabelConfig, oracle, x, idx, ref_labels):
    if config.method == "sd":
        return config.estimator(x[idx], ref_labels[idx], x, ref_labels, oracle.num_classes)
    return config.estimator(oracle, x[idx], ref_labels[idx], x, ref_labels, return_points=config.save_points)


def _finish(store: ShardStore, shards: range, label_queries: int, run_info: dict, config: SoftLabelConfig, out: Path,
            images: np.ndarray | None = None, executor: dict | None = None) -> dict:
    merged = store.merge(shards)
    arrays = {key: merged[key] for key in ("indices", "labels", "distances", "queries")}
    if images is not None:
        arrays["images"] = images[merged["indices"]]
    arrays["logits"] = distances_to_logits(merged["distances"], merged["labels"])
    if "distances_at" in merged:
        arrays["distances_at"] = np.moveaxis(merged["distances_at"], 1, 0)  # (checkpoints, N, K)
        arrays["checkpoints"] = merged["checkpoints"][0]
    if "points" in merged:
        arrays["points"] = merged["points"]
    save_npz_atomic(out / "soft_labels.npz", **arrays)
    pair_mask = np.isfinite(arrays["distances"]) | (arrays["queries"] > 0)
    estimator_queries = int(merged["shard_queries"].sum())
    manifest = {
        **run_info,
        "method": config.method,
        "params": config.params,
        "estimator": repr(config.estimator),
        "seed": config.seed,
        "num_samples": int(len(arrays["indices"])),
        "shards": len(shards),
        "total_queries": estimator_queries + label_queries,
        "reference_label_queries": label_queries,
        "estimator_queries": estimator_queries,
        **query_accounting(out, merged["shard_queries"].tolist()),
        "executor": executor or LocalExecutor().summary(),
        "queries_per_pair": float(arrays["queries"].sum() / max(pair_mask.sum(), 1)),
        "median_distance": float(np.median(arrays["distances"][np.isfinite(arrays["distances"])])) if np.isfinite(arrays["distances"]).any() else None,
        "seconds": float(merged["shard_seconds"].sum()),
        "version": __version__,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.int64).tobytes()).hexdigest()
