"""V2Backend against real Open Inference Protocol servers from PyPI: Seldon MLServer and KServe, each started by
the test in its own virtual environment (`.ci/v2-servers.sh` makes them; CI runs it), over the shared MNIST
teacher, with the runtimes in `.ci/v2/`.

The oracle's query count must equal the server's own (its Prometheus counter of images classified), with
several requests in flight; answers of the wrong datatype or shape must be precise errors with their queries
counted. Without the venvs these tests skip (`DB3KD_V2_REQUIRED=1`, set by CI, makes that a failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from db3kd.errors import InputError, TeacherError
from db3kd.oracle import LabelOracle, open_oracle
from db3kd.teachers import OnnxBackend, TeacherSpec, V2Backend
from test_http import TEACHER, mnist_images

CI_V2 = Path(__file__).resolve().parents[1] / ".ci" / "v2"
DEFAULT_ROOT = Path(os.environ.get("DB3KD_V2_ROOT", Path.home() / ".cache" / "db3kd" / "v2-venvs"))
MLSERVER_MODES = {"lenet5-logits": "logits", "lenet5-labels": "labels", "lenet5-labels-n1": "labels_n1",
                  "lenet5-bad-dtype": "bad_dtype", "lenet5-bad-shape": "bad_shape", "lenet5-bad-batch": "bad_batch",
                  "lenet5-http-error": "http_error"}
KSERVE_MODELS = ("lenet5-logits", "lenet5-labels", "lenet5-bad-dtype", "lenet5-bad-shape", "lenet5-bad-batch",
                 "lenet5-http-error")
READY_TIMEOUT = 120.0  # seconds: a cold start on a loaded CI machine


def server_venv(kind: str) -> Path:
    """The venv of server `kind` ($DB3KD_V2_<KIND>_VENV, else the default root's), or skip (fail in CI)."""
    venv = Path(os.environ.get(f"DB3KD_V2_{kind.upper()}_VENV", DEFAULT_ROOT / kind))
    if not (venv / "bin" / "python").is_file():
        reason = (f"no {kind} venv at {venv}: run `bash .ci/v2-servers.sh` (or set DB3KD_V2_{kind.upper()}_VENV) "
                  "to test V2Backend against a real inference server")
        if os.environ.get("DB3KD_V2_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    if not TEACHER.is_file():
        pytest.skip(f"shared teacher not found: {TEACHER}")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A server process in its own process group, ready once every model answers `GET /v2/models/NAME/ready`."""

    def __init__(self, kind: str, command: list[str], env: dict, base: str, metrics: str, models, log: Path):
        self.kind, self.base, self.metrics_url, self.log = kind, base, metrics, log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(models)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, models) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"{self.kind} exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
                try:
                    if all(client.get(f"{self.base}/v2/models/{m}/ready").status_code == 200 for m in models):
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.kind} not ready after {READY_TIMEOUT} s: {self.log.read_text()[-3000:]}")
                time.sleep(0.05)

    def images(self, model: str) -> int:
        """The server's own count of images its model classified (db3kd_teacher_images_total)."""
        text = httpx.get(self.metrics_url, timeout=10).text
        match = re.search(rf'^db3kd_teacher_images_total{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
        return int(float(match.group(1))) if match else 0

    def url(self, model: str, options: str = "") -> str:
        return f"v2+{self.base}/models/{model}{options}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of its group
        except ProcessLookupError:
            pass
        self.process.wait()


def start_mlserver(tmp: Path) -> RunningServer:
    venv = server_venv("mlserver")
    repo = tmp / "mlserver"
    repo.mkdir()
    shutil.copy(CI_V2 / "mlserver_runtime.py", repo / "mlserver_runtime.py")  # mlserver puts its repo on sys.path
    (repo / "settings.json").write_text(json.dumps({"host": "127.0.0.1", "parallel_workers": 0, "debug": False}))
    for name, mode in MLSERVER_MODES.items():
        output = ({"name": "label", "datatype": "INT64", "shape": [-1, 1] if mode == "labels_n1" else [-1]}
                  if mode.startswith("labels") or mode == "bad_batch" else
                  {"name": "logits", "datatype": "FP32", "shape": [-1, 10]})
        (repo / name).mkdir()
        (repo / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.OnnxClassifier",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}], "outputs": [output],
            "parameters": {"uri": str(TEACHER), "extra": {"mode": mode}}}))
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {"MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(grpc), "MLSERVER_METRICS_PORT": str(metrics),
           "MLSERVER_HOST": "127.0.0.1", "MLSERVER_PARALLEL_WORKERS": "0"}
    return RunningServer("mlserver", [str(venv / "bin" / "mlserver"), "start", str(repo)], env,
                         f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics", MLSERVER_MODES,
                         tmp / "mlserver.log")


def start_kserve(tmp: Path) -> RunningServer:
    venv = server_venv("kserve")
    http = free_port()
    command = [str(venv / "bin" / "python"), str(CI_V2 / "kserve_server.py"), "--http_port", str(http),
               "--onnx", str(TEACHER), "--models", ",".join(KSERVE_MODELS)]
    return RunningServer("kserve", command, {}, f"http://127.0.0.1:{http}", f"http://127.0.0.1:{http}/metrics",
                         KSERVE_MODELS, tmp / "kserve.log")


@pytest.fixture(scope="module", params=["mlserver", "kserve"])
def server(request, tmp_path_factory):
    start = {"mlserver": start_mlserver, "kserve": start_kserve}[request.param]
    running = start(tmp_path_factory.mktemp(request.param))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference():
    """Labels of the teacher run in this process."""
    oracle = LabelOracle(OnnxBackend(TEACHER, threads=1))
    return lambda x: oracle.labels(x)


# Calls of several sizes: a single image, one request, and batches split over requests in flight.
CALL_SIZES = (1, 37, 300, 129)


def ask(oracle: LabelOracle, reference) -> None:
    offset = 0
    for n in CALL_SIZES:
        x = mnist_images(n, offset)
        np.testing.assert_array_equal(oracle.labels(x, ids=np.arange(n)), reference(x))
        offset += n


@pytest.mark.parametrize("model, options", [
    pytest.param("lenet5-logits", "", id="scores"),
    pytest.param("lenet5-labels", "?num_classes=10", id="labels"),
])
def test_the_oracle_counts_what_the_server_classified(server, reference, model, options):
    before = server.images(model)
    with V2Backend(server.url(model, options + ("&" if options else "?") + "max_batch=64"), concurrency=4) as backend:
        assert (backend.input_shape, backend.num_classes, backend.bounds) == ((1, 28, 28), 10, (0.0, 1.0))
        assert backend.binary is False  # neither server declares the binary extension: JSON
        oracle = LabelOracle(backend)
        ask(oracle, reference)
    assert oracle.queries == server.images(model) - before == sum(CALL_SIZES)


def test_labels_as_n_by_1_tensors(server, reference):
    if server.kind != "mlserver":
        pytest.skip("only MLServer's NumpyCodec answers labels as [N, 1]")
    before = server.images("lenet5-labels-n1")
    with V2Backend(server.url("lenet5-labels-n1", "?num_classes=10")) as backend:
        oracle = LabelOracle(backend)
        ask(oracle, reference)
    assert oracle.queries == server.images("lenet5-labels-n1") - before == sum(CALL_SIZES)


def test_binary_tensor_extension(server, reference):
    """KServe reads and writes binary tensors (asked for with binary=true); MLServer does not (HTTP 500): a
    precise error, with nothing counted, and not retried."""
    before = server.images("lenet5-logits")
    # One request at a time on MLServer: after its 500 it drops the connection, and a second request in flight on
    # it would be counted as possibly labelled (sent, never answered), which is right but not what this checks.
    concurrency = 2 if server.kind == "kserve" else 1
    with V2Backend(server.url("lenet5-logits", "?binary=true"), concurrency=concurrency, max_batch=100) as backend:
        oracle = LabelOracle(backend)
        if server.kind == "kserve":
            ask(oracle, reference)
        else:
            with pytest.raises(TeacherError, match=r"/v2/models/lenet5-logits/infer: HTTP 500"):
                oracle.labels(mnist_images(5))
    assert oracle.queries == server.images("lenet5-logits") - before == (sum(CALL_SIZES) if server.kind == "kserve" else 0)


@pytest.mark.parametrize("model, message", [
    pytest.param("lenet5-bad-dtype", r"expected output 'logits' as integer labels \[7\] or \[7, 1\], or scores FP32 "
                                     r"\[7, 10\] \(logits or probabilities\), got BYTES \[7\]", id="datatype"),
    pytest.param("lenet5-bad-shape", r"got FP32 \[7, 9\]", id="width"),
    pytest.param("lenet5-bad-batch", r"expected output 'label' as integer labels \[7\] or \[7, 1\].*got INT64 \[6",
                 id="batch-size"),
])
def test_answers_of_the_wrong_datatype_or_shape_are_precise_errors_and_counted(server, model, message):
    before = server.images(model)
    with V2Backend(server.url(model, "?num_classes=10")) as backend:
        oracle = LabelOracle(backend)
        with pytest.raises(TeacherError, match=message) as error:
            oracle.labels(mnist_images(7), ids=np.arange(7))
    assert f"{server.base}/v2/models/{model}/infer" in str(error.value)
    assert oracle.queries == server.images(model) - before == 7  # labelled by the server: paid for, so counted
    np.testing.assert_array_equal(oracle.queries_for(np.arange(7)), np.ones(7))


def test_a_failing_model_is_an_error_not_retried_nor_counted(server):
    error_type, status = (InputError, 400) if server.kind == "mlserver" else (TeacherError, 500)
    with V2Backend(server.url("lenet5-http-error", "?num_classes=10"), retries=5, backoff=0.0) as backend:
        oracle = LabelOracle(backend)
        with pytest.raises(error_type, match=rf"HTTP {status}: teacher exploded"):
            oracle.labels(mnist_images(3))
    assert oracle.queries == 0


def test_through_a_teacher_spec_with_concurrency_and_a_rate_limit(server, reference):
    """What `--teacher v2+http://... --concurrency 4 --max-rps 200` opens."""
    spec = TeacherSpec.parse(server.url("lenet5-logits", "?max_batch=32")).with_options(concurrency=4, max_rps=200)
    before = server.images("lenet5-logits")
    oracle = open_oracle(spec)
    assert oracle.identity.startswith(f"v2+{server.base}/models/lenet5-logits input=image FP32 [1, 28, 28] "
                                      "output=logits num_classes=10")
    x = mnist_images(200, offset=1000)
    started = time.monotonic()
    np.testing.assert_array_equal(oracle.labels(x), reference(x))
    assert time.monotonic() - started >= (7 - 1) / 200  # 7 requests of at most 32 images, 1/200 s apart
    assert oracle.queries == server.images("lenet5-logits") - before == 200
