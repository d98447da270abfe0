"""An ONNX file as a label-only teacher, through ONNX Runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.download import file_digest
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
        preferred_batch: chunk size the oracle uses for this backend (default: 256 images or ~1.5 MB of
            them, whichever is fewer, at least 8; see `default_batch`).
    """

    def __init__(self, path: str | os.PathLike, input_shape=None, num_classes: int | None = None, bounds=None,
                 threads: int | None = None, preferred_batch: int | None = None):
        self.model = open_onnx(path, input_shape, num_classes, bounds, threads)
        self.input_shape, self.num_classes, self.bounds = self.model.input_shape, self.model.num_classes, self.model.bounds
        self.preferred_batch = int(preferred_batch or default_batch(self.input_shape))
        self.name = f"onnx:{path}"
        self.identity = "sha256:" + file_digest(Path(path))  # the file's content: a retrained teacher is another one

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        return self.model.scores(x.detach().cpu().numpy()).argmax(axis=1)


# Images per call: 256, or ~1.5 MB of float32 input when the images are large; never fewer than 8. Past a few
# dozen images a call, the batch hardly changes ONNX Runtime's throughput on a CPU, while its memory (the
# activations it keeps in its arena) grows with the batch: ~1.35 MB per image for the CIFAR-10 AlexNet.
# MNIST (3 KB): 256; CIFAR-10 (12 KB): 128 (the same images/s as 256 to 1024, 170 MB instead of 340 MB to 1.4 GB);
# ImageNet at 224 (600 KB): 8. Measured by `python benchmarks/oracle.py --sweep [--teacher cifar10]`.
MAX_BATCH = 256
BATCH_INPUT_BYTES = 3 << 19


def default_batch(input_shape) -> int:
    """The oracle's chunk size for images of `input_shape` (C, H, W), when the caller gives none."""
    image_bytes = 4 * int(np.prod(input_shape))
    return max(8, min(MAX_BATCH, BATCH_INPUT_BYTES // image_bytes))


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX Runtime session over a classifier file, with its input contract. Its scores are read only
    by `OnnxBackend` (for the arg-max) and by the white-box standard-KD baseline."""

    session: object = field(repr=False)
    input_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    bounds: tuple[float, float]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The model's first output (N, K) for a float32 batch (N, C, H, W)."""
        return self.session.run(None, {self.input_name: x})[0]


def open_onnx(path: str | os.PathLike, input_shape=None, num_classes: int | None = None, bounds=None,
              threads: int | None = None) -> OnnxModel:
    """Load `path` with ONNX Runtime (CUDA when present) and read its input contract (see `OnnxBackend`)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"ONNX teacher not found: {path}")
    options = session_options(threads)
    try:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        raise TeacherError(f"ONNX Runtime cannot load {path}: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        raise TeacherError(f"{path}: expected one float32 image input, got {[(i.name, i.type) for i in inputs]}")
    meta = session.get_modelmeta().custom_metadata_map
    if bounds is None:
        bounds = tuple(float(b) for b in meta["db3kd.bounds"].split(",")) if "db3kd.bounds" in meta else (0.0, 1.0)
    return OnnxModel(session, inputs[0].name, _resolve_shape(path, inputs[0].shape, input_shape),
                     _resolve_classes(path, outputs[0].shape, num_classes, meta), (float(bounds[0]), float(bounds[1])))


# ONNX Runtime settings of every session `open_onnx` makes, as `session_options` reads them: SessionOptions
# attributes by name, and session config entries (names with dots); the rest stays ONNX Runtime's default.
# - No spinning: ONNX Runtime's intra-op threads otherwise busy-wait for work between and after operators,
#   taking the cores from everything else (other jobs on a shared machine; this process's own torch work between
#   queries). On the shared 2-core machine (load average 5-10), 2 threads without spinning answered 1.25-1.6x
#   the images/s of 2 spinning threads on the MNIST LeNet-5 and 1.03-1.33x on the CIFAR-10 AlexNet, with the
#   same labels (benchmarks/results/oracle_*_sweep.json). 1 thread did as well there, the other jobs holding
#   the second core; the thread count stays ONNX Runtime's choice (all physical cores) or the caller's.
# - Kept as they are: the sequential executor (the parallel one: 0.5-0.7x), full graph optimisation (basic or
#   extended, without the NCHWc layout: 0.77-0.87x on AlexNet), the memory arena (off: 0.78-0.88x) and its
#   memory pattern (no clear difference), denormals (flushed to zero: no difference, and it could change labels).
SESSION_SETTINGS: dict[str, object] = {"session.intra_op.allow_spinning": "0"}

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int | None = None, settings: dict | None = None):
    """`ort.SessionOptions` with `settings` (default `SESSION_SETTINGS`) and, when given, `threads` intra-op
    threads (which overrides the settings' `intra_op_num_threads`).

    Settings: `intra_op_num_threads`, `inter_op_num_threads`, `execution_mode` ("sequential" or "parallel"),
    `graph_optimization_level` ("disable", "basic", "extended", "layout", "all"), `enable_cpu_mem_arena`,
    `enable_mem_pattern`, and any session config entry by its key (e.g. "session.intra_op.allow_spinning": "0").
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for name, value in (SESSION_SETTINGS if settings is None else settings).items():
        if "." in name:
            options.add_session_config_entry(name, str(value))
        elif name == "execution_mode":
            options.execution_mode = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
                                      "parallel": ort.ExecutionMode.ORT_PARALLEL}[value]
        elif name == "graph_optimization_level":
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[value])
        elif name in ("intra_op_num_threads", "inter_op_num_threads", "enable_cpu_mem_arena", "enable_mem_pattern"):
            setattr(options, name, value)
        else:
            raise ValueError(f"unknown ONNX Runtime setting {name!r}")
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


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


def _resolve_classes(path, dims, given, meta) -> int:
    if given is not None:
        return int(given)
    if "db3kd.num_classes" in meta:
        return int(meta["db3kd.num_classes"])
    if len(dims) == 2 and isinstance(dims[1], int):
        return dims[1]
    raise TeacherError(f"{path}: cannot tell the class count from output dims {dims}; pass num_classes")

