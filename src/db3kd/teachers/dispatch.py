"""One batch as several requests in flight (`Dispatcher`), paced under a rate limit (`RatePacer`).

Shared by the teachers that answer over a network or through user code (a label service, a V2 server, a
Python callable): with `concurrency` N the backend splits the oracle's chunk into pieces and sends up to N at
once, and the oracle still learns exactly which images were answered when one request fails for good.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import numpy as np

from ..errors import DB3KDError, InputError, TeacherError


def check_concurrency(value) -> int:
    """`value` as a number of requests in flight (a positive integer), else `InputError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"concurrency must be a positive integer, got {value!r}")
    return int(value)


def check_rate(value) -> float | None:
    """`value` as requests per second (positive, finite) or None for no limit, else `InputError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
        raise InputError(f"max_rps must be positive requests per second or None, got {value!r}")
    return float(value)


class RatePacer:
    """At most `rate` request starts per second, over all threads.

    A token bucket holding one token: each start takes the next free slot, `1 / rate` seconds after the one
    before, and waits for it outside the lock. So no window of one second ever holds more than `rate` starts
    (bursts included), which is what a per-second quota asks of its clients.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = check_rate(rate)
        if self.rate is None:
            raise InputError("a RatePacer needs a rate; use no pacer for no limit")
        self.interval = 1.0 / self.rate
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until this start's slot; return the seconds waited."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            self._sleep(delay)
        return delay


class Dispatcher:
    """Labels of a batch, sent as pieces, up to `concurrency` of them in flight (a thread pool).

    `run(images, size, label_piece)` calls `label_piece` on consecutive pieces of at most `size` images. With
    `concurrency` 1 it calls them in order and stops at the first failure, so the images answered before it
    are the first ones. With more, it stops starting pieces at the first failure but waits for those in
    flight: their images were answered (so paid for) although their labels are discarded. Either way the error
    it raises says how many images were answered (`answered`) and, when they are not the first ones, which
    (`answered_at`); `LabelOracle` counts them. A piece that fails after answering its first k images raises a
    `DB3KDError` whose `answered` is k.

    A failure of `label_piece` that is not a `DB3KDError` (a bug) is raised as it is when nothing was answered,
    else as a `TeacherError` saying so.
    """

    def __init__(self, name: str, concurrency: int = 1):
        self.name = name
        self.concurrency = check_concurrency(concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def piece_size(self, n: int, limit: int, fill: bool = False) -> int:
        """Images per piece for a batch of `n`: at most `limit`, and small enough to keep every slot busy; or,
        with `fill` (under a request quota, where every request counts), as many as `limit` allows."""
        return max(1, min(limit, n if fill else math.ceil(n / self.concurrency)))

    def run(self, images: np.ndarray, size: int, label_piece: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Labels of `images`, concatenated from `label_piece` over pieces of at most `size` (see the class)."""
        starts = range(0, len(images), size)
        if not starts:
            return np.empty(0, dtype=np.int64)
        if self.concurrency == 1 or len(starts) == 1:
            answers = []
            for start in starts:
                try:
                    answers.append(np.asarray(label_piece(images[start:start + size])))
                except Exception as error:
                    raise self._failure(error, len(images), np.arange(start + _answered(error)))
            return np.concatenate(answers)
        return self._run_parallel(images, starts, size, label_piece)

    def _run_parallel(self, images, starts, size, label_piece) -> np.ndarray:
        pool = self._executor()
        futures = [pool.submit(label_piece, images[start:start + size]) for start in starts]
        try:
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): start nothing more
            for future in futures:
                future.cancel()
            raise
        if pending:  # a piece failed: start no more, but let those in flight finish (they are being answered)
            for future in pending:
                future.cancel()
            wait(pending)
        failure, answered = None, []
        for start, future in zip(starts, futures):
            error = _outcome(future)
            if error is None:
                answered.append(np.arange(start, start + len(future.result())))
                continue
            answered.append(np.arange(start, start + _answered(error)))
            if failure is None and not isinstance(error, _NotSent):
                failure = error
        if failure is None:
            return np.concatenate([np.asarray(future.result()) for future in futures])
        raise self._failure(failure, len(images), np.concatenate(answered))

    def _failure(self, error: Exception, n: int, answered: np.ndarray) -> Exception:
        """`error` re-made to say which of the call's `n` images were answered before it (and to carry them)."""
        k = len(answered)
        if not k:
            return error
        original = error
        if not isinstance(error, DB3KDError):
            error = TeacherError(f"teacher {self.name} failed with {type(error).__name__}: {error}.")
        if k == n:
            note, at = f"All {n} images of this call were answered and are counted (their labels are discarded).", None
        elif np.array_equal(answered, np.arange(k)):
            note, at = f"The first {k} of the {n} images of this call were answered before that and are counted.", None
        else:
            note = (f"{k} of the {n} images of this call were answered by requests in flight alongside it and are "
                    "counted (their labels are discarded with the call's).")
            at = tuple(int(i) for i in answered)
        try:
            partial = type(error)(f"{str(error).rstrip('.')}. {note}")
        except TypeError:  # an error class with other constructor arguments: keep it, annotated
            partial = error
        partial.answered, partial.answered_at = k, at
        if partial is not original:
            partial.__cause__ = original
        return partial

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="db3kd-teacher")
            return self._pool

    def close(self) -> None:
        """Stop the worker threads (after the pieces in flight)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


def _outcome(future: Future) -> BaseException | None:
    """The failure of a finished or cancelled piece (a cancelled one answered nothing); None if it succeeded."""
    if future.cancelled():
        return _NotSent()
    return future.exception()


def _answered(error: BaseException) -> int:
    """Images a failed piece had answered (its first ones)."""
    return int(getattr(error, "answered", 0) or 0)


class _NotSent(Exception):
    """Stands for a piece that was never started because another had failed."""
