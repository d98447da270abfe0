"""Spatial-size arithmetic shared by the model families, so size errors are caught before building."""

from __future__ import annotations

from collections.abc import Sequence

from db3kd.errors import ConfigError

# (kernel, stride, padding) of one convolution or pooling window, applied to one spatial dimension.
Window = tuple[int, int, int]

_MAX_SEARCHED_SIZE = 4096  # far above any image these small networks are meant for


def output_size(size: int, windows: Sequence[Window]) -> int:
    """Spatial size after `windows` in order (floor mode, as PyTorch); 0 if some step leaves no pixel."""
    for kernel, stride, padding in windows:
        size = (size + 2 * padding - kernel) // stride + 1
        if size < 1:
            return 0
    return size


def min_input_size(windows: Sequence[Window]) -> int:
    """Smallest input size that leaves at least one pixel after `windows`."""
    for size in range(1, _MAX_SEARCHED_SIZE + 1):
        if output_size(size, windows) >= 1:
            return size
    raise ConfigError(f"no input size up to {_MAX_SEARCHED_SIZE} fits the layers {list(windows)}")


def require_fits(model: str, height: int, width: int, windows: Sequence[Window]) -> tuple[int, int]:
    """Output (height, width) after `windows`; ConfigError naming the minimum size if the image is too small."""
    out_h, out_w = output_size(height, windows), output_size(width, windows)
    if out_h < 1 or out_w < 1:
        smallest = min_input_size(windows)
        raise ConfigError(
            f"{model}: expected images of at least {smallest}x{smallest} pixels, got {height}x{width}"
        )
    return out_h, out_w
