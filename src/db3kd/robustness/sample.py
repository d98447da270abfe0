"""SD: the distance to the nearest reference samples of each other class. Costs no queries."""

from __future__ import annotations

from ..checks import integer
from .base import Chunk, Estimator, LabelQueries, PairRun


class SampleDistance(Estimator):
    """Sample distance (DB3KD's `SD`): mean L2 distance from x to its k nearest reference samples of class t.

    k=1 (the default) is the distance to the single nearest sample of class t, the cheapest and tightest
    of these upper-bound-like proxies; a larger k averages out outliers among the references. Reference
    labels are taken as given: pass the teacher's labels so that "class t" means what the teacher says.
    The oracle is asked nothing (its input contract only); classes with fewer than k references get inf.

    Args:
        k: how many nearest class-t references to average.
    """

    def __init__(self, k: int = 1):
        self.k = integer(k, "k", 1)

    @property
    def directions(self) -> int:
        return self.k

    def _search(self, oracle: LabelQueries, chunk: Chunk, run: PairRun, state=None) -> None:
        run.best[chunk.rows] = chunk.distance.mean(dim=1)  # inf whenever fewer than k were found
