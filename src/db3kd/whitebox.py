"""Teacher logits, for the standard knowledge-distillation baseline only.

This is the one module of db3kd that reads a teacher's scores. Nothing in `db3kd.oracle` or
`db3kd.teachers` imports it, and a `WhiteBoxTeacher` is not a `LabelBackend`, so label-only code cannot
be handed one by mistake.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, TeacherError

__all__ = ["WhiteBoxTeacher"]


class WhiteBoxTeacher:
    """A teacher whose logits can be read: for the standard-KD baseline (Hinton et al., 2015), not for DB3KD.

    Standard KD matches the student to the teacher's softened logits; it needs exactly what DB3KD does
    without (scores, not just the top-1 label). Use it only to measure that baseline against DB3KD.
    Never use it in label-only code: a DB3KD run must query its teacher through `LabelOracle` alone.

    Inputs follow the oracle's contract: float32 (N, C, H, W), finite, clipped to `bounds`.

    Args:
        forward: maps a float32 batch (N, C, H, W) to logits (N, K).
        input_shape: (C, H, W).
        num_classes: K.
        bounds: pixel range of the teacher.
        name: for messages.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], input_shape, num_classes: int,
                 bounds=(0.0, 1.0), name: str = "white-box teacher"):
        self._forward = forward
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.name = name

    @classmethod
    def from_file(cls, path: str | os.PathLike, threads: int | None = None,
                  device: str | torch.device | None = None) -> "WhiteBoxTeacher":
        """A `model.pt` checkpoint (PyTorch) or any ONNX classifier with one (N, K) output."""
        suffix = Path(path).suffix.lower()
        if suffix in (".pt", ".pth"):
            from .checkpoint import load_checkpoint

            module, spec = load_checkpoint(path)
            return cls.from_module(module, spec.input_shape, spec.num_classes, spec.bounds, device=device,
                                   name=f"white-box torch:{path}")
        if suffix == ".onnx":
            return cls._from_onnx(path, threads)
        raise TeacherError(f"expected a .pt checkpoint or an .onnx file, got {os.fspath(path)!r}")

    @classmethod
    def from_module(cls, module: torch.nn.Module, input_shape, num_classes: int, bounds=(0.0, 1.0),
                    device: str | torch.device | None = None, name: str | None = None) -> "WhiteBoxTeacher":
        """A PyTorch module mapping (N, C, H, W) images to (N, K) logits."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        module = module.eval().to(device)

        # no_grad rather than inference_mode: KD losses keep the teacher's logits for backward, which
        # inference tensors refuse.
        @torch.no_grad()
        def forward(x: torch.Tensor) -> torch.Tensor:
            return module(x.to(device))

        return cls(forward, input_shape, num_classes, bounds, name or f"white-box torch:{type(module).__name__}")

    @classmethod
    def _from_onnx(cls, path, threads: int | None) -> "WhiteBoxTeacher":
        # The label-only backend's loading and metadata rules (shape, classes, bounds), then its scores:
        # this module may read a model's scores, no label-only module reads them through it.
        from .teachers.onnx_backend import open_onnx

        model = open_onnx(path, threads=threads)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(model.scores(x.detach().cpu().numpy()))

        return cls(forward, model.input_shape, model.num_classes, model.bounds, f"white-box onnx:{path}")

    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Float32 logits (N, K) for a float32 batch (N, C, H, W), on x's device (CPU for NumPy input)."""
        if isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise InputError(f"expected float32 images, got dtype {x.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(x))
        elif not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor or numpy.ndarray of images, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise InputError(f"expected float32 images, got dtype {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.numel() and not torch.isfinite(x).all():
            raise InputError("images contain NaN or inf")
        scores = self._forward(x.clamp(*self.bounds))
        if scores.shape != (len(x), self.num_classes):
            raise TeacherError(f"{self.name} returned scores of shape {tuple(scores.shape)}; "
                               f"expected ({len(x)}, {self.num_classes})")
        return scores.float().to(x.device)

    def __repr__(self) -> str:
        return f"WhiteBoxTeacher({self.name!r})"


def logits_in_batches(teacher: WhiteBoxTeacher, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Teacher logits (N, K) of a whole dataset, a batch at a time (activations of 60000 images at once need GBs)."""
    return np.concatenate([teacher.logits(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)])
