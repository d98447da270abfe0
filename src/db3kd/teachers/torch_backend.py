"""A PyTorch module as a label-only teacher."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class TorchBackend:
    """Labels from a PyTorch module; runs on CUDA when available.

    Args:
        module: maps (N, C, H, W) images to (N, K) scores.
        input_shape: (C, H, W) the module expects.
        num_classes: K.
        bounds: pixel range the module was trained on.
        device: where to run; default CUDA if present, else CPU.
        preferred_batch: chunk size the oracle uses for this backend.
    """

    def __init__(self, module: torch.nn.Module, input_shape, num_classes: int, bounds=(0.0, 1.0),
                 device: str | torch.device | None = None, preferred_batch: int = 512, name: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels-last roughly doubles CPU convolution throughput for small conv nets.
        self._module = module.eval().to(self.device, memory_format=torch.channels_last)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.preferred_batch = int(preferred_batch)
        self.name = name or f"torch:{type(module).__name__}"
        self.identity = self.name  # a checkpoint's is its content (from_checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device=None, **kwargs) -> "TorchBackend":
        """Load a `model.pt` written by `db3kd train-teacher`."""
        from ..checkpoint import load_checkpoint

        from ..data.download import file_digest

        module, spec = load_checkpoint(path)
        backend = cls(module, spec.input_shape, spec.num_classes, spec.bounds, device=device, name=f"torch:{path}", **kwargs)
        backend.identity = "sha256:" + file_digest(Path(path))
        return backend

    @torch.inference_mode()
    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self._module(x).argmax(dim=1)
