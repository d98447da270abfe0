"""The shared MNIST teacher as a Python callable, for `--teacher python:mnist_callable:MnistTeacher` (with this
folder on PYTHONPATH): the way a user wraps a model or a vendor's API. It counts the images it is asked about
(`IMAGES`), which benchmarks/own_data.py compares with the oracle's count."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEACHER = Path(__file__).resolve().parents[2] / "shared" / "teachers" / "lenet5_mnist.onnx"
IMAGES = [0]  # images answered by every instance of this process


class MnistTeacher:
    """Top-1 labels of the shared LeNet-5 (ONNX Runtime), declaring db3kd's callable contract."""

    input_shape = (1, 28, 28)
    num_classes = 10
    bounds = (0.0, 1.0)
    version = "lenet5_mnist.onnx"

    def __init__(self):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(TEACHER), providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        IMAGES[0] += len(batch)
        return self.session.run(None, {"image": batch})[0].argmax(axis=1)
