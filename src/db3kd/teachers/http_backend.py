"""A remote label service (`db3kd serve`, see `db3kd.serve` for the protocol) as a teacher."""

from __future__ import annotations

import email.utils
import io
import logging
import math
import time
import uuid
from datetime import datetime, timezone

import httpx
import numpy as np
import torch

from ..errors import DB3KDError, InputError, TeacherConnectionError, TeacherError, TeacherRateLimitError

log = logging.getLogger(__name__)

# Largest chunk asked of a server: keeps one request's body at a few MB, so a retry re-sends little.
MAX_PREFERRED_BATCH = 1024
# Images per request to a service whose /info gives no max_batch: a first guess, halved on each 413.
DEFAULT_BATCH = 256
# Longest wait between two attempts, whatever the back-off and attempt number (unless Retry-After asks more).
MAX_BACKOFF_SECONDS = 10.0
# Waits after a 429 without a usable Retry-After: this, then doubled each time (at most MAX_BACKOFF_SECONDS).
# Also the shortest wait after any 429: a rate-limited service is never asked again at once.
RATE_LIMIT_BACKOFF = 1.0
# Transport failures worth retrying: the request may not have arrived, or its answer was lost.
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def encode_npy(images: np.ndarray) -> bytes:
    """`images` as the bytes of a .npy file (what `np.save` writes), with a single copy of the data."""
    images = np.ascontiguousarray(images, dtype="<f4")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(images))
    return b"".join((header.getvalue(), images.reshape(-1).view(np.uint8)))


class HttpBackend:
    """Labels from a remote label service: `db3kd serve` or any service speaking its protocol.

    The input contract (shape, classes, bounds) is read from the service's `/info`. Every request is sent
    with a fresh `X-Request-ID`, kept across retries: the service answers a retried request from memory,
    so a batch it labelled but whose answer was lost is neither labelled nor counted twice.

    A batch is sent in requests of at most the service's `max_batch` images; a service that gives none is
    sent `DEFAULT_BATCH` at first, and a request it refuses as too large (413) is split in two, the smaller
    size kept for later calls. If a later request of a split batch fails for good, the error's `answered`
    says how many images (the first ones) were answered, and the oracle counts them.

    A 429 (rate limited) is waited out, `Retry-After` seconds if the service says (else 1 s, doubled each
    time), without using up `retries`; a request gives up after `rate_limit_wait` seconds of such waits.

    Args:
        url: the service, e.g. `http://127.0.0.1:8000`.
        api_key: the service's bearer token, if it has one.
        timeout: seconds to wait for a connection or an answer before retrying.
        retries: attempts after the first on connection errors, timeouts and 5xx answers.
        backoff: seconds before the first retry, doubled at each further one (at most 10 s).
        rate_limit_wait: most seconds one request spends waiting on 429 answers before failing.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2, rate_limit_wait: float = 300.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"expected an http:// or https:// URL, got {url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries must be a non-negative integer, got {retries!r}")
        if not timeout > 0:
            raise InputError(f"timeout must be positive seconds, got {timeout!r}")
        if not backoff >= 0:
            raise InputError(f"backoff must be non-negative seconds, got {backoff!r}")
        if not rate_limit_wait >= 0:
            raise InputError(f"rate_limit_wait must be non-negative seconds, got {rate_limit_wait!r}")
        self.url = url.rstrip("/")
        self.name = self.url
        self.retries, self.backoff, self.rate_limit_wait = retries, float(backoff), float(rate_limit_wait)
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # One client for the backend's lifetime: its connection is kept alive between batches.
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        try:
            info = self._json(self._send("GET", "/info"), "/info")
            self._read_info(info)
        except BaseException:
            self._client.close()
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
        self.batch_limit = DEFAULT_BATCH if max_batch is None else max_batch  # most images sent in one request
        self.preferred_batch = min(self.batch_limit, MAX_PREFERRED_BATCH)

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        images = x.detach().cpu().numpy()
        labels = np.empty(len(images), dtype=np.int64)
        done = 0
        try:
            while done < len(images):
                size = min(self.batch_limit, len(images) - done)
                answer = self._labels(images[done:done + size])
                if answer is None:  # 413: too large for the service; batch_limit is now smaller
                    continue
                labels[done:done + size] = answer
                done += size
        except DB3KDError as error:
            if not done:
                raise
            # The first `done` images were answered, so paid for: say so, and let the oracle count them.
            partial = type(error)(f"{error} The first {done} of the {len(images)} images of this call were "
                                  "answered before that and are counted.")
            partial.answered = done
            raise partial from error
        return labels

    def _labels(self, images: np.ndarray) -> np.ndarray | None:
        """Labels of one request's images; None if the service refused them as too many (413)."""
        body = encode_npy(images)
        headers = {"Content-Type": "application/octet-stream", "X-Request-ID": str(uuid.uuid4())}
        response = self._send("POST", "/labels", content=body, headers=headers, accept=(413,))
        if response.status_code == 413:
            if len(images) == 1:
                self._refuse(response, "/labels")
            self.batch_limit = len(images) // 2
            self.preferred_batch = min(self.preferred_batch, self.batch_limit)
            log.info("%s refused %d images in one request (HTTP 413: %s); sending at most %d from now on",
                     self.name, len(images), _detail(response), self.batch_limit)
            return None
        payload = self._json(response, "/labels")
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

    def _send(self, method: str, path: str, accept: tuple[int, ...] = (), **request) -> httpx.Response:
        """The response to one request: 200, or a status in `accept`; raising for other answers.

        Connection failures, timeouts and 5xx are retried (`retries` times); 429 is waited out (at most
        `rate_limit_wait` seconds in all) without counting as a retry.
        """
        failures, rate_limited, waited = 0, 0, 0.0
        last_error = ""
        while True:
            try:
                response = self._client.request(method, path, **request)
            except TRANSIENT_ERRORS as e:
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                status = response.status_code
                if status == 429:
                    rate_limited += 1
                    wait = self._rate_limit_delay(response, rate_limited)
                    if waited + wait > self.rate_limit_wait:
                        raise TeacherRateLimitError(
                            f"label service {self.url} kept rate-limiting {method} {path} (HTTP 429: "
                            f"{_detail(response)}): waited {waited:g} s over {rate_limited - 1} answers, and it asks "
                            f"for {wait:g} s more, past rate_limit_wait={self.rate_limit_wait:g} s. Queries counted "
                            "before this call are kept; this batch was not counted. Send fewer queries at once "
                            "(fewer parallel clients), or raise rate_limit_wait."
                        )
                    self._sleep(wait)
                    waited += wait
                    continue
                if status == 200 or status in accept:
                    return response
                if status < 500:
                    self._refuse(response, path)
                last_error = f"HTTP {status}: {_detail(response)}"
            failures += 1
            if failures > self.retries:
                raise TeacherConnectionError(
                    f"label service {self.url} failed {failures} attempts at {method} {path} (last error: {last_error}). "
                    "Queries counted before this call are kept; this batch was not counted. "
                    "Check that the service is running, or raise retries / timeout."
                )
            self._wait_before_retry(failures)

    def _wait_before_retry(self, retry: int) -> None:
        self._sleep(min(self.backoff * 2 ** (retry - 1), MAX_BACKOFF_SECONDS))

    @staticmethod
    def _rate_limit_delay(response: httpx.Response, rate_limited: int) -> float:
        """Seconds to wait after the `rate_limited`-th 429 answer to one request."""
        asked = retry_after_seconds(response.headers.get("retry-after"))
        if asked is None:
            asked = min(RATE_LIMIT_BACKOFF * 2 ** (rate_limited - 1), MAX_BACKOFF_SECONDS)
        return max(asked, RATE_LIMIT_BACKOFF)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _refuse(self, response: httpx.Response, path: str) -> None:
        status, detail = response.status_code, _detail(response)
        if status in (401, 403):
            raise TeacherError(f"{self.name}{path} refused the request (HTTP {status}: {detail}); pass the service's "
                               "API key: api_key=... in Python, --api-key or $DB3KD_API_KEY on the command line")
        if status in (400, 409, 413, 415, 422):
            raise InputError(f"{self.name}{path} refused the batch (HTTP {status}: {detail})")
        if status >= 400:
            raise TeacherError(f"{self.name}{path}: HTTP {status}: {detail}")
        raise TeacherError(f"{self.name}{path}: expected HTTP 200, got {status} {detail}")

    def _json(self, response: httpx.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise TeacherError(f"{self.name}{path}: expected a JSON answer, got {response.content[:100]!r}") from None

    def close(self) -> None:
        """Close the connection to the service."""
        self._client.close()

    def __enter__(self) -> "HttpBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The wait a `Retry-After` header asks for: delay-seconds or an HTTP date (RFC 9110); None if absent or
    unreadable. A date in the past means no wait."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" in the date: UTC, as HTTP dates always are
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _detail(response: httpx.Response) -> str:
    """The service's error message (its JSON `detail`), else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else response.text[:200]
