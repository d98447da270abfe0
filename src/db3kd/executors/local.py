"""The default executor: shards one after another in this process, with the caller's oracle."""

from __future__ import annotations

import time
from collections.abc import Iterator

from ..oracle import LabelOracle
from .attempts import AttemptLog
from .base import ShardDone, ShardJob, describe


class LocalExecutor:
    """Shards one after another in this process, with the caller's oracle (and its budget)."""

    name = "local"

    def run(self, job: ShardJob, shards: list[int], oracle: LabelOracle, log: AttemptLog) -> Iterator[ShardDone]:
        for s in shards:
            started, before = time.perf_counter(), oracle.queries
            try:
                arrays = job(oracle, s)
            except BaseException as e:  # also Ctrl-C: the queries it sent are recorded, then it propagates
                log.record(self.name, s, 1, oracle.queries - before, kept=False, error=describe(e))
                raise
            yield ShardDone(s, arrays, oracle.queries - before, time.perf_counter() - started)

    def summary(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return "LocalExecutor()"
