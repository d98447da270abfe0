"""Teacher backends and the spec strings that choose them (`TeacherSpec`).

A teacher spec is what `--teacher` takes on the command line:
- `path/to/model.pt`: a checkpoint written by `db3kd train-teacher` (PyTorch);
- `path/to/model.onnx`: any ONNX classifier (ONNX Runtime);
- `http://host:port` or `https://...`: a label service speaking the protocol of `db3kd serve`;
- `v2+http://host:port/models/NAME`: a model on an Open Inference Protocol (KServe V2) server;
- `python:package.module:function` (or `module:Class`): any Python callable that declares its contract.

Backends answer labels only; `db3kd.oracle.LabelOracle` (which imports this package, never the other way
round) is the one door through which db3kd queries them.
"""

from __future__ import annotations

import os

import torch

from .base import LabelBackend
from .onnx_backend import OnnxBackend
from .python_backend import PythonBackend
from .spec import TeacherSpec
from .torch_backend import TorchBackend

__all__ = ["HttpBackend", "LabelBackend", "OnnxBackend", "PythonBackend", "TeacherSpec", "TorchBackend", "V2Backend",
           "load_teacher"]

# The HTTP backends on first use: httpx costs a fifth of a second to import, and most runs have a file teacher.
_LAZY = {"HttpBackend": ".http_backend", "V2Backend": ".v2_backend"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_teacher(spec, api_key: str | None = None, **options) -> LabelBackend:
    """The backend for a teacher: a spec (path, URL or `python:` path, see `TeacherSpec`), whose `options` go to
    the backend's constructor; a `torch.nn.Module` (needs `input_shape` and `num_classes` options); a ready
    backend, returned as is; or any Python callable or object with `predict_labels` that declares its contract
    (`input_shape`, `num_classes` or `classes`, `bounds`: see `PythonBackend`).
    """
    if isinstance(spec, torch.nn.Module):
        return TorchBackend(spec, **options)
    if isinstance(spec, LabelBackend):
        return spec
    if not isinstance(spec, (str, os.PathLike, TeacherSpec)) and (callable(spec) or hasattr(spec, "predict_labels")):
        return PythonBackend(spec, **options)
    return TeacherSpec.parse(spec, api_key).load(**options)
