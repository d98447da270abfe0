"""`db3kd serve` under hostile or careless clients: early refusals to clients that send their whole body first,
request ids reused for other images, idle and slow connections, clients that leave, and errors that are
always JSON. Raw sockets where a test needs a client no library would be; nothing waits by sleeping.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid

import httpx
import numpy as np
import pytest

from db3kd.cli import main as db3kd_main
from db3kd.serve import ServiceLimits, create_app
from test_http import (AUTH, KEY, TEACHER, BlockingBackend, ServerThread, in_process_labels, mnist_images, npy,
                       teacher, wait_until)  # noqa: F401 (teacher: a fixture)

IMAGE_BYTES = 4 * 28 * 28


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `timeout` s."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {timeout} s; received {received[:200]!r}")
    return received


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A connection to 127.0.0.1:`port` that has sent `head` (CRLF line ends added) and `body`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + body)
    return sock


def json_detail(raw_response: bytes) -> tuple[int, dict[str, str], dict]:
    """(status, lower-cased headers, JSON body) of one raw HTTP/1.1 response."""
    head, _, body = raw_response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    assert headers.get("content-type") == "application/json", raw_response[:300]
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture
def service(teacher):
    """A keyed service with the default max_batch (1024), as `db3kd serve` runs it."""
    running = ServerThread(create_app(teacher, api_key=KEY)).start()
    yield running
    running.stop()


# --- 4. an early refusal reaches a client that sends its whole body before reading -------------------------


@pytest.mark.parametrize("headers, max_batch, n, dtype, status, message", [
    pytest.param({}, 1024, 3000, np.float32, 401, r"missing or wrong API key", id="401-no-key-9MB"),
    pytest.param(AUTH, 1024, 3000, np.float32, 413,
                 r"request body of 9408128 bytes exceeds the 3215360 bytes of 1024 images", id="413-3000-images"),
    # Refused from the .npy header, after the first chunk of 19 MB (more than the sockets' buffers hold).
    pytest.param(AUTH, 8192, 3000, np.float64, 400, r"expected float32 images \(dtype '<f4'\), got dtype '<f8'",
                 id="400-from-the-npy-header"),
])
def test_an_early_refusal_reaches_a_client_that_sends_its_whole_body_first(teacher, headers, max_batch, n, dtype,
                                                                            status, message):
    # urllib sends the whole body before reading anything: without draining it would see "connection reset".
    running = ServerThread(create_app(teacher, api_key=KEY, max_batch=max_batch)).start()
    body = npy(mnist_images(n).astype(dtype))
    request = urllib.request.Request(f"{running.url}/labels", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream", **headers})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == status
        assert refused.value.headers["content-type"] == "application/json"
        detail = json.loads(refused.value.read())["detail"]
        assert re.search(message, detail), detail
        assert running.service.images_served == 0
    finally:
        running.stop()


def test_a_body_beyond_the_drain_cap_is_refused_from_its_header(service):
    # 1 GB declared: not worth reading; the answer comes at once and the connection is closed.
    assert service.service.drain_limit < 10**9
    sock = raw_request(service.port, "POST /labels HTTP/1.1\nHost: x\nContent-Type: application/octet-stream\n"
                                     f"Content-Length: {10**9}\n\n", b"\x93NUMPY")
    with sock:
        status, headers, payload = json_detail(read_until_closed(sock))
    assert (status, headers["connection"]) == (401, "close")
    assert "missing or wrong API key" in payload["detail"]


def test_a_client_waiting_for_100_continue_gets_the_refusal_instead(service):
    # curl and others send Expect: 100-continue before a large body: answer 401 without asking for the body.
    sock = raw_request(service.port, "POST /labels HTTP/1.1\nHost: x\nContent-Type: application/octet-stream\n"
                                     f"Expect: 100-continue\nContent-Length: {3000 * IMAGE_BYTES + 128}\n\n")
    with sock:
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 401 "), response[:100]
    assert json_detail(response)[2]["detail"].startswith("missing or wrong API key")


# --- 5. a request id reused for other images is 409, in flight or not -------------------------------------


def test_a_request_id_reused_for_other_images_of_the_same_size_is_409(service):
    request_id = str(uuid.uuid4())
    first, other = npy(mnist_images(10)), npy(mnist_images(10, offset=10))
    with httpx.Client(base_url=service.url, headers={**AUTH, "X-Request-ID": request_id}, timeout=10) as client:
        answer = client.post("/labels", content=first)
        reused = client.post("/labels", content=other)
        again = client.post("/labels", content=first)
    assert reused.status_code == 409
    assert reused.json()["detail"] == (f"X-Request-ID {request_id!r} was already used for a batch of 10 images, got 10 "
                                       "different images; send a fresh id for every new batch")
    assert answer.status_code == again.status_code == 200 and answer.content == again.content
    assert service.service.images_served == 10


def test_a_request_id_reused_while_in_flight_is_409_unless_the_images_are_the_same(teacher):
    blocking = BlockingBackend(teacher)
    running = ServerThread(create_app(blocking)).start()
    x = mnist_images(10)
    answers = {}

    def post(name: str, body: bytes) -> None:
        answers[name] = httpx.post(f"{running.url}/labels", content=body, headers={"X-Request-ID": "id-1"}, timeout=10)

    try:
        first = threading.Thread(target=post, args=("first", npy(x)))
        first.start()
        assert blocking.entered.wait(timeout=10)
        post("other-same-size", npy(mnist_images(10, offset=10)))
        post("other-size", npy(mnist_images(3)))
        retry = threading.Thread(target=post, args=("retry", npy(x)))
        retry.start()
        wait_until(lambda: running.service.requests_repeated >= 1, "the retry to wait for the first answer")
        blocking.release.set()
        first.join(timeout=10)
        retry.join(timeout=10)
        assert answers["other-same-size"].status_code == answers["other-size"].status_code == 409
        assert "already used for a batch of 10 images, got 3 different images" in answers["other-size"].json()["detail"]
        assert answers["first"].status_code == answers["retry"].status_code == 200
        np.testing.assert_array_equal(answers["retry"].json()["labels"], in_process_labels(teacher, x))
        assert blocking.calls == 1 and running.service.images_served == 10
    finally:
        blocking.release.set()
        running.stop()


# --- 6. idle and slow connections: closed after a timeout, never holding a request slot ---------------------


def test_idle_connections_do_not_turn_clients_away(teacher):
    running = ServerThread(create_app(teacher)).start()
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(200)]
        x = mnist_images(5)
        answer = httpx.post(f"{running.url}/labels", content=npy(x), timeout=10)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(answer.json()["labels"], in_process_labels(teacher, x))
    finally:
        for sock in idle:
            sock.close()
        running.stop()


def test_idle_and_trickling_connections_are_closed_after_the_header_timeout(teacher):
    running = ServerThread(create_app(teacher, limits=ServiceLimits(header_timeout=0.3))).start()
    try:
        idle = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        trickling = raw_request(running.port, "POST /labels HTTP/1.1\nHost: x\nContent-Type: appl")
        kept_alive = raw_request(running.port, "GET /info HTTP/1.1\nHost: x\n\n")
        for sock in (idle, trickling):
            with sock:
                assert read_until_closed(sock) == b""
        with kept_alive:  # answered, then closed once no next request came
            assert json_detail(read_until_closed(kept_alive))[2]["num_classes"] == 10
    finally:
        running.stop()


def test_a_slow_body_gets_408_and_frees_its_slot(teacher):
    running = ServerThread(create_app(teacher, limits=ServiceLimits(request_slots=1, body_timeout=0.3))).start()
    try:
        body = npy(mnist_images(10))
        sock = raw_request(running.port, f"POST /labels HTTP/1.1\nHost: x\nContent-Length: {len(body)}\n\n", body[:1000])
        with sock:
            status, headers, payload = json_detail(read_until_closed(sock))
        assert (status, headers["connection"]) == (408, "close")
        assert payload["detail"].startswith("expected the request body within 0.3 s, got only part of it")
        assert httpx.post(f"{running.url}/labels", content=body, timeout=10).status_code == 200
    finally:
        running.stop()


# --- 7. a client leaving is one warning line; every error is JSON; odd shapes; an empty key -----------------


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_leaving_mid_body_is_one_warning_line(service):
    records = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "db3kd.serve")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        body = npy(mnist_images(100))
        sock = raw_request(service.port, f"POST /labels HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\n"
                                         f"Content-Length: {len(body)}\n\n", body[:len(body) // 2])
        sock.close()
        wait_until(lambda: any(r.levelno >= logging.WARNING for r in records.records), "the server to log the leave")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    serious = [r for r in records.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.exc_info) for r in serious] == [("WARNING", None)], [r.getMessage() for r in serious]
    assert serious[0].getMessage() == ("POST /labels: the client disconnected before sending its whole request; "
                                       "nothing was labelled")
    assert service.service.images_served == 0


class BrokenBackend:
    """A teacher with a bug: raises something other than TeacherError."""

    name, input_shape, num_classes, bounds, preferred_batch = "broken", (1, 28, 28), 10, (0.0, 1.0), 8

    def predict_labels(self, x):
        raise RuntimeError("a bug in the teacher")


def test_every_error_is_json(teacher):
    blocking = BlockingBackend(teacher)
    busy = ServerThread(create_app(blocking, limits=ServiceLimits(request_slots=1, queue_timeout=0.2))).start()
    broken = ServerThread(create_app(BrokenBackend())).start()
    try:
        holder = threading.Thread(target=httpx.post, args=(f"{busy.url}/labels",),
                                  kwargs={"content": npy(mnist_images(1)), "timeout": 10})
        holder.start()
        assert blocking.entered.wait(timeout=10)
        answers = {
            "busy": httpx.post(f"{busy.url}/labels", content=npy(mnist_images(1)), timeout=10),
            "bug": httpx.post(f"{broken.url}/labels", content=npy(mnist_images(1)), timeout=10),
            "unknown path": httpx.get(f"{busy.url}/nothing", timeout=10),
            "wrong method": httpx.get(f"{busy.url}/labels", timeout=10),
        }
        with raw_request(busy.port, "NOT HTTP AT ALL\n\n") as sock:
            status, _, malformed = json_detail(read_until_closed(sock))
        blocking.release.set()
        holder.join(timeout=10)
    finally:
        blocking.release.set()
        busy.stop()
        broken.stop()
    assert {name: a.status_code for name, a in answers.items()} == {"busy": 503, "bug": 500, "unknown path": 404,
                                                                    "wrong method": 405}
    for name, answer in answers.items():
        assert answer.headers["content-type"] == "application/json", (name, answer.text)
        assert isinstance(answer.json()["detail"], str), (name, answer.text)
    assert answers["busy"].json()["detail"] == ("the service is busy: all 1 request slots stayed taken for 0.2 s; "
                                                "retry later")
    assert answers["busy"].headers["retry-after"] == "1"
    assert answers["bug"].json()["detail"] == "internal error of the label service (RuntimeError); see its log"
    assert status == 400 and malformed["detail"].startswith("expected an HTTP/1.1 request, got malformed HTTP")


@pytest.mark.parametrize("argv, env", [
    pytest.param(["--api-key", ""], {}, id="option"),
    pytest.param([], {"DB3KD_API_KEY": ""}, id="environment"),
    pytest.param(["--api-key", "  "], {}, id="blank"),
])
def test_serve_refuses_an_empty_api_key(monkeypatch, capsys, argv, env):
    import db3kd.serve

    served = []
    monkeypatch.setattr(db3kd.serve, "run_server", lambda *args, **kwargs: served.append(kwargs))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert db3kd_main(["serve", str(TEACHER), *argv]) == 2
    assert not served
    err = capsys.readouterr().err
    assert err.startswith("db3kd: error: --api-key: expected a non-empty key, got ")
    assert "(from --api-key or $DB3KD_API_KEY); omit both for an open service" in err
