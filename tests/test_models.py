"""Model zoo: registry, shapes, parameter counts, errors, ONNX export, and the benchmark teacher's weights."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from db3kd.errors import ConfigError
from db3kd.models import available_models, build_model, count_parameters, register_model
from db3kd.models import registry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHER = SHARED / "teachers" / "lenet5_mnist.onnx"
MNIST_TEST_IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"

ALL_MODELS = [
    "alexnet", "alexnet-half", "alexnet-quarter",
    "lenet5", "lenet5-fifth", "lenet5-half",
    "resnet18", "resnet34",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- expected parameter counts from layer shapes


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running statistics are buffers


def lenet_params(c1: int, c2: int, fc: int, classes: int = 10) -> int:
    # 1x28x28 -> conv 24 -> pool 12 -> conv 8 -> pool 4
    return conv(1, c1, 5) + conv(c1, c2, 5) + linear(c2 * 4 * 4, fc) + linear(fc, classes)


def zskd_alexnet_params(d: int, classes: int = 10) -> int:
    # 3x32x32 -> pool 15 -> pool 7 -> pool 3; conv 48-128-192-192-128, fc 512-256, all divided by d
    w1, w2, w3, w4, w5, f1, f2 = (w // d for w in (48, 128, 192, 192, 128, 512, 256))
    convs = conv(3, w1, 5) + conv(w1, w2, 5) + conv(w2, w3, 3) + conv(w3, w4, 3) + conv(w4, w5, 3)
    fcs = linear(w5 * 3 * 3, f1) + linear(f1, f2) + linear(f2, classes)
    return convs + fcs + sum(bn(w) for w in (w1, w2, w3, w4, w5, f1, f2))


def db3kd_alexnet_params(d: int, classes: int = 10) -> int:
    # 3x32x32 -> conv/2 16 -> pool 8 -> pool 4 -> pool 2; conv 64-192-384-256-256, fc 4096-4096, divided by d
    w1, w2, w3, w4, w5, f1, f2 = (w // d for w in (64, 192, 384, 256, 256, 4096, 4096))
    convs = conv(3, w1, 3) + conv(w1, w2, 3) + conv(w2, w3, 3) + conv(w3, w4, 3) + conv(w4, w5, 3)
    fcs = linear(w5 * 2 * 2, f1) + linear(f1, f2) + linear(f2, classes)
    return convs + fcs + sum(bn(w) for w in (w1, w2, w3, w4, w5, f1, f2))


PARAMETER_COUNTS = [
    # (name, input_shape, kwargs, expected)
    ("lenet5", (1, 28, 28), {}, 187_780),  # the paper's and the benchmark teacher's count
    ("lenet5-half", (1, 28, 28), {}, lenet_params(10, 25, 100)),
    ("lenet5-fifth", (1, 28, 28), {}, lenet_params(4, 10, 40)),
    ("alexnet", (3, 32, 32), {}, zskd_alexnet_params(1)),
    ("alexnet-half", (3, 32, 32), {}, zskd_alexnet_params(2)),
    ("alexnet-quarter", (3, 32, 32), {}, zskd_alexnet_params(4)),
    ("alexnet", (3, 32, 32), {"variant": "db3kd"}, db3kd_alexnet_params(1)),
    ("alexnet-half", (3, 32, 32), {"variant": "db3kd"}, db3kd_alexnet_params(2)),
    ("alexnet-quarter", (3, 32, 32), {"variant": "db3kd"}, db3kd_alexnet_params(4)),
    ("resnet18", (3, 32, 32), {}, 11_173_962),
    ("resnet34", (3, 32, 32), {}, 21_282_122),
]


def _id(name: str, shape: tuple[int, int, int], kwargs: dict) -> str:
    options = "".join(f"-{k}={v}" for k, v in kwargs.items())
    return f"{name}-{'x'.join(map(str, shape))}{options}"


@pytest.mark.parametrize(
    "name, shape, kwargs, expected", PARAMETER_COUNTS, ids=[_id(n, s, k) for n, s, k, _ in PARAMETER_COUNTS]
)
def test_parameter_count(name, shape, kwargs, expected):
    assert count_parameters(build_model(name, shape, 10, **kwargs)) == expected


def test_layer_shape_arithmetic_matches_the_known_lenet5_count():
    assert lenet_params(20, 50, 200) == 187_780  # so the half / fifth expectations are computed right


def test_count_parameters_skips_frozen_parameters():
    model = build_model("lenet5", (1, 28, 28), 10)
    model.fc2.requires_grad_(False)
    assert count_parameters(model) == 187_780 - linear(200, 10)


# ---------------------------------------------------------------- registry


def test_available_models_lists_every_family():
    assert available_models() == ALL_MODELS


def test_register_model_adds_a_builder_whose_options_are_checked(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))

    @register_model("tiny-linear")
    def tiny(input_shape, num_classes, *, bias: bool = True):
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes, bias=bias))

    assert "tiny-linear" in available_models()
    model = build_model("tiny-linear", (1, 4, 4), 3, bias=False)
    assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bais; accepted options: bias"):
        build_model("tiny-linear", (1, 4, 4), 3, bais=False)


def test_register_model_refuses_a_duplicate_name():
    with pytest.raises(ConfigError, match="'lenet5' is already registered"):
        register_model("lenet5")(lambda input_shape, num_classes: nn.Identity())
    assert available_models() == ALL_MODELS


def test_register_model_refuses_an_empty_name():
    with pytest.raises(ConfigError, match="expected a non-empty string, got ''"):
        register_model("")


# ---------------------------------------------------------------- output shapes

SHAPES = [
    # (name, input_shape, num_classes, kwargs)
    ("lenet5", (1, 28, 28), 10, {}),
    ("lenet5-half", (1, 28, 28), 10, {}),
    ("lenet5-fifth", (1, 28, 28), 10, {}),
    ("lenet5", (1, 8, 8), 10, {}),
    ("lenet5-half", (1, 8, 8), 10, {}),
    ("lenet5-fifth", (1, 8, 8), 10, {}),
    ("lenet5", (3, 32, 20), 7, {}),
    ("lenet5", (1, 28, 28), 10, {"padding": 2}),
    ("alexnet", (3, 32, 32), 10, {}),
    ("alexnet-half", (3, 32, 32), 10, {}),
    ("alexnet-quarter", (3, 32, 32), 10, {}),
    ("alexnet", (3, 32, 32), 10, {"variant": "db3kd"}),
    ("alexnet-quarter", (1, 28, 28), 10, {}),
    ("alexnet-quarter", (3, 15, 15), 2, {}),
    ("alexnet-quarter", (3, 15, 15), 2, {"variant": "db3kd"}),
    ("resnet18", (1, 28, 28), 10, {}),
    ("resnet34", (1, 28, 28), 10, {}),
    ("resnet18", (3, 8, 8), 100, {}),
]


@pytest.mark.parametrize(
    "name, shape, num_classes, kwargs", SHAPES, ids=[f"{_id(n, s, k)}-{c}classes" for n, s, c, k in SHAPES]
)
def test_output_shape(name, shape, num_classes, kwargs):
    model = build_model(name, shape, num_classes, **kwargs).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, *shape))
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    "shape, kwargs, expected_padding",
    [
        ((1, 28, 28), {}, 0),
        ((1, 16, 16), {}, 0),
        ((1, 15, 15), {}, 2),
        ((1, 8, 8), {}, 2),
        ((1, 28, 12), {}, 2),
        ((1, 28, 28), {"padding": 1}, 1),
    ],
    ids=["28px-auto", "16px-auto", "15px-auto", "8px-auto", "28x12-auto", "28px-explicit-1"],
)
def test_lenet_padding_rule(shape, kwargs, expected_padding):
    model = build_model("lenet5", shape, 10, **kwargs)
    assert model.conv1.padding == model.conv2.padding == (expected_padding, expected_padding)


ZSKD_FEATURES = (
    "Conv2d ReLU LocalResponseNorm MaxPool2d BatchNorm2d "
    "Conv2d ReLU LocalResponseNorm MaxPool2d BatchNorm2d "
    "Conv2d ReLU BatchNorm2d Conv2d ReLU BatchNorm2d Conv2d ReLU MaxPool2d BatchNorm2d"
)
DB3KD_FEATURES = (
    "Conv2d BatchNorm2d ReLU MaxPool2d Conv2d BatchNorm2d ReLU MaxPool2d "
    "Conv2d BatchNorm2d ReLU Conv2d BatchNorm2d ReLU Conv2d BatchNorm2d ReLU MaxPool2d"
)
CLASSIFIER = "Linear ReLU Dropout BatchNorm1d Linear ReLU Dropout BatchNorm1d Linear"


@pytest.mark.parametrize(
    "variant, features, pool_kernel",
    [("zskd", ZSKD_FEATURES, 3), ("db3kd", DB3KD_FEATURES, 2)],
    ids=["zskd", "db3kd"],
)
def test_alexnet_layer_order_follows_the_reference_code(variant, features, pool_kernel):
    model = build_model("alexnet", (3, 32, 32), 10, variant=variant)
    assert " ".join(type(m).__name__ for m in model.features) == features
    assert " ".join(type(m).__name__ for m in model.classifier) == CLASSIFIER
    assert {m.kernel_size for m in model.features if isinstance(m, nn.MaxPool2d)} == {pool_kernel}


def test_zskd_lrn_matches_tensorflow_definition():
    # TF: x / (bias + alpha * sum of x^2 over channels d-2..d+2) ** beta, with bias 1, alpha 1e-4, beta 0.75.
    lrn = build_model("alexnet", (3, 32, 32), 10).features.lrn1
    x = 4 * torch.randn(2, 9, 3, 3)
    squares = nn.functional.pad(x**2, (0, 0, 0, 0, 2, 2))  # zero channels on both sides
    window_sums = sum(squares[:, i : i + 9] for i in range(5))
    torch.testing.assert_close(lrn(x), x / (1 + 1e-4 * window_sums) ** 0.75)


# ---------------------------------------------------------------- invalid requests

ERRORS = [
    # (id, name, input_shape, num_classes, kwargs, match)
    ("unknown-name", "vgg16", (3, 32, 32), 10, {}, r"unknown model 'vgg16'; known models: alexnet, .*resnet34"),
    ("unknown-option", "lenet5", (1, 28, 28), 10, {"padd": 1}, r"unknown option\(s\) padd; accepted options: padding"),
    ("option-of-no-options", "resnet18", (3, 32, 32), 10, {"padding": 1}, r"option\(s\) padding; accepted options: none"),
    ("shape-2d", "lenet5", (28, 28), 10, {}, r"expected 3 positive integers .*, got \(28, 28\)"),
    ("shape-zero", "lenet5", (1, 0, 28), 10, {}, r"expected 3 positive integers .*, got \(1, 0, 28\)"),
    ("shape-float", "lenet5", (1, 28.0, 28), 10, {}, r"expected 3 positive integers .*, got \(1, 28.0, 28\)"),
    ("shape-string", "lenet5", "1x28x28", 10, {}, r"expected 3 positive integers .*, got '1x28x28'"),
    ("one-class", "lenet5", (1, 28, 28), 1, {}, r"num_classes: expected an integer >= 2, got 1"),
    ("float-classes", "lenet5", (1, 28, 28), 10.0, {}, r"num_classes: expected an integer >= 2, got 10.0"),
    ("lenet-too-small-unpadded", "lenet5", (1, 12, 12), 10, {"padding": 0}, r"at least 16x16 pixels, got 12x12"),
    ("lenet-too-small-auto", "lenet5-half", (1, 3, 3), 10, {}, r"padding 2: expected .* at least 4x4 pixels, got 3x3"),
    ("lenet-negative-padding", "lenet5", (1, 28, 28), 10, {"padding": -1}, r"padding: expected None or an integer >= 0, got -1"),
    ("alexnet-too-small", "alexnet", (3, 14, 32), 10, {}, r"at least 15x15 pixels, got 14x32"),
    ("alexnet-db3kd-too-small", "alexnet-half", (3, 32, 14), 10, {"variant": "db3kd"}, r"at least 15x15 pixels, got 32x14"),
    ("alexnet-unknown-variant", "alexnet", (3, 32, 32), 10, {"variant": "torchvision"}, r"variant: expected one of zskd, db3kd, got 'torchvision'"),
    ("resnet-too-small", "resnet34", (3, 7, 7), 10, {}, r"at least 8x8 pixels, got 7x7"),
]  # fmt: skip


@pytest.mark.parametrize("name, shape, num_classes, kwargs, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_request_raises_config_error(name, shape, num_classes, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, shape, num_classes, **kwargs)


# ---------------------------------------------------------------- ONNX export

EXPORTS = [
    ("lenet5", (1, 28, 28), {}),
    ("lenet5-half", (1, 8, 8), {}),
    ("lenet5-fifth", (1, 28, 28), {}),
    ("alexnet", (3, 32, 32), {}),
    ("alexnet-half", (3, 32, 32), {}),
    ("alexnet-quarter", (3, 32, 32), {}),
    ("alexnet-quarter", (3, 32, 32), {"variant": "db3kd"}),
    ("resnet18", (1, 16, 16), {}),
    ("resnet34", (1, 16, 16), {}),
]


def _randomise_batchnorm_statistics(model: nn.Module) -> None:
    # Fresh statistics (mean 0, variance 1) would let an export that ignores them pass.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


def _onnx_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Known and harmless with the TorchScript exporter the project uses (dynamo=False): its deprecation notice, the
# empty-input check inside F.local_response_norm traced as a constant, and a skipped constant-folding step.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")
@pytest.mark.filterwarnings("ignore:Constant folding - Only steps=1")
@pytest.mark.parametrize("name, shape, kwargs", EXPORTS, ids=[_id(n, s, k) for n, s, k in EXPORTS])
def test_onnx_export_gives_the_same_predictions(name, shape, kwargs, tmp_path):
    model = build_model(name, shape, 10, **kwargs).eval()
    _randomise_batchnorm_statistics(model)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model,
        (torch.rand(2, *shape),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    x = torch.rand(5, *shape)  # another batch size than the export's: the batch axis must be dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    (logits,) = _onnx_session(path).run(["logits"], {"image": x.numpy()})
    assert logits.shape == (5, 10)
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- the benchmark teacher's weights


def _teacher_inputs() -> np.ndarray:
    """Real digits when available, plus random and structured images, (N, 1, 28, 28) float32 in [0, 1]."""
    rng = np.random.default_rng(0)
    images = [rng.random((32, 1, 28, 28), dtype=np.float32)]
    blank, bar, cross, checker = (np.zeros((1, 1, 28, 28), np.float32) for _ in range(4))
    bar[..., :, 12:16] = 1.0
    cross[..., 12:16, :] = cross[..., :, 12:16] = 1.0
    checker[..., ::2, ::2] = checker[..., 1::2, 1::2] = 1.0
    images += [blank, np.ones_like(blank), bar, cross, checker]
    if MNIST_TEST_IMAGES.exists():
        with gzip.open(MNIST_TEST_IMAGES, "rb") as f:
            raw = np.frombuffer(f.read(16 + 64 * 28 * 28), dtype=np.uint8, offset=16)
        images.append((raw.reshape(64, 1, 28, 28) / 255.0).astype(np.float32))
    return np.concatenate(images)


@pytest.mark.skipif(not TEACHER.exists(), reason=f"benchmark teacher not found at {TEACHER}")
def test_teacher_onnx_weights_load_into_lenet5_and_agree():
    state_dict = {
        init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in onnx.load(TEACHER).graph.initializer
    }
    model = build_model("lenet5", (1, 28, 28), 10)
    model.load_state_dict(state_dict, strict=True)  # same names and shapes, nothing missing or extra
    model.eval()

    x = _teacher_inputs()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    (logits,) = _onnx_session(TEACHER).run(["logits"], {"image": x})
    np.testing.assert_array_equal(expected.argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_allclose(expected, logits, rtol=1e-3, atol=1e-3)
