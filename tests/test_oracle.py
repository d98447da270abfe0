"""LabelOracle: validation, clipping, chunking, counting and budgets, on a fake and on the real teacher."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from db3kd.errors import BudgetExceededError, InputError, TeacherError
from db3kd.oracle import LabelOracle
from db3kd.teachers import LabelBackend, OnnxBackend, TorchBackend

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHER = SHARED / "teachers" / "lenet5_mnist.onnx"
MNIST_TEST_IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
CIFAR10_TEACHER = SHARED / "teachers" / "alexnet_cifar10.onnx"
CIFAR10 = SHARED / "data" / "cifar10" / "cifar10.npz"


class FakeBackend:
    """A deterministic label-only teacher that records every batch it receives.

    Its label for an image depends on that image alone: which of K equal slices of [lo, hi] its mean
    pixel falls in. `answer`, when given, replaces that rule (to simulate a broken teacher).
    """

    def __init__(self, input_shape=(1, 4, 4), num_classes=10, bounds=(0.0, 1.0), preferred_batch=8,
                 answer=None, fail_on_call=None):
        self.name = "fake-teacher"
        self.input_shape, self.num_classes, self.bounds = input_shape, num_classes, bounds
        self.preferred_batch = preferred_batch
        self.answer, self.fail_on_call = answer, fail_on_call
        self.received: list[torch.Tensor] = []

    def predict_labels(self, x: torch.Tensor):
        self.received.append(x.clone())
        if self.fail_on_call == len(self.received):
            raise TeacherError(f"{self.name} failed on call {len(self.received)}")
        if self.answer is not None:
            return self.answer(x)
        lo, hi = self.bounds
        position = (x.flatten(1).mean(dim=1) - lo) / (hi - lo)
        return (position * self.num_classes).long().clamp(0, self.num_classes - 1)


def images(n: int, shape=(1, 4, 4), seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def mnist_images(n: int) -> np.ndarray:
    """The first n MNIST test images in [0, 1] (uniform noise if the dataset is absent)."""
    if MNIST_TEST_IMAGES.is_file():
        with gzip.open(MNIST_TEST_IMAGES) as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
        return (raw[: n * 784].reshape(n, 1, 28, 28) / 255.0).astype(np.float32)
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def onnx_teacher() -> OnnxBackend:
    if not TEACHER.is_file():
        pytest.skip(f"shared teacher not found: {TEACHER}")
    return OnnxBackend(TEACHER, threads=1)


# --- counting and budgets ---------------------------------------------------------------------------------


def test_counts_total_and_per_id_across_chunks():
    backend = FakeBackend()
    oracle = LabelOracle(backend, chunk_size=3)
    ids = np.array([0, 0, 1, 2, 2, 2, 5, 5, 5, 5])

    oracle.labels(images(10), ids=ids)
    assert [len(b) for b in backend.received] == [3, 3, 3, 1]
    assert oracle.queries == 10
    np.testing.assert_array_equal(oracle.queries_for([0, 1, 2, 3, 5, 7, 1000]), [2, 1, 3, 0, 4, 0, 0])

    oracle.labels(images(4, seed=1), ids=torch.tensor([7, 0, 7, 12]))
    assert oracle.queries == 14
    np.testing.assert_array_equal(oracle.queries_for([0, 5, 7, 12]), [3, 4, 2, 1])


def test_calls_without_ids_count_only_the_total():
    oracle = LabelOracle(FakeBackend(), chunk_size=4)
    oracle.labels(images(9))
    assert oracle.queries == 9
    np.testing.assert_array_equal(oracle.queries_for([0, 1]), [0, 0])


def test_chunk_size_defaults_to_the_backends_preferred_batch():
    backend = FakeBackend(preferred_batch=5)
    LabelOracle(backend).labels(images(12))
    assert [len(b) for b in backend.received] == [5, 5, 2]


def test_budget_is_refused_before_anything_is_sent():
    backend = FakeBackend()
    oracle = LabelOracle(backend, budget=10, chunk_size=4)
    oracle.labels(images(6), ids=np.arange(6))
    calls_before = len(backend.received)

    with pytest.raises(BudgetExceededError, match=r"6 of 10 queries used, this call needs 5 more \(4 left\)") as error:
        oracle.labels(images(5), ids=np.arange(5))

    assert (error.value.used, error.value.budget, error.value.requested) == (6, 10, 5)
    assert len(backend.received) == calls_before
    assert oracle.queries == 6
    np.testing.assert_array_equal(oracle.queries_for(np.arange(6)), np.ones(6))


def test_budget_can_be_spent_exactly():
    oracle = LabelOracle(FakeBackend(), budget=10)
    oracle.labels(images(10))
    assert (oracle.queries, oracle.remaining) == (10, 0)
    with pytest.raises(BudgetExceededError, match="10 of 10 queries used, this call needs 1 more"):
        oracle.labels(images(1))


def test_chunks_answered_before_a_teacher_failure_stay_counted():
    backend = FakeBackend(fail_on_call=2)
    oracle = LabelOracle(backend, chunk_size=4)
    with pytest.raises(TeacherError, match="failed on call 2"):
        oracle.labels(images(10), ids=np.arange(10))
    assert oracle.queries == 4
    np.testing.assert_array_equal(oracle.queries_for(np.arange(10)), [1] * 4 + [0] * 6)


def test_numpy_views_with_negative_strides_are_accepted():
    oracle = LabelOracle(FakeBackend())
    x = np.linspace(0, 1, 6 * 16, dtype=np.float32).reshape(6, 1, 4, 4)
    flipped = x[::-1, :, :, ::-1]
    np.testing.assert_array_equal(oracle.labels(flipped), oracle.labels(flipped.copy()))


def test_finite_pixels_whose_sum_overflows_are_accepted():
    backend = FakeBackend()
    x = np.full((2, 1, 4, 4), 3e38, dtype=np.float32)  # finite, but their float32 sum is inf
    np.testing.assert_array_equal(LabelOracle(backend).labels(x), [9, 9])
    assert backend.received[0].max() == 1.0


def test_empty_batch_sends_nothing():
    backend = FakeBackend()
    oracle = LabelOracle(backend)
    labels = oracle.labels(np.zeros((0, 1, 4, 4), dtype=np.float32))
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert backend.received == [] and oracle.queries == 0


# --- refused inputs ---------------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param([[[[0.0] * 4] * 4]], r"expected a torch.Tensor or numpy.ndarray of images, got list", id="list"),
    pytest.param(torch.zeros(2, 4, 4), r"expected images of shape \(N, 1, 4, 4\), got \(2, 4, 4\)", id="rank-3"),
    pytest.param(torch.zeros(2, 3, 4, 4), r"expected images of shape \(N, 1, 4, 4\), got \(2, 3, 4, 4\)",
                 id="wrong-channels"),
    pytest.param(torch.zeros(2, 1, 5, 4), r"got \(2, 1, 5, 4\)", id="wrong-height"),
    pytest.param(np.zeros((2, 1, 4, 4)), r"expected float32 images, got dtype float64", id="float64-numpy"),
    pytest.param(torch.zeros(2, 1, 4, 4, dtype=torch.float64), r"got dtype torch.float64", id="float64-tensor"),
    pytest.param(torch.zeros(2, 1, 4, 4, dtype=torch.int64), r"got dtype torch.int64", id="int-tensor"),
    pytest.param(torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous(),
                 r"NaN or inf \(first bad images: \[1\]\); nothing was sent", id="nan"),
    pytest.param(torch.tensor([float("inf"), 0.0, -float("inf")]).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous(),
                 r"NaN or inf \(first bad images: \[0, 2\]\)", id="inf"),
]


@pytest.mark.parametrize("x, message", BAD_INPUTS)
def test_bad_inputs_are_refused_before_sending(x, message):
    backend = FakeBackend()
    oracle = LabelOracle(backend)
    with pytest.raises(InputError, match=message):
        oracle.labels(x)
    assert backend.received == [] and oracle.queries == 0


@pytest.mark.parametrize("ids, message", [
    pytest.param([0, 1], r"expected ids as 3 integers \(one per image\), got shape \(2,\)", id="too-few"),
    pytest.param([0.0, 1.0, 2.0], r"got shape \(3,\) dtype float64", id="float"),
    pytest.param([[0, 1, 2]], r"got shape \(1, 3\)", id="2-d"),
    pytest.param([0, -1, 2], r"ids must be non-negative, got -1", id="negative"),
])
def test_bad_ids_are_refused_before_sending(ids, message):
    backend = FakeBackend()
    oracle = LabelOracle(backend)
    with pytest.raises(InputError, match=message):
        oracle.labels(images(3), ids=ids)
    assert backend.received == [] and oracle.queries == 0


@pytest.mark.parametrize("options, message", [
    pytest.param({"budget": -1}, r"budget must be a non-negative integer or None, got -1", id="negative-budget"),
    pytest.param({"budget": 2.5}, r"got 2.5", id="fractional-budget"),
    pytest.param({"chunk_size": 0}, r"chunk_size must be a positive integer, got 0", id="zero-chunk"),
])
def test_bad_oracle_options(options, message):
    with pytest.raises(InputError, match=message):
        LabelOracle(FakeBackend(), **options)


# --- clipping ---------------------------------------------------------------------------------------------


def test_pixels_are_clipped_to_the_teachers_bounds():
    backend = FakeBackend(bounds=(-1.0, 2.0))
    x = images(6, low=-10.0, high=10.0)
    LabelOracle(backend).labels(x)
    (received,) = backend.received
    assert received.min() >= -1.0 and received.max() <= 2.0
    inside = (x >= -1.0) & (x <= 2.0)
    assert torch.equal(received[inside], x[inside])
    assert inside.any() and not inside.all()


# --- broken teachers --------------------------------------------------------------------------------------

GARBAGE_ANSWERS = [
    pytest.param(lambda x: torch.zeros(len(x) - 1, dtype=torch.long),
                 r"teacher fake-teacher returned \(2,\) labels for 3 images", id="too-few"),
    pytest.param(lambda x: torch.zeros(len(x), 1, dtype=torch.long), r"returned \(3, 1\) labels", id="2-d"),
    pytest.param(lambda x: np.full(len(x), -1), r"fake-teacher returned labels in \[-1, -1\]; expected classes in \[0, 10\)",
                 id="negative"),
    pytest.param(lambda x: torch.full((len(x),), 10), r"fake-teacher returned labels in \[10, 10\]", id="too-large"),
    pytest.param(lambda x: torch.zeros(len(x)), r"fake-teacher returned labels of dtype torch.float32; expected integers",
                 id="float"),
    pytest.param(lambda x: np.zeros(len(x), dtype=bool), r"fake-teacher returned labels of dtype torch.bool",
                 id="bool"),
    pytest.param(lambda x: ["a"] * len(x), r"fake-teacher returned something that is not an array of labels",
                 id="strings"),
]


@pytest.mark.parametrize("answer, message", GARBAGE_ANSWERS)
def test_garbage_from_the_teacher_is_a_teacher_error(answer, message):
    oracle = LabelOracle(FakeBackend(answer=answer))
    with pytest.raises(TeacherError, match=message):
        oracle.labels(images(3))
    assert oracle.queries == 3  # the teacher saw the images, whatever it answered


# --- types in and out; one image alone or in a batch ------------------------------------------------------


def test_numpy_in_numpy_out_and_tensor_in_tensor_out():
    oracle = LabelOracle(FakeBackend())
    x = images(5)
    from_numpy = oracle.labels(x.numpy())
    from_tensor = oracle.labels(x)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.int64 and from_numpy.shape == (5,)
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.dtype == torch.int64
    assert from_tensor.device == x.device
    np.testing.assert_array_equal(from_numpy, from_tensor.numpy())


def test_a_sample_gets_the_same_label_alone_or_inside_a_batch():
    oracle = LabelOracle(FakeBackend(), chunk_size=3)
    x = images(7)
    batch = oracle.labels(x)
    alone = torch.cat([oracle.labels(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(batch, alone)
    assert len(set(batch.tolist())) > 1  # the check means something only if labels differ


def test_torch_backend_labels_match_the_modules_argmax():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 2 * 2, 5))
    backend = TorchBackend(module, input_shape=(1, 4, 4), num_classes=5, device="cpu")
    x = images(32, seed=3)
    with torch.no_grad():
        expected = module(x).argmax(dim=1)
    labels = LabelOracle(backend, chunk_size=10).labels(x)
    assert torch.equal(labels, expected)
    assert len(set(expected.tolist())) > 1


# --- the real teacher -------------------------------------------------------------------------------------


def test_onnx_teacher_contract(onnx_teacher):
    assert isinstance(onnx_teacher, LabelBackend)
    assert onnx_teacher.input_shape == (1, 28, 28)
    assert onnx_teacher.num_classes == 10
    assert onnx_teacher.bounds == (0.0, 1.0)


def test_onnx_teacher_labels_match_onnx_runtime(onnx_teacher):
    import onnxruntime as ort

    x = mnist_images(100)
    session = ort.InferenceSession(str(TEACHER), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    oracle = LabelOracle(onnx_teacher, chunk_size=32)
    np.testing.assert_array_equal(oracle.labels(x, ids=np.arange(100) // 10), expected)
    assert oracle.queries == 100
    np.testing.assert_array_equal(oracle.queries_for(np.arange(10)), np.full(10, 10))


def test_onnx_teacher_same_label_alone_or_in_a_batch(onnx_teacher):
    oracle = LabelOracle(onnx_teacher)
    x = mnist_images(20)
    batch = oracle.labels(x)
    alone = np.concatenate([oracle.labels(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(batch, alone)
    assert oracle.queries == 40


def test_onnx_teacher_clips_like_the_bounds(onnx_teacher):
    oracle = LabelOracle(onnx_teacher)
    x = mnist_images(20)
    pushed_out = np.where(x > 0.5, x + 3.0, x - 3.0).astype(np.float32)  # clips back to 0 and 1
    np.testing.assert_array_equal(oracle.labels(pushed_out), oracle.labels((x > 0.5).astype(np.float32)))


# --- ONNX Runtime settings and batch size (benchmarks/oracle.py --sweep) ---------------------------------------


def test_session_options_apply_settings_by_name():
    import onnxruntime as ort

    from db3kd.teachers.onnx_backend import session_options

    options = session_options(threads=3, settings={
        "intra_op_num_threads": 1, "inter_op_num_threads": 2, "execution_mode": "parallel",
        "graph_optimization_level": "extended", "enable_cpu_mem_arena": False, "enable_mem_pattern": False,
        "session.intra_op.allow_spinning": "0"})
    assert options.intra_op_num_threads == 3  # `threads` wins over the settings
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(settings={"intra_op_num_threads": 1}).intra_op_num_threads == 1
    with pytest.raises(ValueError, match="unknown ONNX Runtime setting 'intra_threads'"):
        session_options(settings={"intra_threads": 1})


def test_onnx_sessions_get_the_tuned_defaults(onnx_teacher):
    from db3kd.teachers.onnx_backend import SESSION_SETTINGS

    assert SESSION_SETTINGS["session.intra_op.allow_spinning"] == "0"
    options = onnx_teacher.model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1  # the fixture's threads=1 on top of the defaults


def test_default_batch_by_image_size():
    from db3kd.teachers.onnx_backend import default_batch

    assert default_batch((1, 28, 28)) == 256  # MNIST: unchanged
    assert default_batch((3, 32, 32)) == 128  # CIFAR-10: as fast as 256 to 1024, half the memory of 256
    assert default_batch((3, 64, 64)) == 32
    assert default_batch((3, 224, 224)) == 8  # never fewer


def test_onnx_preferred_batch_can_be_given(onnx_teacher):
    assert onnx_teacher.preferred_batch == 256
    assert OnnxBackend(TEACHER, threads=1, preferred_batch=100).preferred_batch == 100


def test_cifar10_teacher_labels_match_a_bare_session():
    """The CIFAR-10 AlexNet through the oracle with the tuned defaults: the arg-max of ONNX Runtime's defaults."""
    if not (CIFAR10_TEACHER.is_file() and CIFAR10.is_file()):
        pytest.skip(f"shared CIFAR-10 teacher or data not found: {CIFAR10_TEACHER}, {CIFAR10}")
    import onnxruntime as ort

    with np.load(CIFAR10) as data:
        x = np.ascontiguousarray(data["x_test"][:300].transpose(0, 3, 1, 2) / 255.0, dtype=np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(CIFAR10_TEACHER), options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    backend = OnnxBackend(CIFAR10_TEACHER, threads=1)
    assert (backend.input_shape, backend.num_classes, backend.preferred_batch) == ((3, 32, 32), 10, 128)
    oracle = LabelOracle(backend)
    np.testing.assert_array_equal(oracle.labels(x), expected)
    assert oracle.queries == 300 and len(set(expected.tolist())) == 10


# --- the white-box teacher stays out of label-only code ---------------------------------------------------


def test_white_box_logits_agree_with_the_oracles_labels(onnx_teacher):
    from db3kd.whitebox import WhiteBoxTeacher

    teacher = WhiteBoxTeacher.from_file(TEACHER, threads=1)
    x = mnist_images(50)
    logits = teacher.logits(x)
    assert logits.shape == (50, 10) and logits.dtype == torch.float32
    np.testing.assert_array_equal(logits.argmax(dim=1).numpy(), LabelOracle(onnx_teacher).labels(x))


def test_white_box_logits_can_be_kd_targets():
    from db3kd.whitebox import WhiteBoxTeacher

    torch.manual_seed(0)
    teacher = WhiteBoxTeacher.from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)),
                                          (1, 4, 4), 3, device="cpu")
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = images(8)
    targets = teacher.logits(x).softmax(dim=1)
    loss = torch.nn.functional.kl_div(student(x).log_softmax(dim=1), targets, reduction="batchmean")
    loss.backward()  # would fail if the teacher's logits were inference-mode tensors
    assert student[1].weight.grad is not None


@pytest.mark.parametrize("x, message", [
    pytest.param(np.zeros((2, 1, 4, 4)), r"expected float32 images, got dtype float64", id="float64"),
    pytest.param(torch.zeros(2, 4, 4), r"expected images of shape \(N, 1, 4, 4\), got \(2, 4, 4\)", id="rank-3"),
    pytest.param(torch.full((1, 1, 4, 4), float("nan")), r"NaN or inf", id="nan"),
])
def test_white_box_refuses_bad_inputs(x, message):
    from db3kd.whitebox import WhiteBoxTeacher

    teacher = WhiteBoxTeacher.from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)),
                                          (1, 4, 4), 3, device="cpu")
    with pytest.raises(InputError, match=message):
        teacher.logits(x)


def test_white_box_teacher_is_unreachable_from_label_only_code():
    from db3kd.whitebox import WhiteBoxTeacher

    teacher = WhiteBoxTeacher.from_module(torch.nn.Linear(1, 2), (1, 1, 1), 2, device="cpu")
    assert not isinstance(teacher, LabelBackend)
    package = Path(__import__("db3kd").__file__).parent
    label_only = [package / "oracle.py", *sorted((package / "teachers").glob("*.py"))]
    assert len(label_only) >= 5
    for path in label_only:
        assert "whitebox" not in path.read_text(), f"{path} mentions the white-box teacher"
