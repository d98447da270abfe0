"""Teacher backends and the spec strings that choose them (`TeacherSpec`).

A teacher spec is what `--teacher` takes on the command line:
- `path/to/model.pt`: a checkpoint written by `db3kd train-teacher` (PyTorch);
- `path/to/model.onnx`: any ONNX classifier (ONNX Runtime);
- `http://host:port` or `https://...`: a label service speaking the protocol of `db3kd serve`.

Backends answer labels only; `db3kd.oracle.LabelOracle` (which imports this package, never the other way
round) is the one door through which db3kd queries them.
"""

from __future__ import annotations

import os

import torch

from .base import LabelBackend
from .onnx_backend import OnnxBackend
from .spec import TeacherSpec
from .torch_backend import TorchBackend

__all__ = ["LabelBackend", "OnnxBackend", "TeacherSpec", "TorchBackend", "load_teacher"]


def load_teacher(spec: str | os.PathLike | TeacherSpec | torch.nn.Module | LabelBackend, api_key: str | None = None,
                 **options) -> LabelBackend:
    """The backend for a teacher spec (see `TeacherSpec`); options go to the backend's constructor.

    A `torch.nn.Module` needs `input_shape` and `num_classes` options; a ready backend is returned as is.
    """
    if isinstance(spec, torch.nn.Module):
        return TorchBackend(spec, **options)
    if isinstance(spec, LabelBackend):
        return spec
    return TeacherSpec.parse(spec, api_key).load(**options)
