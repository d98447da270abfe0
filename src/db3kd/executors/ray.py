"""Shards as Ray tasks on a cluster, each with its own oracle, under one query budget for the whole run.

Every shard is a task with its own oracle on the teacher (the model file shipped through the object store,
or the URL of a label service each worker opens itself); one `SharedBudget` actor keeps the ledger of the
whole run, and each worker oracle reserves its queries there before sending them, so the run's total never
exceeds the budget however many workers there are. A task whose worker dies is retried (at most
`max_retries` times); only the attempt that finishes is written.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import BudgetExceededError, ConfigError, DB3KDError, ExecutorError, TeacherError
from ..oracle import LabelOracle
from ..teachers import TeacherSpec
from .attempts import AttemptLog
from .base import ShardDone, ShardJob, describe

RAY_INSTALL = "pip install 'db3kd[ray]'"


def import_ray():
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray, an optional extra of db3kd that is not installed here: "
                          f"{RAY_INSTALL} (or pip install ray) in this environment and on every node of the "
                          f"cluster") from e
    return ray


@functools.lru_cache(maxsize=4)
def _backend(teacher: TeacherSpec, threads: int):
    """The teacher's backend in this worker process: loaded once per worker, not once per shard."""
    return teacher.load(threads=threads)


class SharedBudget:
    """The query ledger of a distributed run (a Ray actor: its methods run one at a time).

    Workers reserve queries before sending and settle what they sent; a reservation never settled (its
    worker died) stays counted, since those queries may have reached the teacher. So the queries sent
    by all workers together never exceed `budget`.
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self._attempts: dict[int, list[dict]] = {}  # shard -> one {"queries", "in_flight"} per attempt
        self._sent = 0
        self._in_flight = 0

    def begin(self, shard: int) -> int:
        """A new attempt at `shard`; its number (1 for the first)."""
        attempts = self._attempts.setdefault(shard, [])
        attempts.append({"queries": 0, "in_flight": 0})
        return len(attempts)

    def reserve(self, shard: int, attempt: int, n: int) -> tuple[bool, int, int | None]:
        """(granted, queries used or reserved so far, budget)."""
        used = self._sent + self._in_flight
        if self.budget is not None and used + n > self.budget:
            return False, used, self.budget
        self._attempts[shard][attempt - 1]["in_flight"] += n
        self._in_flight += n
        return True, used + n, self.budget

    def settle(self, shard: int, attempt: int, reserved: int, sent: int) -> None:
        entry = self._attempts[shard][attempt - 1]
        entry["in_flight"] -= reserved
        entry["queries"] += sent
        self._in_flight -= reserved
        self._sent += sent

    def sync(self) -> None:
        """Returns once every call a worker made before it has been applied (calls from one caller run in order)."""

    def attempts(self, shard: int) -> list[dict]:
        return [dict(a) for a in self._attempts.get(shard, [])]

    def totals(self) -> dict:
        return {"shared_budget": self.budget, "worker_queries": self._sent, "worker_unconfirmed": self._in_flight}


class _LedgerClient:
    """A worker oracle's view of the `SharedBudget` actor (implements `oracle.QueryLedger`)."""

    def __init__(self, actor, shard: int, attempt: int):
        self._actor, self._shard, self._attempt = actor, shard, attempt

    def reserve(self, n: int) -> None:
        import ray

        granted, used, budget = ray.get(self._actor.reserve.remote(self._shard, self._attempt, n))
        if not granted:
            raise BudgetExceededError(used, budget, n, advice=(
                "The total budget (--budget-total) is shared by all workers of the run; finished shards are "
                "kept: rerun the same command, with a larger budget, to resume."))

    def settle(self, reserved: int, sent: int) -> None:
        # Not waited for: the next reserve, or the task's final sync, comes after it in the actor's queue.
        self._actor.settle.remote(self._shard, self._attempt, reserved, sent)


@dataclass
class _Outcome:
    shard: int
    attempt: int
    arrays: dict | None
    queries: int
    seconds: float
    error: DB3KDError | None = None


def _run_shard(job: ShardJob, teacher: TeacherSpec, shard: int, ledger, contract: tuple, threads: int) -> _Outcome:
    """One attempt at a shard, on a Ray worker."""
    import warnings

    import ray
    import torch

    # The job's arrays are read-only views of the object store, shared by the node's workers; jobs only read
    # them, so torch's warning about tensors on non-writable memory says nothing here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    attempt = ray.get(ledger.begin.remote(shard))
    # torch only does the searches' bookkeeping (or is the teacher, with this task's CPUs): more threads than
    # the task's CPUs would spin against the other workers on the same node.
    torch.set_num_threads(threads)
    started = time.perf_counter()
    oracle = None
    try:
        oracle = LabelOracle(_backend(teacher, threads), ledger=_LedgerClient(ledger, shard, attempt))
        found = (tuple(oracle.input_shape), oracle.num_classes, tuple(oracle.bounds))
        if found != contract:
            raise TeacherError(f"the teacher opened on worker {ray.get_runtime_context().get_node_id()[:8]} has "
                               f"(input shape, classes, bounds) {found}; the driver's has {contract}")
        arrays, error = job(oracle, shard), None
    except DB3KDError as e:  # handed back as a result: the driver decides, and Ray does not retry it
        arrays, error = None, e
    finally:
        ray.get(ledger.sync.remote())  # every settle applied before the driver reads this attempt's count
    return _Outcome(shard, attempt, arrays, oracle.queries if oracle else 0, time.perf_counter() - started, error)


class RayExecutor:
    """Each shard a Ray task with its own oracle; one query budget across all of them.

    Args:
        teacher: what the workers open: a model file travels with the job (no shared file system needed),
            a label service is reached by URL, with the spec's API key.
        address: the cluster: "auto" (the one started on this machine with `ray start --head`),
            "HOST:PORT" of its head, "local" (a new Ray instance on this machine), or None (Ray's default:
            $RAY_ADDRESS, else the latest cluster started here, else a new instance). Ignored when Ray is
            already initialised in this process.
        workers: shards computed at once; default the cluster's CPUs / cpus_per_worker.
        max_retries: further attempts at a shard whose worker died (a DB3KD error is not retried).
        cpus_per_worker: CPUs each task asks of Ray (and its teacher's and torch's threads).
    """

    name = "ray"

    def __init__(self, teacher: TeacherSpec | str | os.PathLike, address: str | None = None,
                 workers: int | None = None, max_retries: int = 3, cpus_per_worker: int = 1):
        import_ray()  # fail before any work if Ray is missing
        for label, value, low in (("workers", workers, 1), ("max_retries", max_retries, 0),
                                  ("cpus_per_worker", cpus_per_worker, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        self.teacher = TeacherSpec.parse(teacher).shippable()  # read here: a missing file fails before any work
        if address is not None:
            _check_reachable(address)
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.cpus_per_worker = cpus_per_worker
        self._summary: dict = {"name": self.name, "address": address}

    def __repr__(self) -> str:
        return (f"RayExecutor({self.teacher.text!r}, address={self.address!r}, workers={self.workers}, "
                f"max_retries={self.max_retries}, cpus_per_worker={self.cpus_per_worker})")

    def connect(self):
        """Join (or start) the Ray cluster unless this process already has; the `ray` module."""
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                # `ray start --head` turns token authentication on (Ray >= 2.59); a driver joining by HOST:PORT
                # must then turn it on too, and `auto` on the head finds it by itself.
                auth = ("" if os.environ.get("RAY_AUTH_MODE") else
                        " If the cluster uses token authentication, set RAY_AUTH_MODE=token here, with its token in "
                        "~/.ray/auth_token or $RAY_AUTH_TOKEN.")
                raise ExecutorError(
                    f"cannot join the Ray cluster at {self.address or 'Ray default address'}: "
                    f"{str(e).rstrip('.')}. Start one with `ray start --head` (see the README, 'Running on a Ray "
                    f"cluster') or pass --ray-address HOST:PORT of its head.{auth}") from e
        return ray

    def run(self, job: ShardJob, shards: list[int], oracle: LabelOracle, log: AttemptLog) -> Iterator[ShardDone]:
        self._summary = {"name": self.name, "address": self.address}  # one executor may serve several runs
        if not shards:
            return
        ray = self.connect()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = self.workers or max(1, cpus // self.cpus_per_worker)
        self._summary = {"name": self.name, "address": self.address, "workers": workers,
                         "cluster_cpus": cpus, "max_retries": self.max_retries,
                         "cpus_per_worker": self.cpus_per_worker}
        # What the worker oracles may spend: the driver's budget (None: unlimited) less what it spent itself.
        ledger = ray.remote(num_cpus=0)(SharedBudget).remote(oracle.remaining)
        task = ray.remote(_run_shard).options(num_cpus=self.cpus_per_worker, max_retries=self.max_retries,
                                              retry_exceptions=False)
        job_ref, teacher_ref = ray.put(job), ray.put(self.teacher)  # once, shared by every task
        contract = (tuple(oracle.input_shape), oracle.num_classes, tuple(oracle.bounds))
        queue, pending = list(shards), {}
        failure: BaseException | None = None
        try:
            while queue or pending:
                while queue and failure is None and len(pending) < workers:
                    s = queue.pop(0)
                    pending[task.remote(job_ref, teacher_ref, s, ledger, contract, self.cpus_per_worker)] = s
                if not pending:
                    break
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ref)
                outcome, error = self._result(ray, ref, s)
                kept = outcome.attempt if outcome is not None and outcome.error is None else None
                self._log_discarded(ray, ledger, log, s, kept, error or (outcome.error if outcome else None))
                if kept is not None:
                    yield ShardDone(s, outcome.arrays, outcome.queries, outcome.seconds, outcome.attempt)
                elif failure is None:
                    failure = error or outcome.error  # in-flight shards still finish and are kept
                    queue.clear()
            if failure is not None:
                raise self._driver_error(ray, failure, ledger, oracle)
        finally:
            if pending:  # the driver stopped early (an error, Ctrl-C): stop the workers, record what they spent
                for ref in pending:
                    ray.cancel(ref, force=True)
                for s in pending.values():
                    self._log_discarded(ray, ledger, log, s, None, "cancelled: the driver stopped")
            try:
                totals = ray.get(ledger.totals.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a lost ledger: the run's own error matters more
                totals = None
            ray.kill(ledger)
            if totals is not None:
                self._summary.update(totals)
                # The driver's oracle answers for the whole run: a later run with it gets only what is left.
                oracle.count_external(totals["worker_queries"] + totals["worker_unconfirmed"])

    def _result(self, ray, ref, shard: int) -> tuple[_Outcome | None, BaseException | None]:
        try:
            return ray.get(ref), None
        except ray.exceptions.RayTaskError as e:  # a bug in the job: not retried, re-raised as itself
            return None, e.as_instanceof_cause()
        except ray.exceptions.RayError as e:  # the worker died on every attempt, or the node was lost
            first_line = (str(e).strip().splitlines() or [""])[0]  # Ray's messages go on about log files
            return None, ExecutorError(f"shard {shard} failed on all {self.max_retries + 1} attempts "
                                       f"({type(e).__name__}: {first_line}); finished shards are kept: rerun the "
                                       "same command to resume")

    def _log_discarded(self, ray, ledger, log: AttemptLog, shard: int, kept: int | None, error) -> None:
        """Record the attempts at `shard` whose results are not kept, with what the ledger saw them send."""
        try:
            attempts = ray.get(ledger.attempts.remote(shard), timeout=30)
        except Exception:  # noqa: BLE001 - a lost ledger: nothing more is known about these attempts
            return
        for number, attempt in enumerate(attempts, start=1):
            if number == kept:
                continue
            why = describe(error) if number == len(attempts) and error is not None else "worker died; retried"
            log.record(self.name, shard, number, attempt["queries"], kept=False,
                       unconfirmed=attempt["in_flight"], error=why)

    def _driver_error(self, ray, failure: BaseException, ledger, oracle: LabelOracle) -> BaseException:
        """A worker's budget error restated with the run's totals (driver + all workers)."""
        if not isinstance(failure, BudgetExceededError) or oracle.budget is None:
            return failure
        totals = ray.get(ledger.totals.remote())
        used = oracle.queries + totals["worker_queries"] + totals["worker_unconfirmed"]
        return BudgetExceededError(used, oracle.budget, failure.requested, advice=failure.advice)

    def summary(self) -> dict:
        return dict(self._summary)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT nothing listens at now, before any work (Ray itself would wait minutes for it)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", a ray:// client address...: Ray checks those itself, quickly
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ExecutorError(f"no Ray cluster head answers at {address} ({e}); start one there with "
                            f"`ray start --head --port {port}`, or pass --ray-address auto on the head itself") from e
