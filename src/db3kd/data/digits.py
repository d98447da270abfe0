"""scikit-learn's bundled 8x8 digits (1797 images): no download, a fixed stratified 80/20 split."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

TEST_FRACTION = 0.2
SEED = 0  # fixed: every run on every machine gets the same split
_MAX_VALUE = 16  # pixels are counts 0..16 of set pixels in 4x4 blocks of the original 32x32 bitmap


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return x (N, 1, 8, 8) float32 in [0, 1] and y (N,) int64 of `split` ('train' or 'test')."""
    images, target = _raw()
    indices = _split_indices()[split]
    x = np.empty((len(indices), 1, 8, 8), dtype=np.float32)
    np.divide(images[indices, None], _MAX_VALUE, out=x)
    return x, target[indices].astype(np.int64)


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: importing scikit-learn takes about a second

    digits = load_digits()
    return digits.images, digits.target


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Indices of each split, in the original order; the same fraction of every class goes to test."""
    _, target = _raw()
    rng = np.random.default_rng(SEED)
    test = []
    for label in np.unique(target):
        members = np.flatnonzero(target == label)
        test.append(rng.permutation(members)[: round(len(members) * TEST_FRACTION)])
    test_indices = np.sort(np.concatenate(test))
    return {"train": np.setdiff1d(np.arange(len(target)), test_indices), "test": test_indices}
