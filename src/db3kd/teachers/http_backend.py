"""A remote label service (`db3kd serve`, see `db3kd.serve` for the protocol) as a teacher."""

from __future__ import annotations

import io
import uuid

import numpy as np

from ..errors import TeacherError
from .http_sender import HttpSender, retry_after_seconds  # noqa: F401 (retry_after_seconds: part of this module's API)
from .remote import RemoteBackend

# Images per request to a service whose /info gives no max_batch: a first guess, halved on each 413.
DEFAULT_BATCH = 256


def encode_npy(images: np.ndarray) -> bytes:
    """`images` as the bytes of a .npy file (what `np.save` writes), with a single copy of the data."""
    images = np.ascontiguousarray(images, dtype="<f4")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(images))
    return b"".join((header.getvalue(), images.reshape(-1).view(np.uint8)))


class HttpBackend(RemoteBackend):
    """Labels from a remote label service: `db3kd serve` or any service speaking its protocol.

    The input contract (shape, classes, bounds) is read from the service's `/info`. Every request is sent
    with a fresh `X-Request-ID`, kept across retries: the service answers a retried request from memory,
    so a batch it labelled but whose answer was lost is neither labelled nor counted twice.

    A batch is sent in requests of at most the service's `max_batch` images, `concurrency` of them in flight
    at once; a service that gives no `max_batch` is sent `DEFAULT_BATCH` at first, and a request it refuses as
    too large (413) is split in two, the smaller size kept for later calls. If a request fails for good, the
    error's `answered` says how many images the others had answered (`answered_at`: which, when they are not
    the first ones), and the oracle counts them.

    A 429 (rate limited) is waited out, `Retry-After` seconds if the service says (else 1 s, doubled each
    time), without using up `retries`; a request gives up after `rate_limit_wait` seconds of such waits.

    Args:
        url: the service, e.g. `http://127.0.0.1:8000`.
        api_key: the service's bearer token, if it has one.
        timeout: seconds to wait for a connection or an answer before retrying.
        retries: attempts after the first on connection errors, timeouts and 5xx answers.
        backoff: seconds before the first retry, doubled at each further one (at most 10 s).
        rate_limit_wait: most seconds one request spends waiting on 429 answers before failing.
        concurrency: requests in flight at once (one batch is split over them).
        max_rps: most requests started per second, over all of them; None for no limit.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2, rate_limit_wait: float = 300.0, concurrency: int = 1,
                 max_rps: float | None = None):
        self.sender = HttpSender(url, "label service", api_key=api_key, timeout=timeout, retries=retries,
                                 backoff=backoff, rate_limit_wait=rate_limit_wait, concurrency=concurrency,
                                 max_rps=max_rps, idempotent=True)
        self.url = self.name = self.sender.url
        try:
            self._read_info(self.sender.json(self.sender.send("GET", "/info"), "/info"))
        except BaseException:
            self.close()
            raise

    def _read_info(self, info) -> None:
        # Required: input_shape, num_classes, bounds. Optional: max_batch (checked when given), images_served.
        try:
            shape = tuple(info["input_shape"])
            num_classes, bounds, max_batch = info["num_classes"], tuple(info["bounds"]), info.get("max_batch")
            valid = (len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)
                     and type(num_classes) is int and num_classes >= 2
                     and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds) and bounds[0] < bounds[1]
                     and (max_batch is None or type(max_batch) is int and max_batch >= 1))
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise TeacherError(f"{self.name}/info: expected input_shape [C, H, W], num_classes >= 2, bounds [lo, hi] "
                               f"and, if given, max_batch >= 1, got {str(info)[:200]}")
        self.input_shape = shape
        self.num_classes = num_classes
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.max_batch = max_batch  # None: the service did not say
        # A service is identified by its URL and the contract it declares (not by its count of images served).
        self.identity = f"{self.url} input_shape={list(shape)} num_classes={num_classes} bounds={list(self.bounds)}"
        self._start(self.url, DEFAULT_BATCH if max_batch is None else max_batch)

    def _request(self, images: np.ndarray) -> np.ndarray | None:
        """Labels of one request's images; None if the service refused them as too many (413)."""
        headers = {"Content-Type": "application/octet-stream", "X-Request-ID": str(uuid.uuid4())}
        response = self.sender.send("POST", "/labels", content=encode_npy(images), headers=headers, accept=(413,))
        if response.status_code == 413:
            self._too_large(len(images), response, "/labels")
            return None
        payload = self.sender.json(response, "/labels")
        n = len(images)
        labels = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(labels, list):
            raise TeacherError(f"{self.name}/labels: expected a JSON object with a 'labels' list, got {str(payload)[:200]}")
        if len(labels) != n:
            raise TeacherError(f"{self.name}/labels: expected {n} labels, got {len(labels)}")
        # type() rather than isinstance: JSON true/false arrive as bool, a subclass of int.
        if not all(type(label) is int for label in labels):
            raise TeacherError(f"{self.name}/labels: expected {n} integer labels, got {str(payload)[:200]}")
        try:
            return np.asarray(labels, dtype=np.int64)  # the oracle checks they are classes in [0, K)
        except OverflowError:
            raise TeacherError(f"{self.name}/labels: expected class indices, got {str(payload)[:200]}") from None

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"
