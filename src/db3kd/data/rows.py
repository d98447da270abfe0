"""Image sets indexed like arrays but built when indexed: millions of teacher-labelled mixtures train a student
without ever being in memory at once.

A `LazyRows` is an (N, C, H, W) float32 array-like: `len`, `shape`, indexing by an int, a slice or an array (or
tensor) of rows gives a float32 array, `chunks()` iterates over it, and `np.asarray` builds it whole (in chunks).
Its `lazy` attribute tells `db3kd.training` to index it a batch at a time instead of reading it whole; the
oracle labels it chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_CHUNK_ROWS = 10_000  # rows built at once by np.asarray


def row_indices(key, n: int) -> np.ndarray:
    """The int64 rows that `key` (an int, a slice, an array or tensor of ints) selects of `n` rows; IndexError
    if any is out of range."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n), dtype=np.int64)
    if isinstance(key, tuple):
        raise IndexError("expected rows (an int, a slice or an array of ints), not a tuple: index the rows first")
    rows = np.asarray(key.numpy() if hasattr(key, "numpy") else key)
    if rows.size == 0:
        rows = rows.astype(np.int64)  # [] is float64 to NumPy
    if rows.dtype.kind not in "iu":
        raise IndexError(f"expected integer rows, got {rows.dtype}")
    rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"rows out of range for {n} images")
    return rows


class LazyRows:
    """Base of array-likes whose rows are built on demand; subclasses give `shape` and `rows(indices)`."""

    lazy = True
    dtype = np.dtype(np.float32)
    shape: tuple[int, ...]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """float32 images of the (1-D, in-range) `indices`, in their order."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        indices = row_indices(key, len(self))
        return self.rows(indices.reshape(-1)).reshape(*indices.shape, *self.shape[1:])

    def chunks(self, size: int = _CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 images) over the whole set, `size` rows at a time."""
        for first in range(0, len(self), size):
            yield first, self.rows(np.arange(first, min(first + size, len(self))))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("images built on demand cannot be viewed without a copy")
        out = np.empty(self.shape, dtype=np.float32)
        for first, chunk in self.chunks():  # chunked: no second full-size copy
            out[first:first + len(chunk)] = chunk
        return out if dtype is None else out.astype(dtype, copy=False)


class RowStack(LazyRows):
    """Image sets stacked along their rows without copying them (e.g. real images, then `MixtureImages`)."""

    def __init__(self, parts: Sequence):
        flat = [q for p in parts for q in (p.parts if isinstance(p, RowStack) else [p])]
        shapes = {tuple(p.shape[1:]) for p in flat}
        if len(shapes) != 1:
            raise ValueError(f"expected image sets of one shape to stack, got {sorted(shapes)}")
        self.parts = flat
        self.starts = np.cumsum([0] + [len(p) for p in flat])
        self.shape = (int(self.starts[-1]), *shapes.pop())

    def rows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.float32)
        part = np.searchsorted(self.starts, indices, side="right") - 1
        for p in np.unique(part):
            mask = part == p
            out[mask] = self.parts[p][indices[mask] - self.starts[p]]
        return out
