"""The Open Inference Protocol client without a real server: teacher URLs, model metadata as servers write it,
tensors in JSON and binary, and `V2Backend` against a small fake server whose answers each test chooses
(retries, timeouts and what is counted). The real servers are in test_teachers_v2_servers.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from db3kd.errors import ConfigError, InputError, TeacherConnectionError, TeacherError
from db3kd.oracle import LabelOracle
from db3kd.teachers import TeacherSpec, V2Backend
from db3kd.teachers.v2_protocol import (V2Model, V2Options, decode_labels, encode_request, parse_v2_url,
                                        read_model_metadata)
from test_http import ServerThread

# --- teacher URLs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, base, model, version, options", [
    ("v2+http://h:8000/models/m", "http://h:8000", "m", None, V2Options()),
    ("v2+https://api.example/serving/v2/models/m/versions/3/", "https://api.example/serving", "m", "3", V2Options()),
    ("v2+http://h/models/m?num_classes=10&bounds=-1,1&input_shape=3,32,32&input=x&output=y&binary=false&max_batch=8",
     "http://h", "m", None, V2Options(10, (-1.0, 1.0), (3, 32, 32), "x", "y", False, 8)),
])
def test_teacher_urls(text, base, model, version, options):
    target = parse_v2_url(text)
    assert (target.base, target.model, target.version, target.options) == (base, model, version, options)


@pytest.mark.parametrize("text, message", [
    ("v2+http://h:8000/model/m", r"expected a V2 teacher URL v2\+http\(s\)://host:port/models/NAME"),
    ("v2+http:///models/m", r"expected a V2 teacher URL"),
    ("v2+ftp://h/models/m", r"expected a V2 teacher URL"),
    ("v2+http://h/models/m?classes=10", r"unknown option 'classes' in a V2 teacher URL; expected some of num_classes"),
    ("v2+http://h/models/m?num_classes=ten", r"V2 teacher option num_classes: cannot read 'ten'"),
    ("v2+http://h/models/m?num_classes=1", r"V2 teacher option num_classes: expected an integer >= 2, got 1"),
    ("v2+http://h/models/m?bounds=1,0", r"V2 teacher option bounds: expected LO,HI with LO < HI"),
    ("v2+http://h/models/m?input_shape=28,28", r"V2 teacher option input_shape: expected C,H,W of positive integers"),
    ("v2+http://h/models/m?binary=maybe", r"V2 teacher option binary: cannot read 'maybe'"),
])
def test_malformed_teacher_urls_are_refused_when_parsed(text, message):
    with pytest.raises(ConfigError, match=message):
        TeacherSpec.parse(text)  # before any network


# --- model metadata, as the servers write it -------------------------------------------------------------------------

IMAGE = {"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
LOGITS = {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
LABEL = {"name": "label", "datatype": "INT64", "shape": [-1]}
KSERVE = {"name": "m", "versions": None, "platform": "", "inputs": [IMAGE], "outputs": [LOGITS]}
MLSERVER = {"name": "m", "versions": [], "platform": "", "inputs": [IMAGE], "outputs": [LABEL], "parameters": {}}


def model_of(meta, query: str = "") -> V2Model:
    return read_model_metadata(meta, V2Options.from_query(query), "server")


def test_metadata_as_kserve_and_mlserver_write_it():
    assert model_of(KSERVE) == V2Model("image", "FP32", (1, 28, 28), "logits", 10, (0.0, 1.0), ask_output=False)
    assert model_of(MLSERVER, "num_classes=10&bounds=0,255") == V2Model("image", "FP32", (1, 28, 28), "label", 10,
                                                                        (0.0, 255.0), ask_output=False)
    # No declared tensors (a server without them): the URL says.
    bare = {"name": "m", "inputs": [], "outputs": []}
    assert model_of(bare, "input=x&input_shape=1,8,8&num_classes=3") == V2Model("x", "FP32", (1, 8, 8), None, 3,
                                                                               (0.0, 1.0), ask_output=False)
    # Several outputs: the URL picks one, and requests name it.
    two = {**KSERVE, "outputs": [LOGITS, LABEL], "versions": ["1", "2"]}
    assert model_of(two, "output=logits") == V2Model("image", "FP32", (1, 28, 28), "logits", 10, (0.0, 1.0),
                                                     ask_output=True, versions=("1", "2"))


@pytest.mark.parametrize("meta, query, message", [
    ({**KSERVE, "inputs": []}, "", r"declares no inputs; give the input's name and shape in the teacher URL: "
                                   r"\?input=NAME&input_shape=C,H,W"),
    ({**KSERVE, "inputs": [IMAGE, {**IMAGE, "name": "mask"}]}, "", r"the model has several inputs \['image', 'mask'\]; "
                                                                   r"say which in the teacher URL: \?input=NAME"),
    (KSERVE, "input=x", r"the model has no input 'x'; its inputs: \['image'\]"),
    ({**KSERVE, "inputs": [{**IMAGE, "datatype": "UINT8"}]}, "", r"expected a floating-point image input \(FP16, "
                                                                 r"FP32, FP64\), got input 'image' of datatype 'UINT8'"),
    ({**KSERVE, "inputs": [{**IMAGE, "shape": [-1, 784]}]}, "", r"expected input 'image' of shape \[-1, C, H, W\]"),
    ({**KSERVE, "inputs": [{**IMAGE, "shape": [8, 1, 28, 28]}]}, "", r"takes exactly 8 images per request"),
    ({**KSERVE, "inputs": [{**IMAGE, "shape": [-1, 3, -1, -1]}]}, "", r"leaves the image size open; give it in the "
                                                                      r"teacher URL: \?input_shape=C,H,W"),
    (KSERVE, "input_shape=1,32,32", r"input_shape \[1, 32, 32\] contradicts the model's input shape"),
    (MLSERVER, "", r"cannot tell the class count from the model's output \('label' INT64 \[-1\]\); give it in the "
                   r"teacher URL: \?num_classes=K"),
    (KSERVE, "num_classes=5", r"num_classes=5 contradicts the model's output 'logits' of shape \[-1, 10\]"),
    ({**KSERVE, "outputs": [LOGITS, LABEL]}, "", r"several outputs \['logits', 'label'\]; say which"),
    ([], "", r"expected model metadata as a JSON object"),
])
def test_metadata_the_client_cannot_use_is_a_precise_error(meta, query, message):
    with pytest.raises(TeacherError, match=message):
        model_of(meta, query)


# --- tensors --------------------------------------------------------------------------------------------------------

MODEL = V2Model("image", "FP32", (1, 2, 2), "logits", 3, (0.0, 1.0), ask_output=False)
X = np.arange(24, dtype=np.float32).reshape(6, 1, 2, 2) / 24


def test_json_and_binary_requests():
    body, headers = encode_request(MODEL, X, "id-1", binary=False)
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body) == {"id": "id-1", "inputs": [{"name": "image", "datatype": "FP32", "shape": [6, 1, 2, 2],
                                                          "data": X.ravel().tolist()}]}
    body, headers = encode_request(MODEL, X, "id-2", binary=True)
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 96}
    assert header["parameters"] == {"binary_data_output": True} and header["id"] == "id-2"
    np.testing.assert_array_equal(np.frombuffer(body[size:], "<f4").reshape(X.shape), X)


SCORES = np.array([[0.1, 0.9, 0.0], [2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], dtype=np.float32)


def answer(output: dict, request_id: str = "r") -> bytes:
    return json.dumps({"model_name": "m", "id": request_id, "parameters": None, "outputs": [output]}).encode()


@pytest.mark.parametrize("content, header, expected", [
    pytest.param(answer({"name": "logits", "datatype": "FP32", "shape": [3, 3], "data": SCORES.ravel().tolist()}),
                 None, [1, 0, 2], id="scores-flat"),
    pytest.param(answer({"name": "logits", "datatype": "FP64", "shape": [3, 3], "data": SCORES.tolist()}),
                 None, [1, 0, 2], id="scores-nested"),
    pytest.param(answer({"name": "logits", "datatype": "INT64", "shape": [3], "data": [2, 2, 1]}), None, [2, 2, 1],
                 id="labels"),
    pytest.param(answer({"name": "logits", "datatype": "INT32", "shape": [3, 1], "data": [0, 1, 2],
                         "parameters": {"content_type": "np"}}), None, [0, 1, 2], id="labels-n1"),
    pytest.param(answer({"name": "logits", "datatype": "FP32", "shape": [3, 3], "parameters": {"binary_data_size": 36}})
                 + SCORES.tobytes(), "__header__", [1, 0, 2], id="binary"),
])
def test_answers_are_read_as_labels(content, header, expected):
    if header == "__header__":
        header = str(content.index(b"}]}") + 3)
    np.testing.assert_array_equal(decode_labels(content, header, MODEL, 3, "r", "server"), expected)


@pytest.mark.parametrize("content, header, message", [
    (answer({"name": "logits", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}), None,
     r"server: expected output 'logits' as integer labels \[3\] or \[3, 1\], or scores FP32 \[3, 3\] \(logits or "
     r"probabilities\), got BYTES \[3\]"),
    (answer({"name": "logits", "datatype": "FP32", "shape": [3, 2], "data": [0] * 6}), None, r"got FP32 \[3, 2\]"),
    (answer({"name": "logits", "datatype": "BOOL", "shape": [3], "data": [True] * 3}), None, r"got BOOL \[3\]"),
    (answer({"name": "logits", "datatype": "INT64", "shape": [3], "data": [1, 2]}), None,
     r"output 'logits' of shape \[3\] holds 2 values; expected 3"),
    (answer({"name": "logits", "datatype": "INT64", "shape": [3], "data": ["x", 1, 2]}), None,
     r"output 'logits' holds no 3 INT64 values"),
    (answer({"name": "other", "datatype": "INT64", "shape": [3], "data": [1, 1, 1]}), None,
     r"expected output 'logits' in the answer, got \['other'\]"),
    (answer({"name": "logits", "datatype": "INT64", "shape": [3], "data": [1, 1, 1]}, request_id="q"), None,
     r"answered request id 'q' to request 'r'"),
    (b"<html>", None, r"expected a JSON answer, got b'<html>'"),
    (answer({"name": "logits"}), "9999", r"expected Inference-Header-Content-Length between 0 and the body's"),
    (answer({"name": "logits", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}}), "__header__",
     r"holds no 3 INT64 values \(24 bytes declared, 0 sent, 24 expected\)"),
])
def test_answers_the_client_cannot_use_are_precise_errors(content, header, message):
    if header == "__header__":
        header = str(len(content))
    with pytest.raises(TeacherError, match=message):
        decode_labels(content, header, MODEL, 3, "r", "server")


# --- V2Backend against a fake server --------------------------------------------------------------------------------


def fake_labels(images: np.ndarray) -> np.ndarray:
    """The fake model: a label that depends on every pixel."""
    return (images.reshape(len(images), -1).sum(axis=1) * 7).astype(np.int64) % 3


class FakeServer:
    """A V2 server of one model `m` (input image FP32 [-1, 1, 2, 2], output logits FP32 [-1, 3]): answers JSON or
    binary requests; `script` maps a request number (from 0) to a status, or to "hang" (no answer until released)."""

    def __init__(self, extensions=(), script=None, metadata_failures=0):
        self.extensions, self.script = list(extensions), dict(script or {})
        self.metadata_failures, self.metadata_requests = metadata_failures, 0
        self.requests: list[dict] = []  # per infer request: images, binary, authorization
        self.labelled = 0
        self.release = asyncio.Event()
        app = FastAPI()
        app.get("/v2")(lambda: {"name": "fake", "version": "0", "extensions": self.extensions})
        app.get("/v2/models/m")(self.metadata)
        app.post("/v2/models/m/infer")(self.infer)
        self.thread = ServerThread(app).start()
        self.url = f"v2+{self.thread.url}/models/m"

    def metadata(self):
        self.metadata_requests += 1
        if self.metadata_requests <= self.metadata_failures:
            return JSONResponse({"error": "model loading"}, status_code=500)
        return {"name": "m", "versions": None, "platform": "", "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [-1, 1, 2, 2]}], "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}

    async def infer(self, request: Request):
        body = await request.body()
        size = request.headers.get("inference-header-content-length")
        header = json.loads(body[:int(size)] if size else body)
        tensor = header["inputs"][0]
        images = (np.frombuffer(body[int(size):], "<f4") if size else np.asarray(tensor["data"], np.float32))
        images = images.reshape(tensor["shape"])
        number = len(self.requests)
        self.requests.append({"images": len(images), "binary": size is not None,
                              "authorization": request.headers.get("authorization")})
        action = self.script.get(number)
        if action == "hang":  # labels the batch, then never answers in time
            self.labelled += len(images)
            await asyncio.wait_for(self.release.wait(), 30)
            return Response(status_code=204)
        if isinstance(action, int):
            return JSONResponse({"error": f"scripted {action}"}, status_code=action)
        self.labelled += len(images)
        scores = np.eye(3, dtype=np.float32)[fake_labels(images)]
        output = {"name": "logits", "datatype": "FP32", "shape": [len(images), 3]}
        if not header.get("parameters", {}).get("binary_data_output"):
            return JSONResponse({"id": header["id"], "outputs": [{**output, "data": scores.ravel().tolist()}]})
        head = json.dumps({"id": header["id"], "outputs": [{**output, "parameters": {
            "binary_data_size": scores.nbytes}}]}).encode()
        # As KServe does: no Content-Type on a binary answer.
        return Response(head + scores.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))},
                        media_type=None)

    def stop(self) -> None:
        self.thread.server.should_exit = True
        self.release.set()
        self.thread.stop()


@pytest.fixture
def fake(request):
    server = FakeServer(**getattr(request, "param", {}))
    yield server
    server.stop()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 2, 2), dtype=np.float32)


@pytest.mark.parametrize("fake, binary", [({}, False), ({"extensions": ["binary_tensor_data"]}, True)],
                         indirect=["fake"], ids=["json", "binary-declared"])
def test_json_unless_the_server_declares_binary(fake, binary):
    with V2Backend(fake.url, api_key="k", concurrency=3, max_batch=4) as backend:
        assert backend.binary is binary and backend.identity.endswith("output=logits num_classes=3 bounds=[0.0, 1.0]")
        oracle = LabelOracle(backend)
        x = images(25)
        np.testing.assert_array_equal(oracle.labels(x), fake_labels(x))
    assert oracle.queries == fake.labelled == 25
    assert {r["binary"] for r in fake.requests} == {binary} and max(r["images"] for r in fake.requests) == 4
    assert {r["authorization"] for r in fake.requests} == {"Bearer k"}


@pytest.mark.parametrize("fake", [{"script": {0: 503, 1: 429, 3: 503}}], indirect=True)
def test_503_and_429_are_retried_since_nothing_was_labelled(fake):
    with V2Backend(fake.url, backoff=0.0) as backend:
        backend.sender.sleep = lambda seconds: None  # 429 waits, not slept
        oracle = LabelOracle(backend)
        x = images(10)
        np.testing.assert_array_equal(oracle.labels(x), fake_labels(x))
        np.testing.assert_array_equal(oracle.labels(x), fake_labels(x))
    assert oracle.queries == fake.labelled == 20 and len(fake.requests) == 5


@pytest.mark.parametrize("fake, error, message", [
    ({"script": {0: 500}}, TeacherError, r"/v2/models/m/infer: HTTP 500: scripted 500"),
    ({"script": {0: 400}}, InputError, r"/v2/models/m/infer refused the batch \(HTTP 400: scripted 400\)"),
], indirect=["fake"], ids=["500", "400"])
def test_other_errors_are_not_retried_nor_counted(fake, error, message):
    with V2Backend(fake.url, retries=5, backoff=0.0) as backend:
        oracle = LabelOracle(backend)
        with pytest.raises(error, match=message):
            oracle.labels(images(4))
    assert oracle.queries == fake.labelled == 0 and len(fake.requests) == 1


@pytest.mark.parametrize("fake", [{"script": {1: "hang"}}], indirect=True)
def test_a_request_sent_but_never_answered_is_counted_and_not_resent(fake):
    """A V2 server cannot recognise a resent request: after a timeout the batch may have been labelled (here it
    was), so it is counted, not sent again."""
    with V2Backend(fake.url, timeout=0.5, retries=5, max_batch=4) as backend:
        oracle = LabelOracle(backend)
        with pytest.raises(TeacherConnectionError, match=r"got no answer \(ReadTimeout.*\) after the request was sent, "
                                                         r"so the service may have labelled its 4 images: they are "
                                                         r"counted, and not sent again") as error:
            oracle.labels(images(10), ids=np.arange(10))
        fake.release.set()
    assert error.value.answered == 4  # of the oracle's second chunk (4 images): the first was answered as usual
    assert oracle.queries == fake.labelled == 8 and len(fake.requests) == 2
    np.testing.assert_array_equal(oracle.queries_for(np.arange(10)), [1] * 8 + [0] * 2)


@pytest.mark.parametrize("fake", [{"metadata_failures": 2}], indirect=True)
def test_reading_metadata_is_retried_on_any_5xx(fake):
    """A GET labels nothing: unlike an infer request, it is retried after a 500."""
    with V2Backend(fake.url, retries=2, backoff=0.0) as backend:
        assert backend.num_classes == 3
    assert fake.metadata_requests == 3


def test_an_unreachable_server_is_retried_then_a_connection_error():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(TeacherConnectionError, match=rf"V2 server http://127\.0\.0\.1:{port} failed 3 attempts at "
                                                     r"GET /v2/models/m \(last error: ConnectError"):
        V2Backend(f"v2+http://127.0.0.1:{port}/models/m", retries=2, backoff=0.0)
