"""`db3kd serve` and HttpBackend: the protocol, its refusals, and exact query accounting under faults.

Servers run in background threads on 127.0.0.1 (uvicorn); a small fault-injecting proxy sits between
client and server where a test needs dropped connections or 5xx answers. Nothing waits by sleeping: a
test polls the condition it needs, with a bound.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from db3kd.errors import InputError, TeacherConnectionError, TeacherError
from db3kd.oracle import LabelOracle
from db3kd.serve import bind_socket, create_app, server_config
from db3kd.teachers import OnnxBackend, load_teacher
from db3kd.teachers.http_backend import HttpBackend

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHER = SHARED / "teachers" / "lenet5_mnist.onnx"
MNIST_TEST_IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
KEY = "test-key-" + "x" * 16
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BATCH = 64


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


class ServerThread:
    """uvicorn serving `app` in a background thread on 127.0.0.1:`port` (0: a free port): a db3kd app (from
    `create_app`) configured as `db3kd serve` configures it, any other app with uvicorn's defaults."""

    def __init__(self, app, port: int = 0):
        self.app = app
        self.sock = bind_socket("127.0.0.1", port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = (server_config(app, log_level="error") if hasattr(app.state, "service")
                  else uvicorn.Config(app, log_level="error", lifespan="on"))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        if not self.server.started:
            raise AssertionError("the server thread died while starting")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            raise AssertionError("the server did not stop within 10 s")
        self.sock.close()

    @property
    def service(self):
        return self.app.state.service


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that injects a fault into scripted requests.

    Requests are numbered from 0 in arrival order, over all connections. `faults` maps a number to:
    - "503": answer 503 without forwarding (the server never sees the request);
    - "drop-before": close the client's connection without forwarding;
    - "drop-after": forward, read the server's whole answer (so the server did label the batch), then
      close the client's connection without relaying it.
    Other requests are forwarded, each on a fresh upstream connection; if the server is down the client's
    connection is closed, as a dead server would.
    """

    def __init__(self, upstream_port: int, faults: dict[int, str] | None = None):
        self.upstream_port = upstream_port
        self.faults = dict(faults or {})
        self.log: list[dict] = []  # one entry per request: number, method, path, request id, what happened
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                request = _read_http_message(reader)
                if request is None:
                    return
                head, raw = request
                method, path = head[0].split(" ")[:2]
                with self._lock:
                    number = len(self.log)
                    fault = self.faults.get(number, "forward")
                    entry = {"number": number, "method": method, "path": path, "fault": fault,
                             "request_id": _header(head, "x-request-id")}
                    self.log.append(entry)
                if fault == "503":
                    body = b'{"detail":"injected by the test proxy"}'
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                if fault == "drop-before":
                    return
                try:
                    response = self._forward(raw)
                except OSError as e:
                    entry["fault"] = f"upstream down ({type(e).__name__})"
                    return
                if fault == "drop-after":
                    return
                conn.sendall(response)

    def _forward(self, raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10) as upstream:
            upstream.sendall(raw)
            with upstream.makefile("rb") as reader:
                response = _read_http_message(reader)
        if response is None:
            raise ConnectionError("the server closed the connection without answering")
        return response[1]


def _read_http_message(reader) -> tuple[list[str], bytes] | None:
    """(header lines, raw bytes) of one HTTP/1.1 message framed by Content-Length; None at end of stream."""
    lines = []
    while True:
        line = reader.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    head = [line.decode("latin-1").rstrip("\r\n") for line in lines]
    length = int(_header(head, "content-length") or 0)
    body = reader.read(length) if length else b""
    if len(body) != length:
        return None
    return head, b"".join(lines) + body


def _header(head: list[str], name: str) -> str | None:
    for line in head[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def mnist_images(n: int, offset: int = 0) -> np.ndarray:
    """MNIST test images offset..offset+n in [0, 1] (seeded noise if the dataset is absent)."""
    if MNIST_TEST_IMAGES.is_file():
        import gzip

        with gzip.open(MNIST_TEST_IMAGES) as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
        return (raw[offset * 784:(offset + n) * 784].reshape(n, 1, 28, 28) / 255.0).astype(np.float32)
    return np.random.default_rng(offset).random((n, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def teacher() -> OnnxBackend:
    if not TEACHER.is_file():
        pytest.skip(f"shared teacher not found: {TEACHER}")
    return OnnxBackend(TEACHER, threads=1)


@pytest.fixture(scope="module")
def server(teacher):
    """One keyed service for the protocol tests (they only read images_served as differences)."""
    running = ServerThread(create_app(teacher, max_batch=MAX_BATCH, api_key=KEY)).start()
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as c:
        yield c


def in_process_labels(teacher, x: np.ndarray) -> np.ndarray:
    return LabelOracle(teacher).labels(x)


# --- the protocol -----------------------------------------------------------------------------------------


def test_info(teacher):
    running = ServerThread(create_app(teacher, max_batch=32)).start()
    try:
        info = httpx.get(f"{running.url}/info").json()
        assert info == {"input_shape": [1, 28, 28], "num_classes": 10, "bounds": [0.0, 1.0], "max_batch": 32,
                        "images_served": 0}
        with HttpBackend(running.url) as backend:
            assert (backend.input_shape, backend.num_classes, backend.bounds) == ((1, 28, 28), 10, (0.0, 1.0))
            assert (backend.max_batch, backend.preferred_batch, backend.name) == (32, 32, running.url)
            LabelOracle(backend).labels(mnist_images(40))
        assert httpx.get(f"{running.url}/info").json()["images_served"] == 40
    finally:
        running.stop()


def test_labels_equal_in_process_labels(teacher, server):
    x = mnist_images(150)
    served_before = server.service.images_served
    with HttpBackend(server.url, api_key=KEY) as backend:
        oracle = LabelOracle(backend, chunk_size=MAX_BATCH)
        remote = oracle.labels(x)
        remote_tensor = oracle.labels(torch.from_numpy(x))
    expected = in_process_labels(teacher, x)
    np.testing.assert_array_equal(remote, expected)
    np.testing.assert_array_equal(remote_tensor.numpy(), expected)
    assert len(set(expected.tolist())) > 5
    assert oracle.queries == 300 == server.service.images_served - served_before


def test_out_of_bounds_pixels_are_clipped_like_the_oracle(teacher, client):
    x = mnist_images(20)
    pushed_out = np.where(x > 0.5, x + 3.0, x - 3.0).astype(np.float32)
    answer = client.post("/labels", content=npy(pushed_out))
    assert answer.status_code == 200
    np.testing.assert_array_equal(answer.json()["labels"], in_process_labels(teacher, pushed_out))


def test_fortran_ordered_npy_is_accepted(teacher, client):
    x = np.asfortranarray(mnist_images(10))
    answer = client.post("/labels", content=npy(x))
    assert answer.status_code == 200
    np.testing.assert_array_equal(answer.json()["labels"], in_process_labels(teacher, np.ascontiguousarray(x)))


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong-key"),
    pytest.param({"Authorization": f"Basic {KEY}"}, id="wrong-scheme"),
    pytest.param({"Authorization": f"Bearer {KEY}x"}, id="key-plus-one"),
    pytest.param({"Authorization": f"Bearer {KEY[:-1]}"}, id="key-prefix"),
])
@pytest.mark.parametrize("method, path", [("GET", "/info"), ("POST", "/labels")])
def test_wrong_or_missing_key_is_401(server, headers, method, path):
    served_before = server.service.images_served
    answer = httpx.request(method, f"{server.url}{path}", headers=headers, content=npy(mnist_images(2)))
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert "expected header 'Authorization: Bearer KEY'" in answer.json()["detail"]
    assert server.service.images_served == served_before


@pytest.mark.parametrize("api_key", [None, "wrong-key"])
def test_http_backend_without_the_right_key_says_how_to_pass_it(server, api_key):
    with pytest.raises(TeacherError, match=r"HTTP 401.*pass the service's API key: api_key=\.\.\. in Python, "
                                           r"--api-key or \$DB3KD_API_KEY"):
        HttpBackend(server.url, api_key=api_key)


def test_too_many_images_is_413_from_the_npy_header(server, client):
    served_before = server.service.images_served
    answer = client.post("/labels", content=npy(mnist_images(MAX_BATCH + 1)))
    assert answer.status_code == 413
    assert answer.json()["detail"].startswith(f"expected at most {MAX_BATCH} images per request, got {MAX_BATCH + 1}")
    assert server.service.images_served == served_before


def test_an_absurd_number_of_images_is_413_from_the_npy_header(server, client):
    answer = client.post("/labels", content=npy_declaring(f"({2**70}, 1, 28, 28)", b"\x00" * 64))
    assert answer.status_code == 413
    assert answer.json()["detail"].startswith(f"expected at most {MAX_BATCH} images per request, got {2**70}")


def test_too_long_a_body_is_413_from_content_length(server, client):
    answer = client.post("/labels", content=npy(mnist_images(MAX_BATCH * 3)))
    assert answer.status_code == 413
    assert re.match(r"request body of \d+ bytes exceeds the \d+ bytes of 64 images", answer.json()["detail"])


def test_too_long_a_chunked_body_is_413(server, client):
    # No Content-Length: the server must stop reading at its limit, here after a valid header of 64 images.
    header = npy(mnist_images(MAX_BATCH))[:128]
    chunks = (header if i == 0 else b"\x00" * 65536 for i in range(8))
    answer = client.post("/labels", content=chunks)
    assert answer.status_code == 413
    assert answer.json()["detail"].startswith("request body exceeds the 204800 bytes of 64 images")


def test_http_backend_splits_a_chunk_larger_than_max_batch(teacher, server):
    # Once pinned: a chunk over max_batch was sent whole and its 413 raised. The backend now splits it.
    served_before = server.service.images_served
    x = mnist_images(MAX_BATCH + 10)
    with HttpBackend(server.url, api_key=KEY) as backend:
        oracle = LabelOracle(backend, chunk_size=MAX_BATCH * 2)
        np.testing.assert_array_equal(oracle.labels(x), in_process_labels(teacher, x))
    assert oracle.queries == server.service.images_served - served_before == MAX_BATCH + 10


def npy_declaring(shape: str, data: bytes = b"") -> bytes:
    """A .npy file whose float32 header declares `shape` (a Python literal: any tuple, even one np.save would
    never write), followed by `data`."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


def _with_bad_version(body: bytes) -> bytes:
    return body[:6] + b"\x09\x00" + body[8:]


MALFORMED = [
    pytest.param(b"garbage bytes, not a numpy file", r"expected a \.npy file \(numpy\.save\) starting with",
                 id="garbage"),
    pytest.param(b"", r"got 0 bytes ending before the end of the \.npy header", id="empty"),
    pytest.param(b"\x93NUMPY\x01\x00\xff", r"ending before the end of the \.npy header", id="cut-header"),
    pytest.param(_with_bad_version(npy(np.zeros((1, 1, 28, 28), np.float32))),
                 r"expected \.npy format version 1\.0 or 2\.0, got 9\.0", id="bad-version"),
    pytest.param(b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n", r"malformed \.npy header", id="bad-header"),
    pytest.param(npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
                 r"expected float32 images \(dtype '<f4'\), got dtype '\|O' \(object arrays are never accepted\)",
                 id="object-array"),
    pytest.param(npy(np.zeros((2, 1, 28, 28))), r"got dtype '<f8'", id="float64"),
    pytest.param(npy(np.zeros((2, 1, 28, 28), np.float16)), r"got dtype '<f2'", id="float16"),
    pytest.param(npy(np.zeros((2, 1, 28, 28), ">f4")), r"got dtype '>f4'", id="big-endian"),
    pytest.param(npy(np.zeros((2, 28, 28), np.float32)), r"expected images of shape \(n, 1, 28, 28\), got \(2, 28, 28\)",
                 id="rank-3"),
    pytest.param(npy(np.zeros((2, 3, 28, 28), np.float32)), r"got \(2, 3, 28, 28\)", id="wrong-channels"),
    pytest.param(npy(np.zeros((), np.float32)), r"got \(\)", id="scalar"),
    pytest.param(npy_declaring("(-4, 1, 28, 28)", b"\x00" * 64), r"expected images of shape \(n, 1, 28, 28\) with n a "
                 r"non-negative integer, got \(-4, 1, 28, 28\) in the \.npy header", id="negative-n"),
    pytest.param(npy_declaring("(True, 1, 28, 28)", b"\x00" * 3136), r"with n a non-negative integer, got "
                 r"\(True, 1, 28, 28\)", id="boolean-n"),
    pytest.param(npy_declaring("(1, -1, 28, 28)"), r"expected images of shape \(n, 1, 28, 28\), got \(1, -1, 28, 28\)",
                 id="negative-channels"),
    pytest.param(npy(np.zeros((2, 1, 28, 28), np.float32))[:-4],
                 r"expected 6272 bytes of image data after the \.npy header for shape \(2, 1, 28, 28\), got 6268",
                 id="truncated"),
    pytest.param(npy(np.zeros((2, 1, 28, 28), np.float32)) + b"\x00" * 4, r"got 6276", id="trailing-bytes"),
    pytest.param(npy(np.where(np.arange(2 * 784).reshape(2, 1, 28, 28) == 800, np.nan, 0).astype(np.float32)),
                 r"images contain NaN or inf \(first bad images: \[1\]\)", id="nan"),
    pytest.param(npy(np.full((3, 1, 28, 28), -np.inf, np.float32)), r"NaN or inf \(first bad images: \[0, 1, 2\]\)",
                 id="inf"),
]


@pytest.mark.parametrize("body, message", MALFORMED)
def test_malformed_bodies_are_400_with_a_precise_message(teacher, server, client, body, message):
    served_before = server.service.images_served
    answer = client.post("/labels", content=body, headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 400, answer.text
    assert re.search(message, answer.json()["detail"]), answer.json()["detail"]
    assert server.service.images_served == served_before
    # The server is still fine, on the same connection.
    good = client.post("/labels", content=npy(mnist_images(3)))
    assert good.status_code == 200 and len(good.json()["labels"]) == 3


@pytest.mark.parametrize("headers, status, message", [
    pytest.param({"Content-Type": "application/json"}, 415, r"expected Content-Type application/octet-stream",
                 id="json-content-type"),
    pytest.param({"X-Request-ID": "x" * 200}, 400, r"expected X-Request-ID of 1 to 128 printable ASCII", id="long-id"),
    pytest.param({"X-Request-ID": "caf\u00e9"}, 400, r"printable ASCII", id="non-ascii-id"),
])
def test_bad_headers_are_refused(client, headers, status, message):
    answer = client.post("/labels", content=npy(mnist_images(2)),
                         headers={k: v.encode("utf-8") for k, v in headers.items()})
    assert answer.status_code == status
    assert re.search(message, answer.json()["detail"])


# --- idempotency: a repeated request id is answered without labelling again -------------------------------


def test_a_repeated_request_id_is_answered_from_memory(server, client):
    request_id = str(uuid.uuid4())
    x = npy(mnist_images(10))
    served_before = server.service.images_served
    first = client.post("/labels", content=x, headers={"X-Request-ID": request_id})
    again = client.post("/labels", content=x, headers={"X-Request-ID": request_id})
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    assert server.service.images_served == served_before + 10

    reused = client.post("/labels", content=npy(mnist_images(4)), headers={"X-Request-ID": request_id})
    assert reused.status_code == 409
    assert "already used for a batch of 10 images, got 4" in reused.json()["detail"]
    assert server.service.images_served == served_before + 10


def test_only_the_most_recent_request_ids_are_remembered(teacher):
    running = ServerThread(create_app(teacher, remembered_requests=2)).start()
    try:
        x = npy(mnist_images(1))
        for request_id in ("a", "b", "c", "a"):  # "a" was forgotten when "c" came
            assert httpx.post(f"{running.url}/labels", content=x, headers={"X-Request-ID": request_id}).status_code == 200
        assert running.service.images_served == 4
        httpx.post(f"{running.url}/labels", content=x, headers={"X-Request-ID": "c"})
        assert running.service.images_served == 4
    finally:
        running.stop()


class BlockingBackend:
    """The teacher, except that each call waits for `release` (to hold a request in flight)."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.input_shape, self.num_classes = inner.name, inner.input_shape, inner.num_classes
        self.bounds, self.preferred_batch = inner.bounds, inner.preferred_batch
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def predict_labels(self, x):
        self.calls += 1
        self.entered.set()
        if not self.release.wait(timeout=10):
            raise TimeoutError("the test never released the teacher")
        return self.inner.predict_labels(x)


def test_a_retry_that_times_out_while_the_server_labels_is_not_labelled_twice(teacher):
    """The client gives up waiting (read timeout) and retries while the first attempt is still being labelled."""
    blocking = BlockingBackend(teacher)
    running = ServerThread(create_app(blocking)).start()
    try:
        backend = HttpBackend(running.url, timeout=0.3, retries=3, backoff=0.0)
        oracle = LabelOracle(backend)

        def release_once_the_retry_waits():
            wait_until(lambda: running.service.requests_repeated >= 1, "the retry to reach the server")
            blocking.release.set()

        releaser = threading.Thread(target=release_once_the_retry_waits, daemon=True)
        releaser.start()
        x = mnist_images(12)
        labels = oracle.labels(x)
        releaser.join(timeout=10)
        np.testing.assert_array_equal(labels, in_process_labels(teacher, x))
        assert blocking.calls == 1
        assert oracle.queries == running.service.images_served == 12
        backend.close()
    finally:
        blocking.release.set()
        running.stop()


# --- accounting under faults: the oracle's count equals what the service labelled --------------------------


def test_accounting_survives_5xx_dropped_connections_and_a_restart(teacher):
    """After any sequence of calls, oracle.queries equals the images the service labelled (summed over its
    lifetimes), with injected 503s, connections dropped before and after the server labelled, and a
    restart while the client is retrying."""
    lifetimes = [ServerThread(create_app(teacher, max_batch=MAX_BATCH, api_key=KEY)).start()]
    port = lifetimes[0].port
    # Request 0 is GET /info. Then POSTs; a failed attempt's retry takes the next number.
    faults = {1: "503", 3: "drop-after", 5: "drop-before", 7: "503", 8: "drop-after", 10: "503"}
    proxy = FaultProxy(port, faults)
    restart = threading.Event()
    retries_seen = []

    def wait_before_retry(retry: int) -> None:
        # Deterministic restart: the new server starts once the client has seen the old one gone.
        retries_seen.append(retry)
        if restart.is_set():
            restart.clear()
            lifetimes.append(ServerThread(create_app(teacher, max_batch=MAX_BATCH, api_key=KEY), port=port).start())

    try:
        backend = HttpBackend(proxy.url, api_key=KEY, retries=4, backoff=0.0)
        backend._wait_before_retry = wait_before_retry
        oracle = LabelOracle(backend, chunk_size=16)
        expected, answered = [], []

        def call(n: int, offset: int) -> None:
            x = mnist_images(n, offset)
            answered.append(oracle.labels(x, ids=np.arange(n)))
            expected.append(in_process_labels(teacher, x))

        call(40, 0)      # chunks 16, 16, 8: requests 1 (503) 2 | 3 (drop-after) 4 | 5 (drop-before) 6
        call(20, 100)    # chunks 16, 4: requests 7 (503) 8 (drop-after) 9 | 10 (503) 11
        lifetimes[0].stop()
        restart.set()
        call(30, 200)    # chunk 16: request 12 finds the server down; the retry reaches the new one
        call(16, 300)
        proxy.faults.update({len(proxy.log): "drop-after", len(proxy.log) + 2: "503"})
        call(33, 400)    # the new lifetime also gets a dropped answer and a 503

        served = sum(lifetime.service.images_served for lifetime in lifetimes)
        assert oracle.queries == served == 40 + 20 + 30 + 16 + 33
        np.testing.assert_array_equal(np.concatenate(answered), np.concatenate(expected))
        np.testing.assert_array_equal(oracle.queries_for(np.arange(40)), [5] * 16 + [4] * 4 + [3] * 10 + [2] * 3 + [1] * 7)

        # The faults did happen, and every retry carried its request's id.
        happened = [entry["fault"] for entry in proxy.log]
        assert happened.count("503") == 4 and happened.count("drop-after") == 3 and happened.count("drop-before") == 1
        assert any(fault.startswith("upstream down") for fault in happened)
        assert len(lifetimes) == 2 and retries_seen
        for entry, retry in zip(proxy.log, proxy.log[1:]):
            if entry["fault"] != "forward":
                assert retry["request_id"] == entry["request_id"], (entry, retry)
        ids = [entry["request_id"] for entry in proxy.log if entry["fault"] == "forward"]
        assert len(ids) == len(set(ids))  # one successful delivery per logical request
        assert sum(lifetime.service.requests_repeated for lifetime in lifetimes) == 3  # the dropped answers
        backend.close()
    finally:
        proxy.close()
        for lifetime in lifetimes:
            if lifetime.thread.is_alive():
                lifetime.stop()


def test_restart_while_the_client_retries_direct_connection(teacher):
    """No proxy: the client's kept-alive connection dies and new connections are refused until the restart."""
    first = ServerThread(create_app(teacher)).start()
    lifetimes = [first]

    def wait_before_retry(retry: int) -> None:
        if len(lifetimes) == 1:
            lifetimes.append(ServerThread(create_app(teacher), port=first.port).start())

    try:
        backend = HttpBackend(first.url, retries=3, backoff=0.0)
        backend._wait_before_retry = wait_before_retry
        oracle = LabelOracle(backend)
        oracle.labels(mnist_images(25))
        first.stop()
        oracle.labels(mnist_images(7))
        assert len(lifetimes) == 2
        assert oracle.queries == first.service.images_served + lifetimes[1].service.images_served == 32
        backend.close()
    finally:
        for lifetime in lifetimes:
            if lifetime.thread.is_alive():
                lifetime.stop()


def test_retries_exhausted_raise_a_connection_error_and_keep_the_counts(teacher):
    running = ServerThread(create_app(teacher)).start()
    backend = HttpBackend(running.url, retries=2, backoff=0.0)
    oracle = LabelOracle(backend)
    oracle.labels(mnist_images(10), ids=np.arange(10))
    running.stop()
    with pytest.raises(TeacherConnectionError, match=(
            rf"label service {re.escape(running.url)} failed 3 attempts at POST /labels \(last error: ConnectError.*\)\. "
            r"Queries counted before this call are kept; this batch was not counted")):
        oracle.labels(mnist_images(5), ids=np.arange(5))
    assert oracle.queries == running.service.images_served == 10
    np.testing.assert_array_equal(oracle.queries_for(np.arange(10)), np.ones(10))
    backend.close()


def test_5xx_are_retried_until_exhausted(teacher):
    running = ServerThread(create_app(teacher)).start()
    proxy = FaultProxy(running.port, {n: "503" for n in range(1, 100)})
    try:
        backend = HttpBackend(proxy.url, retries=3, backoff=0.0)
        with pytest.raises(TeacherConnectionError, match=r"failed 4 attempts at POST /labels \(last error: HTTP 503: "
                                                         r"injected by the test proxy\)"):
            LabelOracle(backend).labels(mnist_images(3))
        assert len(proxy.log) == 1 + 4
        assert len({entry["request_id"] for entry in proxy.log[1:]}) == 1
        assert running.service.images_served == 0
        backend.close()
    finally:
        proxy.close()
        running.stop()


def test_unreachable_service_at_construction():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(TeacherConnectionError, match=rf"127\.0\.0\.1:{port} failed 2 attempts at GET /info"):
        HttpBackend(f"http://127.0.0.1:{port}", retries=1, backoff=0.0)


@pytest.mark.parametrize("options, message", [
    pytest.param({"url": "ftp://host"}, r"expected an http:// or https:// URL, got 'ftp://host'", id="scheme"),
    pytest.param({"retries": -1}, r"retries must be a non-negative integer, got -1", id="retries"),
    pytest.param({"timeout": 0}, r"timeout must be positive seconds, got 0", id="timeout"),
    pytest.param({"backoff": -0.1}, r"backoff must be non-negative seconds, got -0.1", id="backoff"),
])
def test_bad_backend_options(options, message):
    with pytest.raises(InputError, match=message):
        HttpBackend(**{"url": "http://127.0.0.1:9", **options})


# --- a server that answers garbage ------------------------------------------------------------------------

VALID_INFO = {"input_shape": [1, 28, 28], "num_classes": 10, "bounds": [0.0, 1.0], "max_batch": 8,
              "images_served": 0}


@pytest.fixture(scope="module")
def garbage_server():
    """A fake label service whose answers the test chooses (state["info"], state["labels"])."""
    state = {"info": VALID_INFO, "labels": b"", "status": 200, "posts": 0}
    app = FastAPI()

    @app.get("/info")
    async def info():
        return JSONResponse(state["info"])

    @app.post("/labels")
    async def labels():
        state["posts"] += 1
        return Response(state["labels"], status_code=state["status"], media_type="application/json")

    running = ServerThread(app).start()
    yield running, state
    running.stop()


@pytest.mark.parametrize("body, message", [
    pytest.param(b"<html>oops</html>", r"/labels: expected a JSON answer, got b'<html>oops</html>'", id="not-json"),
    pytest.param(b'{"label": [1, 2, 3]}', r"expected a JSON object with a 'labels' list", id="no-labels"),
    pytest.param(b"[1, 2, 3]", r"expected a JSON object with a 'labels' list", id="bare-list"),
    pytest.param(b'{"labels": [1, 2]}', r"expected 3 labels, got 2", id="too-few"),
    pytest.param(b'{"labels": [1, "2", 3]}', r"expected 3 integer labels", id="strings"),
    pytest.param(b'{"labels": [1.5, 2, 3]}', r"expected 3 integer labels", id="floats"),
    pytest.param(b'{"labels": [[1], [2], [3]]}', r"expected 3 integer labels", id="nested"),
    pytest.param(b'{"labels": [true, false, true]}', r"expected 3 integer labels", id="booleans"),
    pytest.param(b'{"labels": [1, 2, 100000000000000000000000]}', r"expected class indices", id="huge"),
    pytest.param(b'{"labels": [1, 2, 99]}', r"returned labels in \[1, 99\]; expected classes in \[0, 10\)",
                 id="out-of-range"),
])
def test_garbage_answers_are_teacher_errors(garbage_server, body, message):
    running, state = garbage_server
    state.update(labels=body, status=200)
    with HttpBackend(running.url, retries=0) as backend:
        oracle = LabelOracle(backend)
        with pytest.raises(TeacherError, match=message) as error:
            oracle.labels(mnist_images(3))
    assert running.url in str(error.value)
    # The oracle counts a batch once the backend hands back an answer, even a wrong one (out-of-range
    # labels); an answer the HTTP client cannot even parse never reaches the oracle.
    assert oracle.queries == (3 if body == b'{"labels": [1, 2, 99]}' else 0)


@pytest.mark.parametrize("status, error_type, message", [
    pytest.param(400, InputError, r"refused the batch \(HTTP 400: bad\)", id="400"),
    pytest.param(404, TeacherError, r"/labels: HTTP 404: bad", id="404"),
])
def test_4xx_is_not_retried(garbage_server, status, error_type, message):
    running, state = garbage_server
    state.update(labels=b'{"detail": "bad"}', status=status)
    posts_before = state["posts"]
    with HttpBackend(running.url, retries=5, backoff=0.0) as backend:
        with pytest.raises(error_type, match=message):
            LabelOracle(backend).labels(mnist_images(2))
    assert state["posts"] == posts_before + 1


@pytest.mark.parametrize("info", [
    pytest.param({**VALID_INFO, "input_shape": [28, 28]}, id="rank-2-shape"),
    pytest.param({**VALID_INFO, "num_classes": "10"}, id="string-classes"),
    pytest.param({**VALID_INFO, "bounds": [1.0, 0.0]}, id="reversed-bounds"),
    pytest.param({**VALID_INFO, "max_batch": 0}, id="zero-max-batch"),  # optional, but checked when given
    pytest.param({k: v for k, v in VALID_INFO.items() if k != "bounds"}, id="no-bounds"),
    pytest.param([1, 2], id="list"),
])
def test_garbage_info_is_a_teacher_error(garbage_server, info):
    running, state = garbage_server
    state["info"] = info
    try:
        with pytest.raises(TeacherError, match=r"/info: expected input_shape \[C, H, W\], num_classes >= 2"):
            HttpBackend(running.url)
    finally:
        state["info"] = VALID_INFO


# --- the command ------------------------------------------------------------------------------------------


def test_serve_command_parses_its_options():
    import argparse

    from db3kd.cli import serve as serve_command

    parser = argparse.ArgumentParser()
    serve_command.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "teacher.onnx", "--port", "0", "--api-key", "k", "--max-batch", "7"])
    assert (args.model, args.host, args.port, args.api_key, args.max_batch) == ("teacher.onnx", "127.0.0.1", 0, "k", 7)
    assert args.run is serve_command.run


def test_serve_command_end_to_end(teacher, tmp_path):
    """`python -m db3kd serve` in a subprocess: prints its URL, answers, stops cleanly on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DB3KD_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "db3kd", "serve", str(TEACHER), "--port", "0", "--max-batch", "32", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        # The first line is the URL; read it in a thread so that a hung process fails the test.
        first_line = []
        reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        line = first_line[0] if first_line else ""
        match = re.search(r"at (http://127\.0\.0\.1:\d+) \(max_batch 32, API key required\)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        backend = HttpBackend(match.group(1), api_key=KEY, retries=20, backoff=0.05)
        x = mnist_images(50)
        np.testing.assert_array_equal(LabelOracle(backend).labels(x), in_process_labels(teacher, x))
        assert httpx.get(f"{match.group(1)}/info", headers=AUTH).json()["images_served"] == 50
        backend.close()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    # uvicorn shuts down gracefully, then lets SIGTERM end the process as it would have.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "stopped after labelling 50 images in 2 requests" in stderr


def test_serve_command_on_a_taken_port_says_so(teacher):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "db3kd", "serve", str(TEACHER), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"db3kd: error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


@pytest.mark.parametrize("options, message", [
    pytest.param({"max_batch": 0}, r"max_batch must be a positive integer, got 0", id="max-batch"),
    pytest.param({"remembered_requests": 0}, r"remembered_requests must be a positive integer, got 0", id="memory"),
    pytest.param({"api_key": ""}, r"api_key must be a non-empty string or None", id="empty-key"),
])
def test_bad_service_options(teacher, options, message):
    with pytest.raises(InputError, match=message):
        create_app(teacher, **options)


def test_a_checkpoint_teacher_behind_the_service(tmp_path):
    """A .pt teacher (TorchBackend.from_checkpoint, as `db3kd serve model.pt` loads it) answers its argmax."""
    from db3kd.checkpoint import ModelSpec, save_checkpoint

    try:
        from db3kd.models import available_models
    except ImportError as e:
        pytest.skip(f"db3kd.models cannot build checkpoints yet: {e}")
    if "lenet5-half" not in available_models():
        pytest.skip("db3kd.models has no lenet5-half")
    torch.manual_seed(0)
    spec = ModelSpec(arch="lenet5-half", input_shape=(1, 28, 28), num_classes=10)
    model = spec.build().eval()
    path = save_checkpoint(tmp_path / "model.pt", model, spec)
    running = ServerThread(create_app(load_teacher(path, device="cpu"))).start()
    try:
        x = torch.from_numpy(mnist_images(30))
        with HttpBackend(running.url) as backend:
            labels = LabelOracle(backend).labels(x)
        with torch.no_grad():
            assert torch.equal(labels, model(x).argmax(dim=1))
    finally:
        running.stop()


def test_info_answer_is_plain_json(server):
    # The protocol promises exactly these keys; clients in other languages rely on them.
    info = json.loads(httpx.get(f"{server.url}/info", headers=AUTH).content)
    assert sorted(info) == ["bounds", "images_served", "input_shape", "max_batch", "num_classes"]
