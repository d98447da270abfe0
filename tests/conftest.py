"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHER_ONNX = SHARED / "teachers" / "lenet5_mnist.onnx"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the project's shared data lies beside the project root)")
    return SHARED


@pytest.fixture
def teacher_onnx(shared_dir) -> Path:
    return TEACHER_ONNX


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A small LeNet teacher trained on scikit-learn digits, exported to ONNX (seconds to make)."""
    import torch

    from db3kd.checkpoint import ModelSpec, export_onnx, save_checkpoint
    from db3kd.data import load_dataset
    from db3kd.training import TrainConfig, train_classifier

    out = tmp_path_factory.mktemp("digits-teacher")
    digits = load_dataset("digits")
    spec = ModelSpec(arch="lenet5-half", input_shape=digits.info.input_shape, num_classes=10, dataset="digits")
    torch.manual_seed(0)
    model = spec.build()
    train_classifier(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, batch_size=64, lr=3e-3), progress=False)
    save_checkpoint(out / "model.pt", model, spec)
    return export_onnx(model, spec, out / "model.onnx")


@pytest.fixture(scope="module")
def one_torch_thread():
    """As `db3kd synthesize` does for non-torch teachers: synthesis and BD spend their time in ONNX Runtime,
    and torch's spinning OpenMP threads would only slow it (modules opt in with `pytestmark`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
