"""The one runner of sharded jobs (soft labels, synthesis, mixtures): resumable, accounted, with progress.

A job supplies its shard function and its merge (`ShardedJob`); the runner does the rest the same way for
every job: the fingerprinted shard store, the to-do list, the progress bar, the executor, the merge, and
`manifest.json` with the query accounting (`total_queries` = what the job paid before its shards, such as
reference labels, plus every kept shard's queries; `queries_sent` / `queries_discarded` from attempts.jsonl).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import BudgetExceededError
from ..executors import Executor, LocalExecutor, ShardDone, query_accounting, run_shards
from ..io import exclusive, write_json
from ..oracle import LabelOracle
from ..shards import ShardStore

MANIFEST = "manifest.json"


class ShardedJob:
    """A shard job the runner can plan, resume and merge (subclasses are picklable dataclasses).

    Subclasses set `name` (the progress bar's label) and `unit` (what it counts), and implement `fingerprint`
    (everything that determines the results besides `run_info`), `shard_sizes` (units per shard), `__call__`
    (`job(oracle, shard) -> arrays`, see `db3kd.executors.ShardJob`) and `merge` (write the results from the
    shards' arrays concatenated in shard order; return the manifest's job-specific fields).
    """

    name: str
    unit: str
    prepaid_queries: int = 0  # queries spent for the whole job before its shards (e.g. the reference labels)

    def prepare(self, oracle: LabelOracle, out: Path) -> None:
        """Work for the whole job before its shards, with the driver's oracle, once the directory is known to
        be this job's (e.g. the reference labels); sets `prepaid_queries`."""

    def progress(self, done: ShardDone) -> dict:
        """Extra figures for the progress bar after a shard (e.g. a mean distance)."""
        return {}

    def known_cost(self, shards: list[int]) -> int | None:
        """Queries `shards` will need, when known before sending any (mixtures: one each); None if not."""
        return None

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def shard_sizes(self) -> list[int]:
        raise NotImplementedError

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def merge(self, merged: dict[str, np.ndarray], out: Path) -> dict:
        raise NotImplementedError


def run_job(job: ShardedJob, oracle: LabelOracle, out_dir: str | os.PathLike, run_info: dict,
            executor: Executor | None = None, progress: bool = True) -> dict:
    """Run the shards of `job` not yet in `out_dir`, merge them all and write `manifest.json`; return it.

    `run_info` (where the data came from: teacher, dataset, split...) goes into the fingerprint and the
    manifest. `executor` computes the shards (default: in this process, with `oracle`, whose budget then caps
    the run).
    """
    with exclusive(out_dir) as out:  # one writer: a second process on the directory is refused
        return _run(job, oracle, out, run_info, executor or LocalExecutor(), progress)


def _run(job: ShardedJob, oracle: LabelOracle, out: Path, run_info: dict, executor: Executor, progress: bool) -> dict:
    # The teacher enters the fingerprint by what it is (its identity), not by where it was found (run_info's path).
    identity = {"teacher_identity": oracle.identity}
    fingerprint = {**{k: v for k, v in run_info.items() if k != "teacher"}, **identity, **job.fingerprint()}
    store = ShardStore(out, fingerprint)  # another run's directory: refused before any query
    job.prepare(oracle, out)
    sizes = job.shard_sizes()
    todo = [s for s in range(len(sizes)) if not store.done(s)]
    cost = job.known_cost(todo)
    if cost is not None and oracle.remaining is not None and cost > oracle.remaining:
        raise BudgetExceededError(oracle.queries, oracle.budget, cost, advice=(
            f"The {len(todo)} {job.name} shard(s) still to do need {cost:,} queries, known in advance: nothing was "
            "sent for them. Raise --budget-total, or ask for less."))
    bar = tqdm(total=sum(sizes), initial=sum(sizes) - sum(sizes[s] for s in todo), unit=job.unit, desc=job.name,
               disable=not progress, mininterval=1 if sys.stderr.isatty() else 30)  # sparse lines in logs

    price = getattr(oracle, "price_per_query", None)  # USD, when the teacher has a price
    spent = {"queries": 0, "units": 0}  # this invocation's, for the estimate of the whole run

    def written(done: ShardDone) -> None:
        bar.update(sizes[done.shard])
        spent["queries"] += done.queries
        spent["units"] += sizes[done.shard]
        money = {}
        if price:  # so far, and the whole job at this invocation's rate per unit
            total = spent["queries"] / spent["units"] * sum(sizes)
            money = {"spent_usd": f"{spent['queries'] * price:,.2f}", "estimate_usd": f"{total * price:,.2f}"}
        bar.set_postfix(queries_per_s=f"{done.queries / max(done.seconds, 1e-9):,.0f}", **money, **job.progress(done))

    try:
        summary = run_shards(executor, job, todo, oracle, store, written)
    finally:
        bar.close()
    merged = store.merge(range(len(sizes)))
    shard_queries = merged.pop("shard_queries")
    seconds = float(merged.pop("shard_seconds").sum())
    manifest = {**run_info, **identity, **job.merge(merged, out), "shards": len(sizes),
                "total_queries": job.prepaid_queries + int(shard_queries.sum()),
                **query_accounting(out, shard_queries.tolist()), "executor": summary, "seconds": seconds,
                "version": __version__}
    if price:
        manifest.update(price_per_1000_usd=price * 1000, cost_usd=manifest["total_queries"] * price,
                        sent_usd=manifest["queries_sent"] * price)
    write_json(out / MANIFEST, manifest)
    return manifest
