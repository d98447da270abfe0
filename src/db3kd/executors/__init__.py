"""Where the shards of a run are computed: in this process (`local`) or as Ray tasks on a cluster (`ray`).

Both executors map a picklable shard job, `job(oracle, shard) -> arrays`, over the shards still to do and
hand each finished shard back to the driver, which writes it with its `ShardStore` (`run_shards`): the run
directory is the same whichever executor made it, so a run started on Ray resumes locally and vice versa.
A shard is computed from its own seed, so its arrays are equal bit for bit across executors. Every attempt
is recorded in `RUN_DIR/attempts.jsonl` (`attempts.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from ..oracle import LabelOracle
from ..shards import ShardStore
from ..teachers import TeacherSpec
from .attempts import ATTEMPTS_FILE, AttemptLog, query_accounting
from .base import Executor, ShardDone, ShardJob, describe
from .local import LocalExecutor

__all__ = ["ATTEMPTS_FILE", "AttemptLog", "Executor", "ExecutorConfig", "LocalExecutor", "ShardDone", "ShardJob",
           "query_accounting", "run_shards"]


@dataclass(frozen=True)
class ExecutorConfig:
    """Where shards run: `local` (this process) or `ray` (each shard a Ray task, one budget for all), with, for
    ray, `address` (auto, HOST:PORT of the head, local; None: Ray's default), `workers` (None: the cluster's
    CPUs) and `max_retries` (further attempts at a shard whose worker died)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    max_retries: int = 3

    def __post_init__(self):
        def expect(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        expect(self.kind in ("local", "ray"), "kind", "one of local, ray")
        expect(self.workers is None or self.workers > 0, "workers", "a positive integer or null")
        expect(self.max_retries >= 0, "max_retries", "an integer >= 0")
        if self.kind == "local":
            for name in ("address", "workers"):
                expect(getattr(self, name) is None, name, "null unless kind is ray")

    def build(self, teacher: TeacherSpec) -> Executor:
        """The executor (Ray is imported, the teacher read for shipping and the head's address checked here)."""
        if self.kind == "local":
            return LocalExecutor()
        from .ray import RayExecutor

        return RayExecutor(teacher, address=self.address, workers=self.workers, max_retries=self.max_retries)


def run_shards(executor: Executor, job: ShardJob, shards: list[int], oracle: LabelOracle, store: ShardStore,
               on_written: Callable[[ShardDone], None] | None = None) -> dict:
    """Compute `shards` with `executor`, writing each with `store` as it arrives; the executor's summary.

    The kept attempt is logged after its shard file is in place, so a crash between the two loses a log
    line, never counts a shard twice.
    """
    log = AttemptLog(store.root / ATTEMPTS_FILE)
    for done in executor.run(job, list(shards), oracle, log):
        # What the attempt cost goes into the shard file with its results: the manifest's accounting is rebuilt
        # from the shards alone, whichever executor made them and however many runs it took.
        try:
            store.write(done.shard, **done.arrays, shard_queries=np.array([done.queries]),
                        shard_seconds=np.array([done.seconds]))
        except OSError as e:  # a full disk: the shard is lost, its queries are not
            log.record(executor.name, done.shard, done.attempt, done.queries, kept=False, error=describe(e))
            raise DataError(f"cannot write shard {done.shard} to {store.root} ({e.strerror or e}); the "
                            f"{done.queries:,} queries it cost are recorded as discarded in {ATTEMPTS_FILE}. Free "
                            "space and rerun the same command: finished shards are kept") from e
        log.record(executor.name, done.shard, done.attempt, done.queries, kept=True)
        if on_written is not None:
            on_written(done)
    return executor.summary()
