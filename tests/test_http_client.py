"""HttpBackend against label services db3kd did not write: no max_batch in /info (413 splits), rate limits
(429 with and without Retry-After), and exact counting when a split batch fails part-way.

The service is db3kd's own, behind `ScriptedService`, an ASGI wrapper that hides its max_batch and answers
chosen requests itself. No test sleeps: the backend's waits are recorded instead of slept.
"""

from __future__ import annotations

import email.utils
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

from db3kd.errors import InputError, TeacherConnectionError, TeacherError, TeacherRateLimitError
from db3kd.oracle import LabelOracle
from db3kd.serve import create_app
from db3kd.teachers.http_backend import DEFAULT_BATCH, HttpBackend, retry_after_seconds
from test_http import ServerThread, in_process_labels, mnist_images, teacher  # noqa: F401 (teacher: a fixture)

IMAGE_BYTES = 4 * 28 * 28
NPY_HEADER_BYTES = 128  # what encode_npy writes for a float32 (n, 1, 28, 28) array


class ScriptedService:
    """A db3kd app seen as another vendor's service: its /info lacks max_batch, and the POST /labels numbered
    in `faults` (from 0, in arrival order) are answered here with (status, headers) after reading the body,
    without reaching the app. `posts` records (images, status) of every POST /labels."""

    def __init__(self, app, faults: dict[int, tuple[int, dict[str, str]]] | None = None):
        self.app, self.state = app, app.state  # state: ServerThread serves it as the db3kd app it wraps
        self.faults = dict(faults or {})
        self.posts: list[tuple[int, int]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/info":
            info = {k: v for k, v in self.state.service.info().items() if k != "max_batch"}
            return await _send_json(send, 200, info, {})
        headers = dict(scope["headers"])
        images = (int(headers[b"content-length"]) - NPY_HEADER_BYTES) // IMAGE_BYTES
        fault = self.faults.get(len(self.posts))
        if fault is None:
            async def record_status(message):
                if message["type"] == "http.response.start":
                    self.posts.append((images, message["status"]))
                await send(message)
            return await self.app(scope, receive, record_status)
        self.posts.append((images, fault[0]))
        while (await receive()).get("more_body"):
            pass
        await _send_json(send, fault[0], {"detail": "injected by the test"}, fault[1])

    def fail_from_now_on(self, status: int = 503) -> None:
        self.faults.update({n: (status, {}) for n in range(len(self.posts), len(self.posts) + 100)})


async def _send_json(send, status: int, payload: dict, headers: dict[str, str]) -> None:
    body = json.dumps(payload).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def scripted(teacher):
    """A db3kd service accepting at most 100 images per request, behind a ScriptedService."""
    wrapper = ScriptedService(create_app(teacher, max_batch=100))
    running = ServerThread(wrapper).start()
    yield running, wrapper
    running.stop()


def quiet_backend(url: str, **options) -> tuple[HttpBackend, list[float]]:
    """An HttpBackend that records its waits (retry back-off and rate limits) instead of sleeping them."""
    backend = HttpBackend(url, **options)
    waits: list[float] = []
    backend._sleep = waits.append
    return backend, waits


# --- 1. no max_batch in /info: start from a guess, split on 413, remember ----------------------------------


def test_a_service_without_max_batch_gets_halved_batches_after_413(teacher, scripted):
    running, service = scripted
    backend, _ = quiet_backend(running.url)
    assert (backend.max_batch, backend.batch_limit, backend.preferred_batch) == (None, DEFAULT_BATCH, DEFAULT_BATCH)
    oracle = LabelOracle(backend)
    x = mnist_images(300)
    np.testing.assert_array_equal(oracle.labels(x), in_process_labels(teacher, x))
    # Chunk 256: refused at 256 and 128, sent as 4 x 64; then chunk 44.
    assert service.posts == [(256, 413), (128, 413)] + [(64, 200)] * 4 + [(44, 200)]
    assert backend.batch_limit == backend.preferred_batch == 64
    # Remembered: a later call sends 64 at most, and no request is refused again.
    y = mnist_images(150, offset=300)
    np.testing.assert_array_equal(oracle.labels(y), in_process_labels(teacher, y))
    assert service.posts[7:] == [(64, 200), (64, 200), (22, 200)]
    assert oracle.queries == running.service.images_served == 450
    backend.close()


def test_413_for_a_single_image_is_an_input_error(scripted):
    running, service = scripted
    service.fail_from_now_on(413)
    backend, _ = quiet_backend(running.url)
    oracle = LabelOracle(backend)
    with pytest.raises(InputError, match=r"/labels refused the batch \(HTTP 413: injected by the test\)"):
        oracle.labels(mnist_images(3))
    assert service.posts == [(3, 413), (1, 413)]
    assert oracle.queries == running.service.images_served == 0
    backend.close()


# --- 2. 429: wait as asked (or back off), without using up retries; give up past rate_limit_wait -----------


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now), usegmt=True)


def test_429_is_waited_out_as_asked_without_using_retries(teacher, scripted):
    running, service = scripted
    service.faults = {0: (429, {"Retry-After": "3"}), 1: (429, {"Retry-After": http_date(20)}), 2: (429, {}),
                      3: (429, {}), 4: (429, {"Retry-After": "0"})}
    backend, waits = quiet_backend(running.url, retries=0)  # a single failure would end the call
    x = mnist_images(10)
    np.testing.assert_array_equal(LabelOracle(backend).labels(x), in_process_labels(teacher, x))
    # 3 s as asked; the date's ~20 s (whole seconds); without a hint 1 s doubled per 429 so far (the 3rd and
    # 4th: 4 s, 8 s); 0 s asked: 1 s, the least after any 429.
    assert waits[0] == 3 and 10 <= waits[1] <= 20 and waits[2:] == [4, 8, 1]
    assert [status for _, status in service.posts] == [429] * 5 + [200]
    assert running.service.images_served == 10
    backend.close()


@pytest.mark.parametrize("retry_after, cap, expected_waits, message", [
    pytest.param({"Retry-After": "100"}, 250, [100, 100],
                 r"waited 200 s over 2 answers, and it asks for 100 s more, past rate_limit_wait=250 s", id="asked"),
    pytest.param({}, 20, [1, 2, 4, 8], r"waited 15 s over 4 answers, and it asks for 10 s more, past "
                                       r"rate_limit_wait=20 s", id="backoff"),
    pytest.param({"Retry-After": "3600"}, 300, [], r"waited 0 s over 0 answers, and it asks for 3600 s more",
                 id="too-long-at-once"),
])
def test_429_gives_up_past_rate_limit_wait_and_says_so(scripted, retry_after, cap, expected_waits, message):
    running, service = scripted
    service.fail_from_now_on(429)
    service.faults = {n: (429, retry_after) for n in service.faults}
    backend, waits = quiet_backend(running.url, rate_limit_wait=cap)
    oracle = LabelOracle(backend)
    with pytest.raises(TeacherRateLimitError, match=message) as error:
        oracle.labels(mnist_images(5))
    assert "this batch was not counted. Send fewer queries at once" in str(error.value)
    assert isinstance(error.value, TeacherConnectionError)  # callers catching connection failures catch it too
    assert waits == expected_waits
    assert oracle.queries == running.service.images_served == 0
    backend.close()


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("-5", 0.0),
    ("Fri, 02 Jan 2026 03:04:35 GMT", 30.0), ("Fri, 02 Jan 2026 03:04:35 -0000", 30.0),
    ("Fri, 02 Jan 2026 03:00:00 GMT", 0.0),  # a date in the past: no wait
    ("soon", None), ("nan", None), ("inf", None), ("", None), (None, None),
])
def test_retry_after_seconds(value, seconds):
    assert retry_after_seconds(value, now=NOW) == seconds


# --- 3. exact counting: answered images of a split batch are counted even when a later request fails -------


def test_accounting_with_413_429_and_503_equals_images_served(teacher, scripted):
    running, service = scripted
    # POST numbers: call 1 (300 images, chunk 256): 0 413, 1 413, 2 429, 3 64 ok, 4 503, 5 64 ok, 6 ok, 7 ok,
    # then chunk 44: 8 503, 9 ok. Call 2 (100): 10 429, 11 ok, 12 ok.
    service.faults = {2: (429, {"Retry-After": "2"}), 4: (503, {}), 8: (503, {}), 10: (429, {})}
    backend, waits = quiet_backend(running.url, retries=2, backoff=0.5)
    oracle = LabelOracle(backend)
    x = mnist_images(400)
    np.testing.assert_array_equal(oracle.labels(x[:300], ids=np.arange(300)), in_process_labels(teacher, x[:300]))
    np.testing.assert_array_equal(oracle.labels(x[300:], ids=np.arange(100)), in_process_labels(teacher, x[300:]))
    assert [status for _, status in service.posts] == [413, 413, 429, 200, 503, 200, 200, 200, 503, 200, 429, 200, 200]
    assert waits == [2, 0.5, 0.5, 1]
    assert oracle.queries == running.service.images_served == 400

    # The service fails for good after the first request of a split call: those 64 images were answered.
    backend.batch_limit = 64
    posts_before = len(service.posts)
    service.faults[posts_before + 1] = (503, {})
    service.faults[posts_before + 2] = (503, {})
    service.faults[posts_before + 3] = (503, {})
    with pytest.raises(TeacherConnectionError, match=r"failed 3 attempts at POST /labels \(last error: HTTP 503: "
                                                     r"injected by the test\)\..* The first 64 of the 200 images of "
                                                     r"this call were answered before that and are counted\.") as error:
        oracle.labels(mnist_images(200, offset=400), ids=np.arange(200))
    assert error.value.answered == 64
    assert oracle.queries == running.service.images_served == 464
    np.testing.assert_array_equal(oracle.queries_for(np.arange(200)), [3] * 64 + [2] * 36 + [1] * 100)
    backend.close()


class SplittingBackend:
    """A backend that answers `answered` images of each batch, then fails with `error`."""

    name, input_shape, num_classes, bounds, preferred_batch = "splitting", (1, 2, 2), 3, (0.0, 1.0), 8

    def __init__(self, answered: int, error: Exception):
        self.answered, self.error = answered, error

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        self.error.answered = self.answered
        raise self.error


class RecordingLedger:
    def __init__(self):
        self.settled = []

    def reserve(self, n: int) -> None:
        pass

    def settle(self, reserved: int, sent: int) -> None:
        self.settled.append((reserved, sent))


@pytest.mark.parametrize("error", [TeacherConnectionError("gone"), InputError("refused"), TeacherError("bad")],
                         ids=lambda e: type(e).__name__)
def test_the_oracle_counts_images_answered_before_a_failure(error):
    ledger = RecordingLedger()
    oracle = LabelOracle(SplittingBackend(answered=5, error=error), chunk_size=8, ledger=ledger)
    x = torch.rand(20, 1, 2, 2)
    with pytest.raises(type(error)):
        oracle.labels(x, ids=np.arange(20))
    # The first chunk (8 images) failed after its first 5: they count, in total, per sample and in the ledger.
    assert oracle.queries == 5
    np.testing.assert_array_equal(oracle.queries_for(np.arange(8)), [1] * 5 + [0] * 3)
    assert ledger.settled == [(20, 5)]
