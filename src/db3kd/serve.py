"""A teacher as a label-only HTTP service: the server side of `db3kd serve`.

Protocol (every route needs `Authorization: Bearer KEY` when the service has an API key):

- `GET /info` -> `{"input_shape": [C, H, W], "num_classes": K, "bounds": [lo, hi], "max_batch": N,
  "images_served": COUNT}`.
- `POST /labels`, body: a `.npy` file (`np.save`) of float32 images (n, C, H, W), n <= max_batch,
  `Content-Type: application/octet-stream` -> `{"labels": [...]}`, one class per image.
  Optional header `X-Request-ID`: an idempotency key. A repeated id is answered from memory without
  labelling (or counting) again, so a client may retry a request whose answer it never received.

Errors are JSON `{"detail": "..."}`: 400 malformed body, 401 missing or wrong key, 409 a request id reused
for a different batch, 413 too many images, 415 wrong content type, 5xx a server-side failure (retry).

The service counts every image it runs through the teacher, exactly once (`images_served`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import math
import socket
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .errors import InputError, TeacherError
from .oracle import LabelOracle
from .teachers.base import LabelBackend

__all__ = ["LabelService", "create_app", "run_server"]

log = logging.getLogger("db3kd.serve")

# A float32 4-d array's .npy header is 128 bytes; anything much longer is not one we want to parse.
NPY_HEADER_LIMIT = 4096
NPY_MAGIC = b"\x93NUMPY"
# Request ids are client-chosen strings kept in memory; bound them.
MAX_REQUEST_ID_LENGTH = 128
ACCEPTED_CONTENT_TYPES = ("application/octet-stream", "application/x-npy")


class RequestError(Exception):
    """A request the service refuses; becomes an HTTP error response with `detail` as its message."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class NpyHeader(NamedTuple):
    """What the header of a .npy file says about the array after it."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int  # where the array's bytes start


class LabelService:
    """What one `db3kd serve` process holds: the teacher, its image count and its recent answers.

    Images go through a `LabelOracle` (validation, clipping to the teacher's bounds, counting), on one
    worker thread, so the event loop never blocks on the model and the model runs one batch at a time.

    Args:
        backend: the teacher.
        max_batch: most images accepted in one request.
        api_key: bearer token every request must carry; None for an open service.
        remembered_requests: how many recent request ids (and their answers) are kept for retries.
    """

    def __init__(self, backend: LabelBackend, max_batch: int = 1024, api_key: str | None = None,
                 remembered_requests: int = 1024):
        if isinstance(max_batch, bool) or int(max_batch) != max_batch or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if int(remembered_requests) != remembered_requests or remembered_requests < 1:
            raise InputError(f"remembered_requests must be a positive integer, got {remembered_requests!r}")
        if api_key is not None and not api_key:
            raise InputError("api_key must be a non-empty string or None")
        self.backend = backend
        self.max_batch = int(max_batch)
        # One model call per request (chunk = max_batch): a request is labelled entirely or not at all.
        self._oracle = LabelOracle(backend, chunk_size=self.max_batch)
        self._api_key = None if api_key is None else api_key.encode()
        self._remembered_requests = int(remembered_requests)
        self._answers: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # request id -> (n, response body)
        self._answers_lock = threading.Lock()
        self._in_flight: dict[str, asyncio.Future] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db3kd-teacher")
        self.image_bytes = 4 * math.prod(backend.input_shape)
        self.max_body_bytes = NPY_HEADER_LIMIT + self.max_batch * self.image_bytes
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
                                    "(db3kd clients: --api-key or $DB3KD_API_KEY)")

    async def answer(self, images: np.ndarray, request_id: str | None) -> bytes:
        """The JSON response body for `images`, labelling them only if `request_id` was not seen before."""
        if request_id is not None:
            remembered = self._recall(request_id, len(images))
            if remembered is not None:
                self.requests_repeated += 1
                log.info("request %s repeated: answered from memory, not labelled again", request_id)
                return remembered
            pending = self._in_flight.get(request_id)
            if pending is not None:
                # A retry of a request still being labelled (the client gave up waiting): share its answer.
                self.requests_repeated += 1
                log.info("request %s repeated while being labelled: waiting for the first answer", request_id)
                return await asyncio.shield(pending)
        job = asyncio.get_running_loop().run_in_executor(self._worker, self._label, images, request_id)
        if request_id is not None:
            self._in_flight[request_id] = job
            job.add_done_callback(lambda _: self._in_flight.pop(request_id, None))
        # shield: if this request is cancelled, the model call still finishes and its answer is remembered.
        return await asyncio.shield(job)

    def _label(self, images: np.ndarray, request_id: str | None) -> bytes:
        # Worker thread. Counting and remembering happen here, together with the model call, so a request
        # whose client has vanished is still counted once and answered from memory when retried.
        labels = self._oracle.labels(images)
        body = json.dumps({"labels": labels.tolist()}, separators=(",", ":")).encode()
        self.requests_labelled += 1
        if request_id is not None:
            with self._answers_lock:
                self._answers[request_id] = (len(images), body)
                while len(self._answers) > self._remembered_requests:
                    self._answers.popitem(last=False)
        return body

    def _recall(self, request_id: str, n: int) -> bytes | None:
        with self._answers_lock:
            remembered = self._answers.get(request_id)
            if remembered is None:
                return None
            self._answers.move_to_end(request_id)
        if remembered[0] != n:
            raise RequestError(409, f"X-Request-ID {request_id!r} was already used for a batch of {remembered[0]} "
                                    f"images, got {n}; send a fresh id for every new batch")
        return remembered[1]

    def close(self) -> None:
        self._worker.shutdown(wait=True)


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
    """Refuse a .npy header that is not float32 (n, *input_shape) with n <= max_batch."""
    shape, dtype = header.shape, header.dtype
    if dtype != np.dtype("<f4"):
        raise RequestError(400, f"expected float32 images (dtype '<f4'), got dtype {dtype.str!r}"
                                f"{' (object arrays are never accepted)' if dtype.hasobject else ''}")
    expected = f"(n, {', '.join(map(str, input_shape))})"
    if len(shape) != 4 or shape[1:] != tuple(input_shape):
        raise RequestError(400, f"expected images of shape {expected}, got {shape}")
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


async def read_npy_body(request: Request, service: LabelService) -> tuple[bytearray, NpyHeader]:
    """The request's body and parsed .npy header, refusing oversized or malformed bodies as early as possible."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise RequestError(415, f"expected Content-Type application/octet-stream (a .npy file), got {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"expected a non-negative integer Content-Length, got {declared!r}")
        declared = int(declared)
        if declared > service.max_body_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the {service.max_body_bytes} bytes "
                                    f"of {service.max_batch} images; split the batch (GET /info gives max_batch)")
    body = bytearray()
    header = None
    async for chunk in request.stream():
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


def _request_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= MAX_REQUEST_ID_LENGTH or not value.isascii() or not value.isprintable():
        raise RequestError(400, f"expected X-Request-ID of 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters "
                                f"(a uuid4), got {value[:MAX_REQUEST_ID_LENGTH + 1]!r}")
    return value


def create_app(backend: LabelBackend, max_batch: int = 1024, api_key: str | None = None,
               remembered_requests: int = 1024) -> FastAPI:
    """The FastAPI application serving `backend` (see the module docstring for the protocol).

    The `LabelService` behind it is `app.state.service` (its `images_served` is the image count).
    """
    service = LabelService(backend, max_batch=max_batch, api_key=api_key, remembered_requests=remembered_requests)

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
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        service.check_auth(request.headers.get("authorization"))
        return JSONResponse(service.info())

    @app.post("/labels")
    async def labels(request: Request) -> Response:
        service.check_auth(request.headers.get("authorization"))
        request_id = _request_id(request.headers.get("x-request-id"))
        body, header = await read_npy_body(request, service)
        images = decode_npy(body, header)
        try:
            answer = await service.answer(images, request_id)
        except InputError as e:  # NaN or inf pixels, found by the oracle before the teacher sees them
            raise RequestError(400, str(e)) from e
        except TeacherError as e:  # the model itself failed: a server-side error the client may retry
            raise RequestError(500, f"the teacher failed: {e}") from e
        return Response(answer, media_type="application/json")

    return app


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
               max_batch: int = 1024, log_level: str = "info") -> None:
    """Serve `backend` until interrupted (Ctrl+C / SIGTERM); prints the URL once the port is open."""
    import uvicorn

    app = create_app(backend, max_batch=max_batch, api_key=api_key)
    sock = bind_socket(host, port)
    url = service_url(sock)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can query the teacher", host)
    print(f"db3kd serve: {backend.name} at {url} (max_batch {max_batch}, "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        # Per-request access lines only when debugging: a training run sends thousands of requests.
        access_log=log_level == "debug",
        # Bounds the bodies held in memory at once; over the limit a client gets 503 and retries.
        limit_concurrency=64,
    )
    uvicorn.Server(config).run(sockets=[sock])
