"""Requests in flight (`--concurrency`) and a rate limit (`--max-rps`) for remote teachers, with exact counts:
the Dispatcher and RatePacer alone, then HttpBackend against db3kd's own service, with faults."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from db3kd.errors import InputError, TeacherConnectionError, TeacherError
from db3kd.oracle import LabelOracle
from db3kd.serve import create_app
from db3kd.teachers import HttpBackend
from db3kd.teachers.dispatch import Dispatcher, RatePacer
from test_http import FaultProxy, ServerThread, in_process_labels, mnist_images, teacher  # noqa: F401 (a fixture)
from test_http_client import ScriptedService, _send_json

# --- RatePacer ------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 9))


def test_the_pacer_spaces_starts_by_one_over_the_rate():
    clock = FakeClock()
    pacer = RatePacer(10.0, clock=clock, sleep=clock.sleep)
    for _ in range(4):
        pacer.wait()
    assert clock.slept == [0.1, 0.2, 0.3]  # starts at 0, 0.1, 0.2, 0.3 s: never a burst
    clock.now += 5  # idle: no credit is saved up beyond one start
    pacer.wait()
    pacer.wait()
    assert clock.slept[3:] == [0.1]


def test_the_pacer_holds_across_threads():
    """8 threads, 16 starts at 200 per second: the last starts at least 15/200 s after the first."""
    pacer, starts, lock = RatePacer(200.0), [], threading.Lock()

    def worker():
        for _ in range(2):
            pacer.wait()
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    assert starts[-1] - starts[0] >= 15 / 200 - 1e-3


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan"), "10", True])
def test_bad_rates(rate):
    with pytest.raises(InputError, match=r"max_rps must be positive requests per second or None"):
        RatePacer(rate)


@pytest.mark.parametrize("concurrency", [0, -2, 1.5, "4", True])
def test_bad_concurrency(concurrency):
    with pytest.raises(InputError, match=r"concurrency must be a positive integer"):
        Dispatcher("t", concurrency)


# --- Dispatcher -----------------------------------------------------------------------------------------------


def test_pieces_keep_every_slot_busy_within_the_request_limit():
    dispatcher = Dispatcher("t", 4)
    assert [dispatcher.piece_size(n, 64) for n in (1, 7, 100, 256, 1000)] == [1, 2, 25, 64, 64]
    assert Dispatcher("t", 1).piece_size(1000, 64) == 64
    # Under a request quota every request counts: filled up to the limit instead.
    assert [dispatcher.piece_size(n, 64, fill=True) for n in (1, 7, 100, 256)] == [1, 7, 64, 64]


def test_a_non_db3kd_failure_alongside_answers_becomes_a_teacher_error_that_counts_them():
    barrier = threading.Barrier(2, timeout=20)

    def piece(images):
        barrier.wait()
        if images[0] == 0:
            raise KeyError("bug")
        return images.astype(np.int64)

    with pytest.raises(TeacherError, match=r"teacher t failed with KeyError: 'bug'\. 2 of the 4 images") as error:
        Dispatcher("t", 2).run(np.arange(4), 2, piece)
    assert error.value.answered_at == (2, 3)

    def always_fails(images):
        raise KeyError("bug")

    with pytest.raises(KeyError):  # nothing answered: the bug as it is
        Dispatcher("t", 1).run(np.arange(4), 2, always_fails)


class PositionsBackend:
    """Fails every call with an error saying which images (not the first ones) were answered."""

    name, input_shape, num_classes, bounds, preferred_batch = "positions", (1, 2, 2), 3, (0.0, 1.0), 6

    def predict_labels(self, x):
        error = TeacherConnectionError("gone")
        error.answered, error.answered_at = 3, (1, 4, 5)
        raise error


def test_the_oracle_counts_the_samples_the_error_names():
    oracle = LabelOracle(PositionsBackend())
    with pytest.raises(TeacherConnectionError):
        oracle.labels(np.zeros((10, 1, 2, 2), np.float32), ids=np.arange(10, 20))
    assert oracle.queries == 3
    np.testing.assert_array_equal(oracle.queries_for(np.arange(10, 20)), [0, 1, 0, 0, 1, 1, 0, 0, 0, 0])


# --- HttpBackend with requests in flight ----------------------------------------------------------------------------


class Gate:
    """A db3kd app whose POST /labels are numbered on arrival: those in `refuse` get a 400 without reaching the
    app, the others wait until `needed` of them are inside at once (a request in flight, not a queued one)."""

    def __init__(self, app, needed: int, refuse=()):
        self.app, self.state = app, app.state  # state: ServerThread serves it as the db3kd app it wraps
        self.needed, self.refuse = needed, set(refuse)
        self.arrivals = self.inside = self.most_inside = 0
        self.opened: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/labels":
            return await self.app(scope, receive, send)
        number, self.arrivals = self.arrivals, self.arrivals + 1
        if number in self.refuse:
            while (await receive()).get("more_body"):
                pass
            return await _send_json(send, 400, {"detail": "refused by the test"}, {})
        self.opened = self.opened or asyncio.Event()
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        if self.inside >= self.needed:
            self.opened.set()
        try:
            await asyncio.wait_for(self.opened.wait(), 30)
            await self.app(scope, receive, send)
        finally:
            self.inside -= 1


def test_concurrent_requests_are_in_flight_together_and_counted_exactly(teacher):
    """4 requests reach the service together (its teacher waits for all 4); labels and counts are exact."""
    gate = Gate(create_app(teacher, max_batch=50), needed=4)
    running = ServerThread(gate).start()
    try:
        with HttpBackend(running.url, concurrency=4) as backend:
            assert (backend.batch_limit, backend.preferred_batch) == (50, 200)
            oracle = LabelOracle(backend)
            x = mnist_images(400)
            np.testing.assert_array_equal(oracle.labels(x, ids=np.arange(400)), in_process_labels(teacher, x))
        assert oracle.queries == running.service.images_served == 400
        assert gate.most_inside == 4
        np.testing.assert_array_equal(oracle.queries_for(np.arange(400)), np.ones(400))
    finally:
        running.stop()


def test_a_request_failing_for_good_among_others_in_flight(teacher):
    """The last of 4 requests in flight is refused while the 3 others are inside the service (its gate needs all
    3): their images are counted (exactly those the service labelled), the call's labels discarded, and the right
    samples charged."""
    running = ServerThread(Gate(create_app(teacher, max_batch=100), needed=3, refuse={3})).start()
    try:
        with HttpBackend(running.url, concurrency=4, retries=0) as backend:
            oracle = LabelOracle(backend)
            # Which piece arrives last is up to the threads: the answered ones may or may not be the first 300.
            with pytest.raises(InputError, match=r"refused the batch \(HTTP 400: refused by the test\)\. (The first )?"
                                                 r"300 of the 400 images of this call were answered") as error:
                oracle.labels(mnist_images(400), ids=np.arange(400))
        assert error.value.answered == 300 == oracle.queries == running.service.images_served
        charged = oracle.queries_for(np.arange(400))
        assert charged.sum() == 300
        if error.value.answered_at is not None:
            assert set(np.flatnonzero(charged)) == set(error.value.answered_at)
        assert sorted(charged.reshape(4, 100).sum(axis=1)) == [0, 100, 100, 100]  # one whole request refused
    finally:
        running.stop()


def test_dropped_answers_and_503s_with_requests_in_flight_keep_the_counts_exact(teacher):
    """db3kd's service remembers request ids, so retries after dropped answers are safe with concurrency too."""
    running = ServerThread(create_app(teacher, max_batch=32)).start()
    proxy = FaultProxy(running.port, {2: "drop-after", 5: "503", 7: "drop-before", 9: "drop-after", 12: "503"})
    try:
        with HttpBackend(proxy.url, concurrency=4, retries=4, backoff=0.0) as backend:
            oracle = LabelOracle(backend)
            for n, offset in ((300, 0), (50, 300), (129, 400)):
                x = mnist_images(n, offset)
                np.testing.assert_array_equal(oracle.labels(x), in_process_labels(teacher, x))
        assert oracle.queries == running.service.images_served == 479
        # Both dropped answers were recalled, not relabelled (a retry that met another fault: more than once).
        assert running.service.requests_repeated >= 2
    finally:
        proxy.close()
        running.stop()


def test_max_rps_spaces_the_requests(teacher):
    running = ServerThread(create_app(teacher, max_batch=10)).start()
    try:
        with HttpBackend(running.url, concurrency=3, max_rps=50) as backend:
            assert backend.max_rps == 50
            started = time.monotonic()
            LabelOracle(backend).labels(mnist_images(60))  # 6 requests, each filled to max_batch
            assert time.monotonic() - started >= 5 / 50 - 1e-3
        assert running.service.requests_labelled == 6
    finally:
        running.stop()


def test_429_with_requests_in_flight_is_waited_out(teacher):
    wrapper = ScriptedService(create_app(teacher, max_batch=20), faults={0: (429, {"Retry-After": "2"}),
                                                                         1: (429, {})})
    running = ServerThread(wrapper).start()
    try:
        with HttpBackend(running.url, concurrency=3, retries=0) as backend:
            backend.batch_limit = 20
            waits = []
            backend._sleep = waits.append  # recorded, not slept
            oracle = LabelOracle(backend)
            x = mnist_images(60)
            np.testing.assert_array_equal(oracle.labels(x), in_process_labels(teacher, x))
        # 2 s as asked; then 1 s for another request's first 429, or 2 s (doubled) if the first request's
        # immediate retry (the wait is recorded, not slept) was the next to arrive.
        assert sorted(waits) in ([1, 2], [2, 2])
        assert oracle.queries == running.service.images_served == 60
    finally:
        running.stop()
