"""What every teacher backend provides: its input contract and labels for a batch."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class LabelBackend(Protocol):
    """A teacher that answers top-1 labels and nothing else.

    Backends are only ever called by `LabelOracle`, which validates inputs, clips them to `bounds`,
    splits batches into chunks of at most `preferred_batch` and counts every image. A backend may also have an
    `identity` (what tells this teacher from another: a file's digest, a service's URL and contract), which
    run directories record; else its `name` stands for it.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    bounds: tuple[float, float]
    preferred_batch: int

    def predict_labels(self, x: torch.Tensor) -> np.ndarray | torch.Tensor:
        """Top-1 class for each image of a valid float32 batch (N, C, H, W)."""
        ...
