"""What every executor shares: the shard job it maps, the finished shard it hands back, its own protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..oracle import LabelOracle
from .attempts import AttemptLog


class ShardJob(Protocol):
    """The work of one shard: arrays to store, from the teacher queried through `oracle` only.

    Must be picklable (it is shipped to Ray workers) and depend on nothing but its shard number and its
    own data, so that any worker, in any order, computes the same arrays.
    """

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]: ...


@dataclass
class ShardDone:
    """A finished shard, as handed back to the driver."""

    shard: int
    arrays: dict[str, np.ndarray]
    queries: int  # teacher queries of the attempt that made `arrays`
    seconds: float
    attempt: int = 1


class Executor(Protocol):
    """Where shards are computed. `run` yields each shard as it finishes (in any order); the caller writes it."""

    name: str

    def run(self, job: ShardJob, shards: list[int], oracle: LabelOracle, log: AttemptLog) -> Iterator[ShardDone]:
        """Compute `shards` of `job`; `oracle` is the driver's (its budget caps the whole run); every attempt
        whose result is not handed back is recorded in `log` with the queries it sent."""

    def summary(self) -> dict:
        """What the manifest records about where the last run went (address, workers, worker queries)."""


def describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"
