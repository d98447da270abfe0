"""An ONNX file as a label-only teacher, through ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import TeacherError


class OnnxBackend:
    """Labels from an ONNX model with one float32 image input and one (N, K) score output.

    Input shape and class count are read from the model; where the model leaves them symbolic, pass
    them. Bounds come from the `db3kd.bounds` metadata that `db3kd train-teacher` writes, else
    `bounds`, else [0, 1].

    Args:
        path: the .onnx file.
        input_shape: (C, H, W), needed only if the model's input dims are symbolic.
        num_classes: K, needed only if the model's output dim is symbolic.
        bounds: pixel range, overriding the file's metadata.
        threads: ONNX Runtime intra-op threads (default: its own choice, all physical cores).
        preferred_batch: chunk size the oracle uses for this backend.
    """

    def __init__(self, path: str | os.PathLike, input_shape=None, num_classes: int | None = None, bounds=None,
                 threads: int | None = None, preferred_batch: int = 256):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"ONNX teacher not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            raise TeacherError(f"ONNX Runtime cannot load {path}: {e}") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)":
            raise TeacherError(f"{path}: expected one float32 image input, got {[(i.name, i.type) for i in inputs]}")
        self._input_name = inputs[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        self.input_shape = self._resolve_shape(path, inputs[0].shape, input_shape)
        self.num_classes = self._resolve_classes(path, outputs[0].shape, num_classes, meta)
        if bounds is None:
            bounds = tuple(float(b) for b in meta["db3kd.bounds"].split(",")) if "db3kd.bounds" in meta else (0.0, 1.0)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.preferred_batch = int(preferred_batch)
        self.name = f"onnx:{path}"

    @staticmethod
    def _resolve_shape(path, dims, given) -> tuple[int, int, int]:
        declared = dims[1:] if len(dims) == 4 else None
        if declared is None:
            raise TeacherError(f"{path}: expected a 4-d image input (N, C, H, W), got dims {dims}")
        if given is not None:
            given = tuple(int(s) for s in given)
            if any(isinstance(d, int) and d != g for d, g in zip(declared, given)):
                raise TeacherError(f"{path}: input_shape {given} contradicts the model's input dims {declared}")
            return given
        if not all(isinstance(d, int) for d in declared):
            raise TeacherError(f"{path}: the model's input dims {declared} are symbolic; pass input_shape=(C, H, W)")
        return tuple(declared)

    @staticmethod
    def _resolve_classes(path, dims, given, meta) -> int:
        if given is not None:
            return int(given)
        if "db3kd.num_classes" in meta:
            return int(meta["db3kd.num_classes"])
        if len(dims) == 2 and isinstance(dims[1], int):
            return dims[1]
        raise TeacherError(f"{path}: cannot tell the class count from output dims {dims}; pass num_classes")

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        scores = self._session.run(None, {self._input_name: x.detach().cpu().numpy()})[0]
        return scores.argmax(axis=1)
