"""BD: binary searches toward reference samples of the target class, the nearest first, with pruning."""

from __future__ import annotations

import torch

from ..checks import integer, number
from .base import Chunk, Estimator, LabelQueries, PairRun, reference_rows, segment_points


class BoundaryDistance(Estimator):
    """Boundary distance (DB3KD's `BD`): an upper bound of the L2 distance from x to the teacher's class-t region.

    For each (sample x, target t) pair, the `max_directions` reference samples of class t nearest to x
    (ranked by L2 distance, which costs no queries) are tried in that order. Along the segment x -> r a
    bisection finds a point labelled t; its distance to x is the pair's estimate, improved direction by
    direction. Before searching a new direction, ONE query at the current best distance along it
    (times 1 - tolerance) prunes it: if that point is not labelled t, the direction cannot improve the
    estimate beyond the tolerance and is skipped. Bisection stops at a relative tolerance of the distance,
    which is where the reference implementation's 1e-5 absolute tolerance spends most of its queries.

    All pairs run in lockstep rounds of one query each, with a per-pair active mask, so pairs that are done
    stop spending. The search is deterministic: a pair gets the same result alone or in any batch (up to
    exact float32 ties when ranking its references, which could pick a different but equally near one).

    Reference labels are taken as given; pass the teacher's labels of the references, so that every
    class-t direction ends in a point the teacher labels t. A reference endpoint is queried before being
    used as a result, so a wrong reference label costs a query but never yields a false distance.

    Args:
        max_directions: how many nearest class-t references to try per pair.
        tolerance: bisection stops when the bracket is within this fraction of the distance.
        queries_per_pair: queries per pair at most.
        batch_pairs: pairs searched at once; bounds memory (about 10 KiB per pair for MNIST).
    """

    def __init__(self, max_directions: int = 32, tolerance: float = 0.02, queries_per_pair: int = 40,
                 batch_pairs: int = 4096):
        self.max_directions = integer(max_directions, "max_directions", 1)
        self.tolerance = number(tolerance, "tolerance", 0, 1, closed="none")
        self.queries_per_pair = integer(queries_per_pair, "queries_per_pair", 1)
        self.batch_pairs = integer(batch_pairs, "batch_pairs", 1)

    @property
    def directions(self) -> int:
        return self.max_directions

    def _search(self, oracle: LabelQueries, chunk: Chunk, run: PairRun, state=None) -> None:
        self.search(oracle, chunk, run)

    def search(self, oracle: LabelQueries, chunk: Chunk, run: PairRun, queries_per_pair: int | None = None) -> None:
        """Bisect toward the candidate references of each pair; the run keeps the best found as it goes.

        `queries_per_pair` lowers this estimator's own cap (MBD starts from a BD within its own budget).
        """
        tol = self.tolerance
        cap = self.queries_per_pair if queries_per_pair is None else min(queries_per_pair, self.queries_per_pair)
        rows, x, target, index, distance = chunk.rows, chunk.x, chunk.target, chunk.index, chunk.distance
        p = len(x)
        num_dirs = (index >= 0).sum(dim=1)  # (P,)
        ptr = torch.zeros(p, dtype=torch.int64)  # current direction of each pair
        lo = torch.zeros(p, dtype=torch.float64)  # fractions of the way from x to the reference
        hi = torch.ones(p, dtype=torch.float64)
        verified = torch.zeros(p, dtype=torch.bool)  # was the point at `hi` labelled t by the oracle?
        for _ in range(cap):  # each round spends at most one query per pair
            active = (ptr < num_dirs) & (run.queries[rows] < cap)
            a = active.nonzero().flatten()
            if not len(a):
                break
            converged = hi[a] - lo[a] <= tol * hi[a]
            # An unverified upper end is checked first when it is a pruning point (hi < 1) or when the
            # bisection has closed in on the reference itself; otherwise bisect.
            at_hi = ~verified[a] & ((hi[a] < 1) | converged)
            alpha = torch.where(at_hi, hi[a], 0.5 * (lo[a] + hi[a]))
            xa = x[a]
            points = segment_points(xa, reference_rows(chunk.reference_x, index[a, ptr[a]]), alpha, oracle.bounds)
            is_t = run.ask(oracle, rows[a], points, xa, target[a])
            # Bracket updates: a t-labelled point becomes the new (verified) upper end, else the lower end.
            hi[a] = torch.where(is_t, alpha, hi[a])
            lo[a] = torch.where(~is_t & ~at_hi, alpha, lo[a])
            verified[a] = verified[a] | is_t
            # Done with this direction: pruned, or bracketed to tolerance with a verified upper end.
            done = (at_hi & ~is_t) | (verified[a] & (hi[a] - lo[a] <= tol * hi[a]))
            moving = a[done]
            ptr[moving] += 1
            nxt = ptr[moving].clamp_max(index.shape[1] - 1)
            # The next direction starts at the best distance so far: it is searched only if it beats it.
            hi[moving] = (run.best[rows[moving]] * (1 - tol) / distance[moving, nxt]).clamp(max=1.0)
            lo[moving] = 0.0
            verified[moving] = False
