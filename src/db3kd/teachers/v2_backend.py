"""A model on a standard inference server (Open Inference Protocol, KServe V2 REST) as a teacher.

Triton, KServe, Seldon MLServer and TorchServe speak it: `--teacher v2+http://host:port/models/NAME`.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from ..errors import TeacherError
from .http_sender import HttpSender
from .remote import RemoteBackend
from .v2_protocol import (BINARY_HEADER, V2Options, decode_labels, encode_request, parse_v2_url, read_model_metadata,
                          server_declares_binary)

# Images per request unless the URL says (max_batch): a JSON request of 256 MNIST images is about 1.5 MB.
DEFAULT_BATCH = 256


class V2Backend(RemoteBackend):
    """Labels from a model served over the Open Inference Protocol (see `v2_protocol` for the URL's options).

    The input's name, datatype and image shape come from the model's metadata (`GET /v2/models/NAME`), and so
    does the class count when the model answers scores [N, K]. Each batch is sent as `POST .../infer` requests,
    `concurrency` at once, each with its own `id`. If the model answers scores (logits or probabilities), only
    their arg-max is kept: the scores are discarded by design, db3kd being label-only; a label tensor [N] or
    [N, 1] is used as it is. Requests are JSON, which every server reads, or binary (the binary tensor extension)
    when the server declares it (`GET /v2`) or the URL asks for it (`binary=true`).

    An answer the client cannot use (another datatype, shape or batch size, a missing output) is a `TeacherError`
    naming what was expected; its images are counted, since the server did label them. V2 servers cannot tell a
    resent request from a new one, so a request is resent only when it certainly did not reach the server (no
    connection, 429, 503; see `HttpSender`).

    Args:
        url: `v2+http(s)://host:port/models/NAME[?options]`.
        api_key: a bearer token for the server, if it needs one.
        timeout, retries, backoff, rate_limit_wait, concurrency, max_rps: as for `HttpBackend`.
        options: URL options given in Python instead (num_classes, bounds, input_shape, input, output, binary,
            max_batch); they win over the URL's.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2, rate_limit_wait: float = 300.0, concurrency: int = 1,
                 max_rps: float | None = None, **options):
        target = parse_v2_url(url)
        given = {key: value for key, value in options.items() if value is not None}
        self.target = dataclasses.replace(target, options=dataclasses.replace(target.options, **given))
        self.sender = HttpSender(self.target.base, "V2 server", api_key=api_key, timeout=timeout, retries=retries,
                                 backoff=backoff, rate_limit_wait=rate_limit_wait, concurrency=concurrency,
                                 max_rps=max_rps, idempotent=False)
        self.url = self.target.name
        self.infer_path = self.target.model_path + "/infer"
        try:
            path = self.target.model_path
            metadata = self.sender.json(self.sender.send("GET", path), path)
            self.model = read_model_metadata(metadata, self.target.options, f"{self.sender.url}{path}")
            binary = self.target.options.binary
            self.binary = self._server_declares_binary() if binary is None else binary
        except BaseException:
            self.sender.close()
            raise
        self.input_shape, self.num_classes, self.bounds = self.model.input_shape, self.model.num_classes, self.model.bounds
        self.identity = f"{self.url} {self.model.describe()}"
        self._start(self.url, self.target.options.max_batch or DEFAULT_BATCH)

    def _server_declares_binary(self) -> bool:
        response = self.sender.send("GET", "/v2", accept=tuple(range(201, 600)))
        try:
            return response.status_code == 200 and server_declares_binary(response.json())
        except ValueError:
            return False

    def _request(self, images: np.ndarray) -> np.ndarray | None:
        request_id = str(uuid.uuid4())
        body, headers = encode_request(self.model, images, request_id, self.binary)
        response = self.sender.send("POST", self.infer_path, content=body, headers=headers, accept=(413,),
                                    images=len(images))
        if response.status_code == 413:
            self._too_large(len(images), response, self.infer_path)
            return None
        try:
            return decode_labels(response.content, response.headers.get(BINARY_HEADER), self.model, len(images),
                                 request_id, f"{self.sender.url}{self.infer_path}")
        except TeacherError as error:
            error.answered = len(images)  # the server answered, so it labelled them: counted
            raise

    def __repr__(self) -> str:
        return f"V2Backend({self.url!r})"


__all__ = ["V2Backend", "V2Options"]
