"""Python callables as teachers: `--teacher python:module:function` (or `module:Class`) and any object in the
Python API; their declared contract, class names, identity, and exact counts (the callable counts what it is
asked, as a vendor would bill it)."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch

from db3kd.cli import main
from db3kd.errors import BudgetExceededError, ConfigError, TeacherError
from db3kd.oracle import LabelOracle, open_oracle
from db3kd.teachers import OnnxBackend, PythonBackend, TeacherSpec, load_teacher
from test_http import TEACHER, mnist_images

MNIST_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

MODULE = '''
import threading

import numpy as np
import onnxruntime as ort

LOCK = threading.Lock()


def _session(path, threads=None):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Digits:
    """A class teacher: instantiated with no arguments, called with each batch; counts what it is asked."""

    input_shape, num_classes, bounds, version = (1, 8, 8), 10, (0.0, 1.0), "digits-v1"
    asked = 0

    def __init__(self):
        self.session = _session({digits!r})

    def __call__(self, batch):
        with LOCK:
            Digits.asked += len(batch)
        return self.session.run(None, {{self.session.get_inputs()[0].name: batch}})[0].argmax(axis=1)


_MNIST = _session({mnist!r}, threads=1)


def mnist(batch):
    """A function teacher answering class names, as a vendor API might."""
    with LOCK:
        mnist.asked += len(batch)
        mnist.calls += 1
    labels = _MNIST.run(None, {{_MNIST.get_inputs()[0].name: batch}})[0].argmax(axis=1)
    return [mnist.classes[k] for k in labels]


mnist.input_shape, mnist.bounds, mnist.classes = (1, 28, 28), (0.0, 1.0), {names!r}
mnist.asked = mnist.calls = 0
mnist.identity = "mnist-lenet5@2026-01"
'''


@pytest.fixture
def teachers(tmp_path, monkeypatch, digits_teacher):
    """A module of Python teachers, importable as `py_teachers_<n>` (a fresh module per test)."""
    if not TEACHER.is_file():
        pytest.skip(f"shared teacher not found: {TEACHER}")
    name = f"py_teachers_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE.format(digits=str(digits_teacher), mnist=str(TEACHER),
                                                       names=MNIST_NAMES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def reference():
    oracle = LabelOracle(OnnxBackend(TEACHER, threads=1))
    return oracle.labels


# --- the shared MNIST teacher as a callable: labels and counts ----------------------------------------------------


# Calls for batches of 1, 300, 1000 and 17 images at 256 images per call: one after another (8); 3 in flight,
# each batch spread over every slot (1 + 3 + 3 + 3 + 3 = 13); 4 in flight under a rate limit, filled (8).
@pytest.mark.parametrize("concurrency, max_rps, calls", [(1, None, 8), (3, None, 13), (4, 500.0, 8)])
def test_a_callable_teacher_answers_like_the_model_and_counts_exactly(teachers, reference, concurrency, max_rps,
                                                                     calls):
    spec = TeacherSpec.parse(f"python:{teachers}:mnist").with_options(concurrency=concurrency, max_rps=max_rps)
    oracle = open_oracle(spec)
    module = sys.modules[teachers]
    assert (oracle.input_shape, oracle.num_classes, oracle.bounds) == ((1, 28, 28), 10, (0.0, 1.0))
    assert oracle.chunk_size == 256 * concurrency  # the oracle hands over enough images for every call in flight
    for n, offset in ((1, 0), (300, 1), (1000, 301), (17, 1301)):
        x = mnist_images(n, offset)
        np.testing.assert_array_equal(oracle.labels(x, ids=np.arange(n)), reference(x))  # names mapped back
    assert oracle.queries == module.mnist.asked == 1318
    assert module.mnist.calls == calls


def test_calls_really_run_in_parallel():
    """With concurrency 4, four calls are inside the callable at once (a barrier that needs all four)."""
    barrier = threading.Barrier(4, timeout=20)

    def teacher(batch):
        barrier.wait()
        return np.zeros(len(batch), dtype=np.int64)

    teacher.input_shape, teacher.num_classes, teacher.bounds = (1, 2, 2), 3, (0.0, 1.0)
    oracle = open_oracle(teacher, concurrency=4)
    assert (oracle.labels(np.zeros((8, 1, 2, 2), np.float32)) == 0).all()
    assert oracle.queries == 8


def test_a_class_teacher_and_its_identity(teachers, digits_teacher):
    spec = TeacherSpec.parse(f"python:{teachers}:Digits")
    oracle = open_oracle(spec)
    assert oracle.identity == spec.identity() == f"python:{teachers}:Digits version=digits-v1"
    x = np.random.default_rng(0).random((50, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(oracle.labels(x), LabelOracle(OnnxBackend(digits_teacher)).labels(x))
    assert oracle.queries == sys.modules[teachers].Digits.asked == 50
    assert TeacherSpec.parse(f"python:{teachers}:mnist").identity() == \
        f"python:{teachers}:mnist identity=mnist-lenet5@2026-01"


def test_the_command_line_takes_a_python_teacher_and_its_options(teachers, digits_teacher, tmp_path):
    """soft-labels with python:module:Class, --concurrency and a price: the same soft labels as the ONNX file,
    the callable asked exactly what the manifest says; then --budget-usd stops a run early (resumably)."""
    common = ["soft-labels", "--dataset", "digits", "--method", "bd", "--subset", "6", "--shard-size", "3"]
    assert main([*common, "--teacher", str(digits_teacher), "--out", str(tmp_path / "onnx")]) == 0
    assert main([*common, "--teacher", f"python:{teachers}:Digits", "--concurrency", "2", "--price-per-1000", "0.5",
                 "--out", str(tmp_path / "python")]) == 0
    with np.load(tmp_path / "onnx" / "soft_labels.npz") as a, np.load(tmp_path / "python" / "soft_labels.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    manifest = json.loads((tmp_path / "python" / "manifest.json").read_text())
    assert manifest["total_queries"] == sys.modules[teachers].Digits.asked
    # 0.5 USD per 1000 images: 0.3 USD buys 600 queries, fewer than the reference labels need.
    assert main([*common, "--teacher", f"python:{teachers}:Digits", "--price-per-1000", "0.5", "--budget-usd", "0.3",
                 "--out", str(tmp_path / "budget")]) == 2


# --- the Python API: any object with the contract ---------------------------------------------------------------


class Vendor:
    """An object with predict_labels, as a wrapped vendor client would be; labels as torch tensors."""

    input_shape, bounds, classes = (1, 2, 2), (0.0, 1.0), ("cat", "dog", "bird")

    def predict_labels(self, batch):
        assert isinstance(batch, np.ndarray) and batch.dtype == np.float32  # NumPy in, pixels clipped
        assert batch.min() >= 0 and batch.max() <= 1
        return torch.as_tensor((batch.reshape(len(batch), -1).sum(axis=1) > 2).astype(np.int64))


def test_any_object_with_the_contract(tmp_path):
    oracle = open_oracle(Vendor(), budget=10)
    x = np.stack([np.full((1, 2, 2), 0.1, np.float32), np.full((1, 2, 2), 2.0, np.float32)])
    np.testing.assert_array_equal(oracle.labels(x), [0, 1])
    assert oracle.num_classes == 3 and oracle.name == f"python:{__name__}:Vendor"
    with pytest.raises(BudgetExceededError):
        oracle.labels(np.zeros((9, 1, 2, 2), np.float32))
    assert oracle.queries == 2


def labeller(answer, **contract):
    """A function teacher answering `answer(batch)`, with the given contract attributes; `asked` counts images."""
    lock = threading.Lock()

    def teacher(batch):
        with lock:
            teacher.asked += len(batch)
        return answer(batch)

    teacher.asked = 0

    for key, value in {"input_shape": (1, 2, 2), "num_classes": 3, "bounds": (0.0, 1.0), **contract}.items():
        if value is not None:
            setattr(teacher, key, value)
    return teacher


@pytest.mark.parametrize("contract, message", [
    pytest.param({"input_shape": None}, r"declares no input_shape: expected an attribute input_shape = \(C, H, W\) of "
                                        r"positive sizes on the function or object, e.g. input_shape = \(1, 28, 28\)",
                 id="no-shape"),
    pytest.param({"input_shape": (28, 28)}, r"expected input_shape = \(C, H, W\) of positive sizes, got \(28, 28\)",
                 id="bad-shape"),
    pytest.param({"bounds": None}, r"declares no bounds", id="no-bounds"),
    pytest.param({"bounds": (1, 0)}, r"expected bounds = \(lo, hi\) with lo < hi, got \(1, 0\)", id="bad-bounds"),
    pytest.param({"num_classes": None}, r"declares neither num_classes nor classes", id="no-classes"),
    pytest.param({"num_classes": 3, "classes": ["a", "b"]}, r"declares num_classes = 3 but 2 classes", id="disagree"),
    pytest.param({"num_classes": None, "classes": [0, 1]}, r"expected classes as a list of class names \(str\)",
                 id="int-names"),
    pytest.param({"num_classes": None, "classes": ["a", "a"]}, r"its classes repeat a name", id="repeated"),
    pytest.param({"preferred_batch": 0}, r"expected preferred_batch as a positive integer, got 0", id="batch"),
])
def test_a_missing_or_wrong_contract_is_a_precise_error(contract, message):
    with pytest.raises(TeacherError, match=message):
        load_teacher(labeller(lambda b: np.zeros(len(b), np.int64), **contract))


def test_not_a_teacher():
    with pytest.raises(TeacherError, match=r"expected a callable or an object with predict_labels\(batch\), got"):
        PythonBackend(object())


@pytest.mark.parametrize("answer, contract, message", [
    pytest.param(lambda b: np.zeros(len(b) - 1, np.int64), {}, r"returned \([34],\) labels for 5 images; expected "
                                                               r"\(5,\)", id="too-few"),
    pytest.param(lambda b: np.full(len(b), 3), {}, r"returned labels in \[3, 3\]; expected classes in \[0, 3\)",
                 id="outside-classes"),
    pytest.param(lambda b: np.zeros(len(b)), {}, r"returned labels of dtype torch.float64; expected integers",
                 id="floats"),
    pytest.param(lambda b: ["cat"] * len(b), {"num_classes": None, "classes": ["dog", "bird", "fish"]},
                 r"returned \['cat'\], not among its classes \['dog', 'bird', 'fish'\]", id="unknown-name"),
    pytest.param(lambda b: ["cat"] * len(b), {}, r"returned class names \(e.g. 'cat'\) but declares no classes",
                 id="names-without-classes"),
])
@pytest.mark.parametrize("concurrency", [1, 2])
def test_wrong_answers_are_precise_errors_and_counted(answer, contract, message, concurrency):
    teacher = labeller(answer, **contract)
    oracle = open_oracle(teacher, concurrency=concurrency)
    with pytest.raises(TeacherError, match=message) as error:
        oracle.labels(np.zeros((5, 1, 2, 2), np.float32), ids=np.arange(5))
    assert f"python:{__name__}:labeller.<locals>.teacher" in str(error.value)
    # The callable answered: those queries happened (with concurrency 2, the second call of 2 images may not
    # have started when the first failed; then it was never sent).
    assert oracle.queries == teacher.asked == (5 if concurrency == 1 else teacher.asked) >= 3
    assert oracle.queries_for(np.arange(5)).sum() == teacher.asked


def test_a_callable_that_raises_is_a_teacher_error_and_not_counted():
    def fails(batch):
        raise ConnectionError("vendor down")

    fails.input_shape, fails.num_classes, fails.bounds = (1, 2, 2), 3, (0.0, 1.0)
    oracle = open_oracle(fails)
    with pytest.raises(TeacherError, match=r"raised ConnectionError: vendor down; its 4 images were not counted"):
        oracle.labels(np.zeros((4, 1, 2, 2), np.float32))
    assert oracle.queries == 0


def test_with_concurrency_the_images_answered_alongside_a_failure_are_counted():
    """Calls in flight together: the one with a poisoned image fails, the others' images are counted, and the
    right samples (not the first ones) are charged."""
    all_in_flight = threading.Barrier(3, timeout=20)

    def teacher(batch):
        all_in_flight.wait()  # the failure comes once every call has started
        if (batch > 0.5).any():
            raise TeacherError("the vendor refused an image")
        return np.zeros(len(batch), dtype=np.int64)

    teacher.input_shape, teacher.num_classes, teacher.bounds, teacher.preferred_batch = (1, 2, 2), 3, (0.0, 1.0), 4
    oracle = open_oracle(teacher, concurrency=3)
    x = np.zeros((12, 1, 2, 2), np.float32)
    x[1] = 1.0  # in the first call of three (images 0-3)
    with pytest.raises(TeacherError, match=r"8 of the 12 images of this call were answered by requests in flight "
                                           r"alongside it and are counted") as error:
        oracle.labels(x, ids=np.arange(12))
    assert error.value.answered == 8 and error.value.answered_at == tuple(range(4, 12))
    assert oracle.queries == 8
    np.testing.assert_array_equal(oracle.queries_for(np.arange(12)), [0] * 4 + [1] * 8)


@pytest.mark.parametrize("text, message", [
    ("python:nomodule_here_xyz:f", r"cannot import 'nomodule_here_xyz' for the Python teacher"),
    ("python:json:no_such_function", r"json has no 'no_such_function'"),
])
def test_unknown_python_teachers(text, message):
    with pytest.raises(TeacherError, match=message):
        TeacherSpec.parse(text).load()


@pytest.mark.parametrize("text", ["python:", "python:module", "python::f"])
def test_malformed_python_specs(text):
    with pytest.raises(ConfigError, match=r"expected a Python teacher as python:package.module:function"):
        TeacherSpec.parse(text)


def test_a_torch_teacher_called_from_python_keeps_its_threads():
    """A Python teacher may run torch itself: the run's thread policy leaves torch's threads alone for it."""
    spec = TeacherSpec.parse("python:json:dumps")
    before = torch.get_num_threads()
    with spec.thread_policy():
        assert torch.get_num_threads() == before
    with TeacherSpec.parse("http://127.0.0.1:9").thread_policy():
        assert torch.get_num_threads() == 1
