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
