"""What db3kd's HTTP teachers share: a batch split into requests (some in flight at once), sizes halved on 413."""

from __future__ import annotations

import logging
import threading

import httpx
import numpy as np
import torch

from ..errors import DB3KDError
from .dispatch import Dispatcher
from .http_sender import HttpSender, detail, forward_to_sender

log = logging.getLogger(__name__)

# Largest request asked of a server by default: keeps one request's body at a few MB, so a retry re-sends little.
MAX_PREFERRED_BATCH = 1024


class RemoteBackend:
    """Base of the backends that label over HTTP (`HttpBackend`, `V2Backend`).

    A subclass builds `sender` (an `HttpSender`) and calls `_start(name, limit)` once it knows how many
    images one request may carry, then writes `_request(images) -> labels`, returning None when the server
    refused the request as too large (HTTP 413; call `_too_large` first).

    A batch is sent in requests of at most `batch_limit` images, up to `concurrency` at once (a `Dispatcher`),
    so `preferred_batch`, the chunk the oracle hands over, is `concurrency` requests' worth. A small batch is
    spread over every slot, unless a rate limit (`max_rps`) makes each request count: then requests are filled. A request refused
    as too large is split in two and the smaller size kept for later calls. If a request fails for good, the
    error's `answered` (and `answered_at`) say which images the others had answered, and the oracle counts them.
    """

    sender: HttpSender
    _sleep = forward_to_sender("sleep")
    _wait_before_retry = forward_to_sender("wait_before_retry")

    def _start(self, name: str, limit: int) -> None:
        self.name = name
        self.dispatcher = Dispatcher(name, self.sender.concurrency)
        self._limit_lock = threading.Lock()
        self.batch_limit = limit  # most images sent in one request
        self.preferred_batch = min(limit, MAX_PREFERRED_BATCH) * self.concurrency

    @property
    def concurrency(self) -> int:
        """Requests in flight at once."""
        return self.sender.concurrency

    @property
    def max_rps(self) -> float | None:
        """Most requests started per second (None: no limit)."""
        return self.sender.max_rps

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        images = x.detach().cpu().numpy()
        size = self.dispatcher.piece_size(len(images), self.batch_limit, fill=self.max_rps is not None)
        return self.dispatcher.run(images, size, self._label_piece)

    def _label_piece(self, images: np.ndarray) -> np.ndarray:
        """Labels of one piece, in requests of at most `batch_limit` images (smaller after a 413)."""
        labels = np.empty(len(images), dtype=np.int64)
        done = 0
        try:
            while done < len(images):
                size = min(self.batch_limit, len(images) - done)
                answer = self._request(images[done:done + size])
                if answer is None:  # 413: too large for the service; batch_limit is now smaller
                    continue
                labels[done:done + size] = answer
                done += size
        except DB3KDError as error:
            error.answered = done + error.answered  # plus any of the failed request's (it may have been labelled)
            raise
        return labels

    def _request(self, images: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def _too_large(self, images: int, response: httpx.Response, path: str) -> None:
        """A request of `images` was refused as too large (413): send at most half as many from now on."""
        if images == 1:
            self.sender.refuse(response, path)
        with self._limit_lock:
            self.batch_limit = min(self.batch_limit, images // 2)
            self.preferred_batch = min(self.preferred_batch, self.batch_limit * self.concurrency)
        log.info("%s refused %d images in one request (HTTP 413: %s); sending at most %d from now on",
                 self.name, images, detail(response), self.batch_limit)

    def close(self) -> None:
        """Close the connections and stop the request threads."""
        if hasattr(self, "dispatcher"):  # absent when the constructor failed
            self.dispatcher.close()
        self.sender.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
