"""A remote label service (`db3kd serve`, see `db3kd.serve` for the protocol) as a teacher."""

from __future__ import annotations

import io
import time
import uuid

import httpx
import numpy as np
import torch

from ..errors import InputError, TeacherConnectionError, TeacherError

# Largest chunk asked of a server: keeps one request's body at a few MB, so a retry re-sends little.
MAX_PREFERRED_BATCH = 1024
# Longest wait between two attempts, whatever the back-off and attempt number.
MAX_BACKOFF_SECONDS = 10.0


def encode_npy(images: np.ndarray) -> bytes:
    """`images` as the bytes of a .npy file (what `np.save` writes), with a single copy of the data."""
    images = np.ascontiguousarray(images, dtype="<f4")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(images))
    return b"".join((header.getvalue(), images.reshape(-1).view(np.uint8)))


class HttpBackend:
    """Labels from a `db3kd serve` label service.

    The input contract (shape, classes, bounds) is read from the service's `/info`. Every batch is sent
    with a fresh `X-Request-ID`, kept across retries: the service answers a retried request from memory,
    so a batch it labelled but whose answer was lost is neither labelled nor counted twice.

    Args:
        url: the service, e.g. `http://127.0.0.1:8000`.
        api_key: the service's bearer token, if it has one.
        timeout: seconds to wait for a connection or an answer before retrying.
        retries: attempts after the first on connection errors, timeouts and 5xx answers.
        backoff: seconds before the first retry, doubled at each further one (at most 10 s).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"expected an http:// or https:// URL, got {url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries must be a non-negative integer, got {retries!r}")
        if not timeout > 0:
            raise InputError(f"timeout must be positive seconds, got {timeout!r}")
        if not backoff >= 0:
            raise InputError(f"backoff must be non-negative seconds, got {backoff!r}")
        self.url = url.rstrip("/")
        self.name = self.url
        self.retries, self.backoff = retries, float(backoff)
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
        try:
            shape = tuple(info["input_shape"])
            num_classes, bounds, max_batch = info["num_classes"], tuple(info["bounds"]), info["max_batch"]
            valid = (len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)
                     and type(num_classes) is int and num_classes >= 2
                     and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds) and bounds[0] < bounds[1]
                     and type(max_batch) is int and max_batch >= 1)
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise TeacherError(f"{self.name}/info: expected input_shape [C, H, W], num_classes >= 2, bounds [lo, hi] "
                               f"and max_batch >= 1, got {str(info)[:200]}")
        self.input_shape = shape
        self.num_classes = num_classes
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.max_batch = max_batch
        self.preferred_batch = min(max_batch, MAX_PREFERRED_BATCH)

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        body = encode_npy(x.detach().cpu().numpy())
        headers = {"Content-Type": "application/octet-stream", "X-Request-ID": str(uuid.uuid4())}
        payload = self._json(self._send("POST", "/labels", content=body, headers=headers), "/labels")
        labels = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(labels, list):
            raise TeacherError(f"{self.name}/labels: expected a JSON object with a 'labels' list, got {str(payload)[:200]}")
        if len(labels) != len(x):
            raise TeacherError(f"{self.name}/labels: expected {len(x)} labels, got {len(labels)}")
        # type() rather than isinstance: JSON true/false arrive as bool, a subclass of int.
        if not all(type(label) is int for label in labels):
            raise TeacherError(f"{self.name}/labels: expected {len(x)} integer labels, got {str(payload)[:200]}")
        try:
            return np.asarray(labels, dtype=np.int64)  # the oracle checks they are classes in [0, K)
        except OverflowError:
            raise TeacherError(f"{self.name}/labels: expected class indices, got {str(payload)[:200]}") from None

    def _send(self, method: str, path: str, **request) -> httpx.Response:
        """The response to one request, retrying connection failures and 5xx; raising for 4xx."""
        attempts = self.retries + 1
        last_error = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self._wait_before_retry(attempt - 1)
            try:
                response = self._client.request(method, path, **request)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            if response.status_code >= 400:
                self._refuse(response, path)
            if response.status_code != 200:
                raise TeacherError(f"{self.name}{path}: expected HTTP 200, got {response.status_code} {_detail(response)}")
            return response
        raise TeacherConnectionError(
            f"label service {self.url} failed {attempts} attempts at {method} {path} (last error: {last_error}). "
            "Queries counted before this call are kept; this batch was not counted. "
            "Check that the service is running, or raise retries / timeout."
        )

    def _wait_before_retry(self, retry: int) -> None:
        time.sleep(min(self.backoff * 2 ** (retry - 1), MAX_BACKOFF_SECONDS))

    def _refuse(self, response: httpx.Response, path: str) -> None:
        status, detail = response.status_code, _detail(response)
        if status in (401, 403):
            raise TeacherError(f"{self.name}{path} refused the request (HTTP {status}: {detail}); pass the service's "
                               "API key: api_key=... in Python, --api-key or $DB3KD_API_KEY on the command line")
        if status in (400, 409, 413, 415, 422):
            raise InputError(f"{self.name}{path} refused the batch (HTTP {status}: {detail})")
        raise TeacherError(f"{self.name}{path}: HTTP {status}: {detail}")

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


def _detail(response: httpx.Response) -> str:
    """The service's error message (its JSON `detail`), else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else response.text[:200]
