"""Requests to one HTTP teacher service: retries, 429 waits, timeouts, a rate limit, many in flight.

`HttpSender` is the plumbing that db3kd's own label service client (`HttpBackend`) and the Open Inference
Protocol client (`V2Backend`) share; it knows nothing of what they send.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone

import httpx

from ..errors import InputError, TeacherConnectionError, TeacherError, TeacherRateLimitError
from .dispatch import RatePacer, check_concurrency, check_rate

# Longest wait between two attempts, whatever the back-off and attempt number (unless Retry-After asks more).
MAX_BACKOFF_SECONDS = 10.0
# Waits after a 429 without a usable Retry-After: this, then doubled each time (at most MAX_BACKOFF_SECONDS).
# Also the shortest wait after any 429: a rate-limited service is never asked again at once.
RATE_LIMIT_BACKOFF = 1.0
# Transport failures worth retrying: the request may not have arrived, or its answer was lost.
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Of those, the ones after which the request certainly never reached the service (no connection was made).
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class HttpSender:
    """Sends requests to one service and returns its answers, or raises a db3kd error that says what to do.

    One `httpx.Client` (thread-safe, its connections kept alive) serves every thread of a backend, so up to
    `concurrency` requests can be in flight. Each attempt first waits for its slot under `max_rps` (a rate
    shared by all threads; see `RatePacer`). A 429 is waited out, `Retry-After` seconds if the service says
    (else 1 s, doubled each time), without using up `retries`; one request gives up after `rate_limit_wait`
    seconds of such waits.

    `idempotent` says whether the service recognises a resent request (db3kd's, by its `X-Request-ID`): then
    connection errors, timeouts and 5xx answers are retried `retries` times (as for any GET). A service that does not (a V2
    inference server) is sent a request again only when it certainly did not label it: no connection was
    made, or it answered 429 or 503. After a failure once the request was sent (a timeout, a dropped
    connection) the error's `answered` is the request's images (`send(..., images=n)`): they may have been
    labelled, and db3kd never under-counts paid queries. Other 5xx answers are raised at once, not counted.

    Args:
        url: the service, e.g. `http://127.0.0.1:8000`.
        what: how messages name it, e.g. "label service".
        api_key: the service's bearer token, if it has one.
        timeout: seconds to wait for a connection or an answer.
        retries: further attempts after a failure worth retrying.
        backoff: seconds before the first retry, doubled at each further one (at most 10 s).
        rate_limit_wait: most seconds one request spends waiting on 429 answers before failing.
        concurrency: requests in flight at once (the connection pool keeps that many alive).
        max_rps: most request attempts started per second, over all threads; None for no limit.
        idempotent: whether the service recognises a resent request (see above).
    """

    def __init__(self, url: str, what: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2, rate_limit_wait: float = 300.0, concurrency: int = 1,
                 max_rps: float | None = None, idempotent: bool = True):
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
        self.concurrency = check_concurrency(concurrency)
        self.max_rps = check_rate(max_rps)
        self.url, self.what, self.idempotent = url.rstrip("/"), what, idempotent
        self.retries, self.backoff, self.rate_limit_wait = retries, float(backoff), float(rate_limit_wait)
        self.pacer = None if self.max_rps is None else RatePacer(self.max_rps)
        self.sleep: Callable[[float], None] = time.sleep  # every wait but the pacer's (tests record them instead)
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=max(100, self.concurrency),
                              max_keepalive_connections=max(20, self.concurrency))
        self.client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, limits=limits)

    def send(self, method: str, path: str, accept: tuple[int, ...] = (), images: int = 0, **request) -> httpx.Response:
        """The answer to one request: 200, or a status in `accept`; raising for other answers (see the class).

        `images`: how many images the request carries, counted (the error's `answered`) if it fails after
        being sent to a service that cannot recognise a resent request."""
        failures, rate_limited, waited = 0, 0, 0.0
        idempotent = self.idempotent or method == "GET"  # reading metadata is always safe to repeat
        while True:
            if self.pacer is not None:
                self.pacer.wait()
            try:
                response = self.client.request(method, path, **request)
            except TRANSIENT_ERRORS as e:
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if not idempotent and not isinstance(e, NOT_SENT_ERRORS):
                    raise self._lost(method, path, last_error, images) from e
            else:
                status = response.status_code
                if status == 429:
                    rate_limited += 1
                    wait = rate_limit_delay(response, rate_limited)
                    if waited + wait > self.rate_limit_wait:
                        raise TeacherRateLimitError(
                            f"{self.what} {self.url} kept rate-limiting {method} {path} (HTTP 429: "
                            f"{detail(response)}): waited {waited:g} s over {rate_limited - 1} answers, and it asks "
                            f"for {wait:g} s more, past rate_limit_wait={self.rate_limit_wait:g} s. Queries counted "
                            "before this call are kept; this batch was not counted. Send fewer queries at once "
                            "(fewer parallel clients, a lower --concurrency or --max-rps), or raise rate_limit_wait."
                        )
                    self.sleep(wait)
                    waited += wait
                    continue
                if status == 200 or status in accept:
                    return response
                if status < 500 or not (idempotent or status == 503):
                    self.refuse(response, path)
                last_error = f"HTTP {status}: {detail(response)}"
            failures += 1
            if failures > self.retries:
                raise TeacherConnectionError(
                    f"{self.what} {self.url} failed {failures} attempts at {method} {path} (last error: {last_error}). "
                    "Queries counted before this call are kept; this batch was not counted. "
                    "Check that the service is running, or raise retries / timeout."
                )
            self.wait_before_retry(failures)

    def _lost(self, method: str, path: str, last_error: str, images: int) -> TeacherConnectionError:
        error = TeacherConnectionError(
            f"{self.what} {self.url}: {method} {path} got no answer ({last_error}) after the request was sent, so "
            f"the service may have labelled its {images} images: they are counted, and not sent again, since this "
            "service cannot tell a resent request from a new one. Check the service, or raise timeout.")
        error.answered = images
        return error

    def wait_before_retry(self, retry: int) -> None:
        """Back off before the `retry`-th retry of a request."""
        self.sleep(min(self.backoff * 2 ** (retry - 1), MAX_BACKOFF_SECONDS))

    def refuse(self, response: httpx.Response, path: str) -> None:
        """Raise the error for an answer the client cannot use (4xx, or another status than expected)."""
        where, status, why = f"{self.url}{path}", response.status_code, detail(response)
        if status in (401, 403):
            raise TeacherError(f"{where} refused the request (HTTP {status}: {why}); pass the service's "
                               "API key: api_key=... in Python, --api-key or $DB3KD_API_KEY on the command line")
        if status in (400, 409, 413, 415, 422):
            raise InputError(f"{where} refused the batch (HTTP {status}: {why})")
        if status >= 400:
            raise TeacherError(f"{where}: HTTP {status}: {why}")
        raise TeacherError(f"{where}: expected HTTP 200, got {status} {why}")

    def json(self, response: httpx.Response, path: str):
        """The answer's JSON body, else a `TeacherError` quoting its start."""
        try:
            return response.json()
        except ValueError:
            raise TeacherError(f"{self.url}{path}: expected a JSON answer, got {response.content[:100]!r}") from None

    def close(self) -> None:
        """Close the connections."""
        self.client.close()


def rate_limit_delay(response: httpx.Response, rate_limited: int) -> float:
    """Seconds to wait after the `rate_limited`-th 429 answer to one request."""
    asked = retry_after_seconds(response.headers.get("retry-after"))
    if asked is None:
        asked = min(RATE_LIMIT_BACKOFF * 2 ** (rate_limited - 1), MAX_BACKOFF_SECONDS)
    return max(asked, RATE_LIMIT_BACKOFF)


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


def detail(response: httpx.Response) -> str:
    """The service's error message (its JSON `detail`, or `error` as V2 servers write it), else the body's start."""
    try:
        payload = response.json()
        message = payload.get("detail", payload.get("error"))
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) else response.text[:200]


def forward_to_sender(name: str) -> property:
    """A backend attribute that reads and replaces its sender's `name` (callers replace `_sleep` and
    `_wait_before_retry` to record or steer a backend's waits)."""
    return property(lambda backend: getattr(backend.sender, name),
                    lambda backend, value: setattr(backend.sender, name, value))
