"""A teacher as a label-only HTTP service: the server side of `db3kd serve`.

Protocol (every route needs `Authorization: Bearer KEY` when the service has an API key):

- `GET /info` -> a JSON object. Required fields (a client needs them): `"input_shape": [C, H, W]`,
  `"num_classes": K`, `"bounds": [lo, hi]`. Optional fields (db3kd serve sends both; a client must work
  without them): `"max_batch": N`, the most images per request (without it, a client starts from a guess and
  halves its batches on 413), and `"images_served": COUNT`, the images labelled so far.
- `POST /labels`, body: a `.npy` file (`np.save`) of float32 images (n, C, H, W), n <= max_batch,
  `Content-Type: application/octet-stream` -> `{"labels": [...]}`, one class per image.
  Optional header `X-Request-ID`: an idempotency key. A repeated id with the same images is answered from
  memory without labelling (or counting) again, so a client may retry a request whose answer it never received;
  a repeated id with different images is refused (409), also while the first request is still being labelled.

Errors are JSON `{"detail": "..."}`, always: 400 malformed body, 401 missing or wrong key, 408 a body not
received within the body timeout, 409 a request id reused for a different batch, 413 too many images, 415 wrong
content type, 429 rate limited (wait `Retry-After` seconds; db3kd serve itself never sends it), 500 the teacher
failed, 503 busy (retry after `Retry-After` seconds). A refused request's body is read and discarded (up to
a hard cap) before the answer, so a client that sends its whole body before reading gets the answer.

The service counts every image it runs through the teacher, exactly once (`images_served`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import io
import json
import logging
import math
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import InputError, TeacherError
from .oracle import LabelOracle
from .teachers.base import LabelBackend

__all__ = ["LabelService", "ServiceLimits", "create_app", "run_server", "server_config"]

log = logging.getLogger("db3kd.serve")

# A float32 4-d array's .npy header is 128 bytes; anything much longer is not one we want to parse.
NPY_HEADER_LIMIT = 4096
NPY_MAGIC = b"\x93NUMPY"
# Request ids are client-chosen strings kept in memory; bound them.
MAX_REQUEST_ID_LENGTH = 128
ACCEPTED_CONTENT_TYPES = ("application/octet-stream", "application/x-npy")
# A refused request's body is read and discarded up to this many times the largest accepted body (and at least
# DRAIN_MINIMUM_BYTES), so that the client gets the answer; a longer body is refused from its header alone.
DRAIN_FACTOR = 4
DRAIN_MINIMUM_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ServiceLimits:
    """What a service grants each connection and request: they bound memory and time, never connections."""

    # Requests holding a body in memory at once (read, queued for the model or labelled); others wait.
    request_slots: int = 8
    # Seconds a request may wait for a slot before a 503 (the teacher is that far behind).
    queue_timeout: float = 60.0
    # Seconds to receive a body once reading it starts (a slower client gets 408 and frees its slot).
    body_timeout: float = 30.0
    # Seconds for a connection to deliver a request's headers, from its opening or its previous answer;
    # an idle or trickling connection is closed then.
    header_timeout: float = 10.0

    def __post_init__(self):
        if isinstance(self.request_slots, bool) or int(self.request_slots) != self.request_slots or self.request_slots < 1:
            raise InputError(f"request_slots must be a positive integer, got {self.request_slots!r}")
        for name in ("queue_timeout", "body_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive seconds, got {getattr(self, name)!r}")


class RequestError(Exception):
    """A request the service refuses; becomes an HTTP error response with `detail` as its message.

    `headers` are added to the response; `drain=False` answers without reading what is left of the body (and
    closes the connection), for a client too slow to wait for.
    """

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, drain: bool = True):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.drain = status, detail, dict(headers or {}), drain


class NpyHeader(NamedTuple):
    """What the header of a .npy file says about the array after it."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int  # where the array's bytes start


class RememberedBatch(NamedTuple):
    """What a request id stands for: its batch (size and digest) and its answer, or the job computing it."""

    n: int
    digest: bytes
    answer: bytes | asyncio.Future


class LabelService:
    """What one `db3kd serve` process holds: the teacher, its image count and its recent answers.

    Images go through a `LabelOracle` (validation, clipping to the teacher's bounds, counting), on one
    worker thread, so the event loop never blocks on the model and the model runs one batch at a time.

    Args:
        backend: the teacher.
        max_batch: most images accepted in one request.
        api_key: bearer token every request must carry; None for an open service.
        remembered_requests: how many recent request ids (and their answers) are kept for retries.
        limits: slots and timeouts (see `ServiceLimits`).
    """

    def __init__(self, backend: LabelBackend, max_batch: int = 1024, api_key: str | None = None,
                 remembered_requests: int = 1024, limits: ServiceLimits | None = None):
        if isinstance(max_batch, bool) or int(max_batch) != max_batch or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if int(remembered_requests) != remembered_requests or remembered_requests < 1:
            raise InputError(f"remembered_requests must be a positive integer, got {remembered_requests!r}")
        if api_key is not None and not api_key:
            raise InputError("api_key must be a non-empty string or None")
        self.backend = backend
        self.max_batch = int(max_batch)
        self.limits = limits or ServiceLimits()
        # One model call per request (chunk = max_batch): a request is labelled entirely or not at all.
        self._oracle = LabelOracle(backend, chunk_size=self.max_batch)
        self._api_key = None if api_key is None else api_key.encode()
        self._remembered_requests = int(remembered_requests)
        self._answers: OrderedDict[str, RememberedBatch] = OrderedDict()  # request id -> batch and answer body
        self._answers_lock = threading.Lock()
        self._in_flight: dict[str, RememberedBatch] = {}  # request id -> batch and the job labelling it
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db3kd-teacher")
        self._slots = asyncio.Semaphore(self.limits.request_slots)
        self.image_bytes = 4 * math.prod(backend.input_shape)
        self.max_body_bytes = NPY_HEADER_LIMIT + self.max_batch * self.image_bytes
        self.drain_limit = max(DRAIN_FACTOR * self.max_body_bytes, DRAIN_MINIMUM_BYTES)
        self.requests_labelled = 0
        self.requests_repeated = 0

    @property
    def images_served(self) -> int:
        """Images run through the teacher since this service started."""
        return self._oracle.queries

    def info(self) -> dict:
        """The answer of GET /info."""
        return {
            "input_shape": list(self.backend.input_shape),
            "num_classes": self.backend.num_classes,
            "bounds": list(self.backend.bounds),
            "max_batch": self.max_batch,
            "images_served": self.images_served,
        }

    def check_auth(self, authorization: str | None) -> None:
        if self._api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the key was right.
        key_matches = hmac.compare_digest(token.strip().encode(), self._api_key)
        if scheme.lower() != "bearer" or not key_matches:
            raise RequestError(401, "missing or wrong API key: expected header 'Authorization: Bearer KEY' "
                                    "(db3kd clients: --api-key or $DB3KD_API_KEY)",
                               headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def request_slot(self) -> AsyncIterator[None]:
        """Hold one of the `limits.request_slots` (a body in memory) for the duration of the block."""
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"the service is busy: all {self.limits.request_slots} request slots stayed "
                                    f"taken for {self.limits.queue_timeout:g} s; retry later",
                               headers={"Retry-After": "1"}) from None
        try:
            yield
        finally:
            self._slots.release()

    async def answer(self, images: np.ndarray, request_id: str | None) -> bytes:
        """The JSON response body for `images`, labelling them only if `request_id` was not seen before."""
        if request_id is None:
            return await self._run(images, None)
        batch = RememberedBatch(len(images), batch_digest(images), b"")
        remembered = self._recall(request_id)
        if remembered is not None:
            _check_same_batch(request_id, remembered, batch)
            self.requests_repeated += 1
            log.info("request %s repeated: answered from memory, not labelled again", request_id)
            return remembered.answer
        pending = self._in_flight.get(request_id)
        if pending is not None:
            _check_same_batch(request_id, pending, batch)
            # A retry of a request still being labelled (the client gave up waiting): share its answer.
            self.requests_repeated += 1
            log.info("request %s repeated while being labelled: waiting for the first answer", request_id)
            return await asyncio.shield(pending.answer)
        return await self._run(images, batch, request_id)

    async def _run(self, images: np.ndarray, batch: RememberedBatch | None, request_id: str | None = None) -> bytes:
        job = asyncio.get_running_loop().run_in_executor(self._worker, self._label, images, batch, request_id)
        if request_id is not None:
            self._in_flight[request_id] = batch._replace(answer=job)
            job.add_done_callback(lambda _: self._in_flight.pop(request_id, None))
        # shield: if this request is cancelled, the model call still finishes and its answer is remembered.
        return await asyncio.shield(job)

    def _label(self, images: np.ndarray, batch: RememberedBatch | None, request_id: str | None) -> bytes:
        # Worker thread. Counting and remembering happen here, together with the model call, so a request
        # whose client has vanished is still counted once and answered from memory when retried.
        labels = self._oracle.labels(images)
        body = json.dumps({"labels": labels.tolist()}, separators=(",", ":")).encode()
        self.requests_labelled += 1
        if request_id is not None:
            with self._answers_lock:
                self._answers[request_id] = batch._replace(answer=body)
                while len(self._answers) > self._remembered_requests:
                    self._answers.popitem(last=False)
        return body

    def _recall(self, request_id: str) -> RememberedBatch | None:
        with self._answers_lock:
            remembered = self._answers.get(request_id)
            if remembered is not None:
                self._answers.move_to_end(request_id)
        return remembered

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def batch_digest(images: np.ndarray) -> bytes:
    """A digest of a C-contiguous batch (shape and pixels): a request id's batch is known by it."""
    digest = hashlib.blake2b(repr(images.shape).encode(), digest_size=16)
    digest.update(images.reshape(-1).view(np.uint8))
    return digest.digest()


def _check_same_batch(request_id: str, known: RememberedBatch, batch: RememberedBatch) -> None:
    if (known.n, known.digest) != (batch.n, batch.digest):
        raise RequestError(409, f"X-Request-ID {request_id!r} was already used for a batch of {known.n} images, "
                                f"got {batch.n} different images; send a fresh id for every new batch")


def parse_npy_header(data: bytes | bytearray) -> NpyHeader | None:
    """The header at the start of a .npy file; None if more bytes are needed.

    Raises RequestError(400) if the bytes are not a .npy header. Never unpickles: the header is a Python
    literal parsed by NumPy's own safe reader, and object arrays are refused by the caller from their dtype.
    """
    prefix = bytes(data[:len(NPY_MAGIC)])
    if prefix != NPY_MAGIC[:len(prefix)]:
        raise RequestError(400, f"expected a .npy file (numpy.save) starting with {NPY_MAGIC!r}, "
                                f"got bytes starting with {bytes(data[:8])!r}")
    if len(data) < 10:
        return None
    major, minor = data[6], data[7]
    if (major, minor) == (1, 0):
        length_bytes = 2
    elif (major, minor) == (2, 0):
        length_bytes = 4
    else:
        raise RequestError(400, f"expected .npy format version 1.0 or 2.0, got {major}.{minor}")
    start = 8 + length_bytes
    if len(data) < start:
        return None
    header_length = int.from_bytes(bytes(data[8:start]), "little")
    if header_length > NPY_HEADER_LIMIT:
        raise RequestError(400, f".npy header of {header_length} bytes is longer than the {NPY_HEADER_LIMIT} accepted")
    if len(data) < start + header_length:
        return None
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = reader(io.BytesIO(bytes(data[8:start + header_length])),
                                             max_header_size=NPY_HEADER_LIMIT)
    except (ValueError, SyntaxError, TypeError) as e:
        raise RequestError(400, f"malformed .npy header: {e}") from e
    return NpyHeader(tuple(shape), bool(fortran_order), dtype, start + header_length)


def check_npy_header(header: NpyHeader, input_shape: tuple[int, ...], max_batch: int) -> None:
    """Refuse a .npy header that is not float32 (n, *input_shape) with 0 <= n <= max_batch."""
    shape, dtype = header.shape, header.dtype
    if dtype != np.dtype("<f4"):
        raise RequestError(400, f"expected float32 images (dtype '<f4'), got dtype {dtype.str!r}"
                                f"{' (object arrays are never accepted)' if dtype.hasobject else ''}")
    expected = f"(n, {', '.join(map(str, input_shape))})"
    if len(shape) != 4 or shape[1:] != tuple(input_shape):
        raise RequestError(400, f"expected images of shape {expected}, got {shape}")
    # NumPy's header reader takes any Python int, so n may be negative or a bool (True == 1).
    if type(shape[0]) is not int or shape[0] < 0:
        raise RequestError(400, f"expected images of shape {expected} with n a non-negative integer, got "
                                f"{shape!r} in the .npy header")
    if shape[0] > max_batch:
        raise RequestError(413, f"expected at most {max_batch} images per request, got {shape[0]}; "
                                "split the batch (GET /info gives max_batch)")


def decode_npy(body: bytearray, header: NpyHeader) -> np.ndarray:
    """The images of a .npy body whose header passed `check_npy_header`, without copying when C-ordered."""
    shape, offset = header.shape, header.data_offset
    expected = math.prod(shape) * 4
    if len(body) - offset != expected:
        raise RequestError(400, f"expected {expected} bytes of image data after the .npy header for shape {shape}, "
                                f"got {len(body) - offset}")
    images = np.frombuffer(body, dtype="<f4", count=math.prod(shape), offset=offset)
    images = images.reshape(shape, order="F" if header.fortran_order else "C")
    return np.ascontiguousarray(images)


def check_body_headers(request: Request, service: LabelService) -> None:
    """Refuse from its headers alone a body of the wrong type or declared longer than any accepted."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise RequestError(415, f"expected Content-Type application/octet-stream (a .npy file), got {content_type!r}")
    declared = _content_length(request)
    if declared is not None and declared > service.max_body_bytes:
        raise RequestError(413, f"request body of {declared} bytes exceeds the {service.max_body_bytes} bytes "
                                f"of {service.max_batch} images; split the batch (GET /info gives max_batch)")


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise RequestError(400, f"expected a non-negative integer Content-Length, got {declared!r}", drain=False)
    return int(declared)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive, noting in `request.state` whether it has started and ended
    (`drain_body` must know: asking for more after the end would wait forever). ClientDisconnect if the client goes."""
    state = request.state
    while not getattr(state, "body_complete", False):
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        state.body_started = True
        state.body_complete = not message.get("more_body", False)
        if message.get("body"):
            yield message["body"]


async def read_npy_body(request: Request, service: LabelService) -> tuple[bytearray, NpyHeader]:
    """The request's body and parsed .npy header, refusing oversized or malformed bodies as early as possible."""
    body = bytearray()
    header = None
    async for chunk in body_chunks(request):
        body += chunk
        if len(body) > service.max_body_bytes:
            raise RequestError(413, f"request body exceeds the {service.max_body_bytes} bytes of "
                                    f"{service.max_batch} images; split the batch")
        if header is None:
            # Decide from the header alone whenever possible: the app stops reading a body it refuses.
            header = parse_npy_header(body)
            if header is not None:
                check_npy_header(header, service.backend.input_shape, service.max_batch)
    if header is None:
        raise RequestError(400, f"expected a .npy file (numpy.save), got {len(body)} bytes ending before the "
                                "end of the .npy header")
    return body, header


async def read_npy_body_in_time(request: Request, service: LabelService) -> tuple[bytearray, NpyHeader]:
    """`read_npy_body`, refused with 408 if the body takes longer than `limits.body_timeout` to arrive."""
    try:
        return await asyncio.wait_for(read_npy_body(request, service), service.limits.body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"expected the request body within {service.limits.body_timeout:g} s, "
                                "got only part of it; send it faster or in smaller batches", drain=False) from None


async def drain_body(request: Request, limit: int, timeout: float) -> bool:
    """Read and discard what is left of the request body, so that a client still sending it gets the answer:
    closing a socket with unread data resets the connection, and the client sees only the reset.

    Returns False (the connection must then be closed) for a body of more than `limit` bytes, one not
    received within `timeout` seconds, or one the client has not started sending because it waits for
    `100 Continue` (it then reads the answer instead of sending the body).
    """
    state = request.state
    if getattr(state, "body_complete", False):
        return True
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return False
    if not getattr(state, "body_started", False) and "100-continue" in request.headers.get("expect", "").lower():
        return False

    async def discard() -> bool:
        drained = 0
        async for chunk in body_chunks(request):
            drained += len(chunk)
            if drained > limit:
                return False
        return True

    try:
        return await asyncio.wait_for(discard(), timeout)
    except (asyncio.TimeoutError, ClientDisconnect):
        return False


def _request_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= MAX_REQUEST_ID_LENGTH or not value.isascii() or not value.isprintable():
        raise RequestError(400, f"expected X-Request-ID of 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters "
                                f"(a uuid4), got {value[:MAX_REQUEST_ID_LENGTH + 1]!r}")
    return value


def create_app(backend: LabelBackend, max_batch: int = 1024, api_key: str | None = None,
               remembered_requests: int = 1024, limits: ServiceLimits | None = None) -> FastAPI:
    """The FastAPI application serving `backend` (see the module docstring for the protocol).

    The `LabelService` behind it is `app.state.service` (its `images_served` is the image count). Serve it
    with `server_config(app)`, which applies its `limits.header_timeout`.
    """
    service = LabelService(backend, max_batch=max_batch, api_key=api_key, remembered_requests=remembered_requests,
                           limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()
        log.info("stopped after labelling %d images in %d requests (%d repeated requests answered from memory)",
                 service.images_served, service.requests_labelled, service.requests_repeated)

    # No /docs or /openapi.json: every route of a label service sits behind its API key.
    app = FastAPI(title="db3kd label service", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        log.warning("%s %s refused (%d): %s", request.method, request.url.path, error.status, error.detail)
        headers = dict(error.headers)
        if not (error.drain and await drain_body(request, service.drain_limit, service.limits.body_timeout)):
            headers["Connection"] = "close"  # the rest of the body is still coming: this connection is done
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        # A client that gave up (timeout, Ctrl+C) is no fault of the service: one line, no traceback.
        log.warning("%s %s: the client disconnected before sending its whole request; nothing was labelled",
                    request.method, request.url.path)
        return JSONResponse({"detail": "client disconnected"}, status_code=400)  # never delivered

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        # A bug; Starlette still re-raises it afterwards, so the traceback is logged.
        return JSONResponse({"detail": f"internal error of the label service ({type(error).__name__}); "
                                       "see its log"}, status_code=500)

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        service.check_auth(request.headers.get("authorization"))
        return JSONResponse(service.info())

    @app.post("/labels")
    async def labels(request: Request) -> Response:
        service.check_auth(request.headers.get("authorization"))
        request_id = _request_id(request.headers.get("x-request-id"))
        check_body_headers(request, service)
        async with service.request_slot():
            body, header = await read_npy_body_in_time(request, service)
            images = decode_npy(body, header)
            try:
                answer = await service.answer(images, request_id)
            except InputError as e:  # NaN or inf pixels, found by the oracle before the teacher sees them
                raise RequestError(400, str(e)) from e
            except TeacherError as e:  # the model itself failed: a server-side error the client may retry
                raise RequestError(500, f"the teacher failed: {e}") from e
        return Response(answer, media_type="application/json")

    return app


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus two guards against idle or careless clients.

    - A connection must deliver each request's headers within `header_timeout` seconds of its opening or of
      its previous answer, else it is closed: an idle or trickling connection holds a socket, never for long.
      (uvicorn alone times out only idle keep-alive connections, and resets that timer on every byte.)
    - Malformed HTTP gets the protocol's JSON error, not uvicorn's plain text.
    """

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers have arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_header_timer()  # before: the super call may go on to a pipelined request's headers
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"detail": f"expected an HTTP/1.1 request, got malformed HTTP ({msg})"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request within %g s", self._header_timeout)
            self.transport.close()


def server_config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration serving `app` (from `create_app`) as `db3kd serve` does.

    No connection limit: uvicorn's `limit_concurrency` counts open connections, so idle ones would turn
    everyone away. Memory is bounded by the service's request slots instead, and time by its timeouts.
    """
    limits = app.state.service.limits
    return uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        # Per-request access lines only when debugging: a training run sends thousands of requests.
        access_log=log_level == "debug",
        # h11 explicitly: the header timeout is built on its protocol class (httptools would be chosen if installed).
        http=functools.partial(_H11Protocol, header_timeout=limits.header_timeout),
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock = socket.socket(family, kind, proto)
    # SO_REUSEADDR: a restarted server may rebind its port while old connections linger in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)
    return sock


def service_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(backend: LabelBackend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch: int = 1024, log_level: str = "info", limits: ServiceLimits | None = None) -> None:
    """Serve `backend` until interrupted (Ctrl+C / SIGTERM); prints the URL once the port is open."""
    app = create_app(backend, max_batch=max_batch, api_key=api_key, limits=limits)
    sock = bind_socket(host, port)
    url = service_url(sock)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can query the teacher", host)
    print(f"db3kd serve: {backend.name} at {url} (max_batch {max_batch}, "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    uvicorn.Server(server_config(app, log_level=log_level)).run(sockets=[sock])
