"""Where the shards of a run are computed: in this process (`local`) or as Ray tasks on a cluster (`ray`).

Both executors map a picklable shard job, `job(oracle, shard) -> arrays`, over the shards still to do and
hand each finished shard back to the driver, which writes it with its `ShardStore`: the run directory is
the same whichever executor made it, so a run started on Ray resumes locally and vice versa. A shard is
computed from its own seed, so its arrays are equal bit for bit across executors.

On Ray, every shard is a task with its own oracle on the teacher (the model file shipped through the
object store, or the URL of a label service each worker opens itself); one `SharedBudget` actor keeps
the ledger of the whole run, and each worker oracle reserves its queries there before sending them, so
the run's total never exceeds the budget however many workers there are. A task whose worker dies is
retried (at most `max_retries` times); only the attempt that finishes is written.

Every attempt is recorded in `RUN_DIR/attempts.jsonl` with the queries it sent and whether its result
was kept, so manifests report both the queries behind the results and those spent on attempts thrown
away (a worker that died, a budget that ran out mid-shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from .errors import BudgetExceededError, ConfigError, DB3KDError, ExecutorError, TeacherError
from .oracle import LabelOracle

ATTEMPTS_FILE = "attempts.jsonl"
RAY_INSTALL = "pip install 'db3kd[ray]'"


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


class AttemptLog:
    """`RUN_DIR/attempts.jsonl`: one line per attempt at a shard (or at the reference labels), appended.

    Fields: `executor` ("driver" for the reference labels), `invocation` (one id per command run), `shard`
    (null for the reference labels),
    `attempt`, `queries` (confirmed sent), `unconfirmed` (reserved by a worker that died before saying
    whether it sent them: counted as sent), `kept`, `error`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.invocation = uuid.uuid4().hex[:12]

    def record(self, executor: str, shard: int | None, attempt: int, queries: int, kept: bool,
               unconfirmed: int = 0, error: str | None = None) -> None:
        entry = {"executor": executor, "invocation": self.invocation, "shard": shard, "attempt": attempt,
                 "queries": int(queries), "unconfirmed": int(unconfirmed), "kept": kept, "error": error}
        with open(self.path, "a") as f:  # one short write in append mode: lines never interleave
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        return out

    def totals(self) -> dict:
        """Queries sent into this run directory as recorded, and the part of them in discarded attempts."""
        entries = self.entries()
        sent = sum(e["queries"] + e["unconfirmed"] for e in entries)
        discarded = [e for e in entries if not e["kept"]]
        return {"queries_sent": sent,
                "queries_discarded": sum(e["queries"] + e["unconfirmed"] for e in discarded),
                "queries_unconfirmed": sum(e["unconfirmed"] for e in entries),
                "attempts_discarded": len(discarded)}


def query_accounting(root: str | os.PathLike, shard_queries: list[int]) -> dict:
    """The manifest's query accounting: per shard, in the results, sent (as recorded), discarded."""
    totals = AttemptLog(Path(root) / ATTEMPTS_FILE).totals()
    return {
        "shard_queries": [int(q) for q in shard_queries],
        **totals,
        "queries_note": (
            "total_queries counts the queries behind the results: the sum of shard_queries (the attempt whose "
            "result was written, one per shard) plus any reference labelling. queries_sent counts every query "
            f"sent into this directory over all runs and workers, as recorded in {ATTEMPTS_FILE}; "
            "queries_discarded is the part spent on attempts whose results were not kept (a worker that died "
            "and was retried, a shard cut short by the budget or an error). An attempt cut short by a SIGKILL "
            "of the driver itself is not recorded."),
    }


def run_shards(executor, job: ShardJob, shards: list[int], oracle: LabelOracle, store,
               on_written: Callable[[ShardDone], None] | None = None) -> dict:
    """Compute `shards` with `executor`, writing each with `store` as it arrives; the executor's summary.

    The kept attempt is logged after its shard file is in place, so a crash between the two loses a log
    line, never counts a shard twice.
    """
    log = AttemptLog(store.root / ATTEMPTS_FILE)
    for done in executor.run(job, list(shards), oracle, log):
        store.write(done.shard, **done.arrays)
        log.record(executor.name, done.shard, done.attempt, done.queries, kept=True)
        if on_written is not None:
            on_written(done)
    return executor.summary()


class LocalExecutor:
    """Shards one after another in this process, with the caller's oracle (and its budget)."""

    name = "local"

    def run(self, job: ShardJob, shards: list[int], oracle: LabelOracle, log: AttemptLog) -> Iterator[ShardDone]:
        for s in shards:
            started, before = time.perf_counter(), oracle.queries
            try:
                arrays = job(oracle, s)
            except BaseException as e:  # also Ctrl-C: the queries it sent are recorded, then it propagates
                log.record(self.name, s, 1, oracle.queries - before, kept=False, error=_describe(e))
                raise
            yield ShardDone(s, arrays, oracle.queries - before, time.perf_counter() - started)

    def summary(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return "LocalExecutor()"


# ---------------------------------------------------------------------------------------------------------
# Ray


def import_ray():
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray, an optional extra of db3kd that is not installed here: "
                          f"{RAY_INSTALL} (or pip install ray) in this environment and on every node of the "
                          f"cluster") from e
    return ray


@dataclass(frozen=True)
class TeacherSource:
    """How a worker opens its own oracle on the teacher.

    A model file (.onnx, .pt) is read once on the driver and its bytes shipped with the job, so the
    workers need no shared file system; a label service URL is opened by each worker with the API key.
    """

    spec: str
    api_key: str | None = field(default=None, repr=False)
    payload: bytes | None = field(default=None, repr=False)
    digest: str | None = None  # SHA-256 of payload

    @classmethod
    def from_spec(cls, spec: str | os.PathLike, api_key: str | None = None) -> "TeacherSource":
        text = os.fspath(spec)
        if text.startswith(("http://", "https://")):
            return cls(text, api_key=api_key)
        path = Path(text)
        if path.suffix.lower() not in (".pt", ".pth", ".onnx"):
            raise ConfigError(f"cannot ship teacher {text!r} to workers: expected a .pt checkpoint, an .onnx file "
                              "or an http(s):// URL of a label service")
        if not path.is_file():
            raise TeacherError(f"teacher not found: {path}")
        payload = path.read_bytes()
        return cls(text, payload=payload, digest=hashlib.sha256(payload).hexdigest())

    def open(self, ledger=None, threads: int | None = None) -> LabelOracle:
        """A fresh oracle (fresh counts) on this process's copy of the teacher."""
        key = (self.digest or self.spec, self.api_key, threads)
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = self._load(threads)
        return LabelOracle(backend, ledger=ledger)

    def _load(self, threads: int | None):
        from .teachers import load_teacher

        if self.payload is None:
            return load_teacher(self.spec, api_key=self.api_key) if self.api_key else load_teacher(self.spec)
        suffix = Path(self.spec).suffix.lower()
        path = Path(tempfile.gettempdir()) / "db3kd-teachers" / f"{self.digest}{suffix}"
        if not path.exists() or path.stat().st_size != len(self.payload):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers of one node may race: rename wins
            tmp.write_bytes(self.payload)
            os.replace(tmp, path)
        return load_teacher(path, threads=threads) if suffix == ".onnx" else load_teacher(path)


_BACKENDS: dict[tuple, Any] = {}  # per worker process: a model is loaded once, not once per shard


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


def _run_shard(job: ShardJob, teacher: TeacherSource, shard: int, ledger, contract: tuple, threads: int) -> _Outcome:
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
        oracle = teacher.open(ledger=_LedgerClient(ledger, shard, attempt), threads=threads)
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
        teacher: what the workers open (see `TeacherSource`); a spec string is read here.
        address: the cluster: "auto" (the one started on this machine with `ray start --head`),
            "HOST:PORT" of its head, "local" (a new Ray instance on this machine), or None (Ray's default:
            $RAY_ADDRESS, else the latest cluster started here, else a new instance). Ignored when Ray is
            already initialised in this process.
        workers: shards computed at once; default the cluster's CPUs / cpus_per_worker.
        max_retries: further attempts at a shard whose worker died (a DB3KD error is not retried).
        cpus_per_worker: CPUs each task asks of Ray (and its teacher's and torch's threads).
        api_key: for a label service URL given as a spec string.
    """

    name = "ray"

    def __init__(self, teacher: TeacherSource | str | os.PathLike, address: str | None = None,
                 workers: int | None = None, max_retries: int = 3, cpus_per_worker: int = 1,
                 api_key: str | None = None):
        import_ray()  # fail before any work if Ray is missing
        for label, value, low in (("workers", workers, 1), ("max_retries", max_retries, 0),
                                  ("cpus_per_worker", cpus_per_worker, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        self.teacher = teacher if isinstance(teacher, TeacherSource) else TeacherSource.from_spec(teacher, api_key)
        if address is not None:
            _check_reachable(address)
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.cpus_per_worker = cpus_per_worker
        self._summary: dict = {"name": self.name, "address": address}

    def __repr__(self) -> str:
        return (f"RayExecutor({self.teacher.spec!r}, address={self.address!r}, workers={self.workers}, "
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
            why = _describe(error) if number == len(attempts) and error is not None else "worker died; retried"
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


def _describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"
