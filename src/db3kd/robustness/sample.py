"""SD: the distance to the nearest reference samples of each other class. Costs no queries."""

from __future__ import annotations

import numpy as np
import torch

from ._common import RobustnessResult, as_images, as_labels, make_pairs, nearest_by_class, positive_int


class SampleDistance:
    """Sample distance (DB3KD's `SD`): mean L2 distance from x to its k nearest reference samples of class t.

    k=1 (the default) is the distance to the single nearest sample of class t, the cheapest and tightest
    of these upper-bound-like proxies; a larger k averages out outliers among the references. Reference
    labels are taken as given: pass the teacher's labels so that "class t" means what the teacher says.

    Args:
        k: how many nearest class-t references to average.
    """

    def __init__(self, k: int = 1):
        self.k = positive_int(k, "k")

    def __call__(self, x, labels, reference_x, reference_y, num_classes: int, targets=None) -> RobustnessResult:
        """Distances (N, K) for a batch; the own class and classes with fewer than k references get inf."""
        num_classes = positive_int(num_classes, "num_classes")
        xt = as_images(x, "x")
        labels_t = as_labels(labels, len(xt), num_classes, "labels")
        ref = as_images(reference_x, "reference_x", tuple(xt.shape[1:]))
        ref_y = as_labels(reference_y, len(ref), num_classes, "reference_y")
        pairs = make_pairs(labels_t, num_classes, targets)
        _, dist = nearest_by_class(xt, ref, ref_y, num_classes, self.k)  # (N, K, k)
        mean = dist.mean(dim=2)  # inf whenever fewer than k were found
        distances = np.full((len(xt), num_classes), np.inf)
        distances[pairs.sample.numpy(), pairs.target.numpy()] = mean[pairs.sample, pairs.target].numpy()
        return RobustnessResult(distances, np.zeros((len(xt), num_classes), dtype=np.int64))

    def __repr__(self) -> str:
        return f"SampleDistance(k={self.k})"
