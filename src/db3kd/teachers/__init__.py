"""Teacher backends and the spec strings that choose them.

A teacher spec is what `--teacher` takes on the command line:
- `path/to/model.pt`: a checkpoint written by `db3kd train-teacher` (PyTorch);
- `path/to/model.onnx`: any ONNX classifier (ONNX Runtime);
- `http://host:port` or `https://...`: a label service speaking the protocol of `db3kd serve`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import LabelBackend
from .onnx_backend import OnnxBackend
from .torch_backend import TorchBackend

__all__ = ["LabelBackend", "OnnxBackend", "TorchBackend", "load_teacher", "open_oracle"]


def load_teacher(spec: str | os.PathLike | torch.nn.Module | LabelBackend, **options) -> LabelBackend:
    """The backend for a teacher spec (see module docstring); options go to the backend's constructor.

    A `torch.nn.Module` needs `input_shape` and `num_classes` options; a ready backend is returned as is.
    """
    if isinstance(spec, torch.nn.Module):
        return TorchBackend(spec, **options)
    if isinstance(spec, LabelBackend):
        return spec
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        from .http_backend import HttpBackend

        return HttpBackend(text, **options)
    suffix = Path(text).suffix.lower()
    if suffix in (".pt", ".pth"):
        return TorchBackend.from_checkpoint(text, **options)
    if suffix == ".onnx":
        return OnnxBackend(text, **options)
    raise ConfigError(
        f"cannot tell what kind of teacher {text!r} is: expected a .pt checkpoint, an .onnx file "
        "or an http(s):// URL of a label service"
    )


def open_oracle(spec, budget: int | None = None, chunk_size: int | None = None, ledger=None, **options):
    """A `LabelOracle` over the teacher `spec` (see `load_teacher`); `ledger`: a shared budget (`QueryLedger`)."""
    from ..oracle import LabelOracle

    return LabelOracle(load_teacher(spec, **options), budget=budget, chunk_size=chunk_size, ledger=ledger)
