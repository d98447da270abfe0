"""Soft labels from boundary distances (DB3KD, Wang 2021, section "soft labels from sample robustness")."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def distances_to_logits(distances, labels) -> np.ndarray:
    """Teacher-like logits (N, K) from the boundary distances (N, K) of each sample to each class.

    DB3KD's construction: a class whose boundary is close is a class the teacher nearly confuses the
    sample with, so it gets a large logit:

        z_t = 1 / d_t                      for t != c (the sample's label)
        z_c = sum_{t != c} z_t             (the true class always dominates)

    Student training then softens z with the KD temperature as usual (softmax(z / T)); that temperature
    belongs to the loss, not here.

    Args:
        distances: (N, K) non-negative distances; inf (no boundary found, or class not estimated) gives
            logit 0, as 1/inf. The entries at the own class are ignored.
        labels: (N,) the class c of each sample.

    Raises:
        InputError: wrong shapes, NaN, or a zero or negative distance off the own class. A zero distance
            means the sample itself is labelled t: its label c is wrong, and no finite logit is honest, so
            it is refused rather than clamped to an arbitrary epsilon.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise InputError(f"expected distances of shape (N, K), got {d.shape}")
    n, k = d.shape
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= k)):
        raise InputError(f"expected labels as {n} integers in [0, {k}), got shape {y.shape} dtype {y.dtype}")
    own = np.zeros((n, k), dtype=bool)
    own[np.arange(n), y] = True
    others = np.where(own, np.inf, d)
    if np.isnan(others).any():
        raise InputError("distances contain NaN")
    bad = others <= 0
    if bad.any():
        i, t = map(int, np.argwhere(bad)[0])
        raise InputError(f"distance {others[i, t]} of sample {i} to class {t} is not positive; expected "
                         "distances > 0 off the own class (0 means the sample's label is not its teacher label)")
    logits = 1.0 / others  # 0 where inf, including the own class for now
    logits[own] = logits.sum(axis=1)
    return logits
