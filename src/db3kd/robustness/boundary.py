"""BD: binary searches toward reference samples of the target class, the nearest first, with pruning."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BudgetExceededError
from ._common import (
    Pairs, RobustnessResult, as_images, as_labels, fraction, make_pairs, nearest_by_class, positive_int,
)


class BoundaryDistance:
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
        max_queries: queries per pair at most.
        batch_pairs: pairs searched at once; bounds memory (about 10 KiB per pair for MNIST).
    """

    def __init__(self, max_directions: int = 32, tolerance: float = 0.02, max_queries: int = 40,
                 batch_pairs: int = 4096):
        self.max_directions = positive_int(max_directions, "max_directions")
        self.tolerance = fraction(tolerance, "tolerance")
        self.max_queries = positive_int(max_queries, "max_queries")
        self.batch_pairs = positive_int(batch_pairs, "batch_pairs")

    def __repr__(self) -> str:
        return (f"BoundaryDistance(max_directions={self.max_directions}, tolerance={self.tolerance}, "
                f"max_queries={self.max_queries})")

    def __call__(self, oracle, x, labels, reference_x, reference_y, targets=None,
                 return_points: bool = False) -> RobustnessResult:
        """Distances (N, K) for a batch, with queries counted per pair.

        Queries are sent with oracle id `i * K + t` for pair (i, t), so on a fresh oracle
        `oracle.queries_for(i * K + t)` equals `result.queries[i, t]`. If the oracle's budget runs out,
        the search stops there and the result (flagged `budget_exhausted`) keeps what was found.
        """
        xt, pairs, ref, index, dist = prepare(oracle, x, labels, reference_x, reference_y, targets,
                                              self.max_directions)
        run = PairRun(xt, pairs, return_points)
        try:
            for start in range(0, len(pairs), self.batch_pairs):
                chunk = slice(start, start + self.batch_pairs)
                ps, pt = pairs.sample[chunk], pairs.target[chunk]
                self.search(oracle, xt[ps], pt, ref, index[ps, pt], dist[ps, pt], run.view(chunk))
        except BudgetExceededError:
            run.budget_exhausted = True
        return run.result()

    def search(self, oracle, x: torch.Tensor, target: torch.Tensor, reference_x: torch.Tensor,
               index: torch.Tensor, distance: torch.Tensor, out: "PairView") -> None:
        """Bisect toward the candidate references of each pair; writes the best found into `out` as it goes.

        Args:
            x: (P, C, H, W) the sample of each pair.
            target: (P,) target classes.
            index, distance: (P, J) candidate reference rows (-1 for none) and their distances to x.
            out: where the best distance, point and query count of each pair go.
        """
        tol = self.tolerance
        p = len(x)
        num_dirs = (index >= 0).sum(dim=1)  # (P,)
        ptr = torch.zeros(p, dtype=torch.int64)  # current direction of each pair
        lo = torch.zeros(p, dtype=torch.float64)  # fractions of the way from x to the reference
        hi = torch.ones(p, dtype=torch.float64)
        verified = torch.zeros(p, dtype=torch.bool)  # was the point at `hi` labelled t by the oracle?
        for _ in range(self.max_queries):  # each round spends at most one query per pair
            active = (ptr < num_dirs) & (out.queries < self.max_queries)
            a = active.nonzero().flatten()
            if not len(a):
                break
            converged = hi[a] - lo[a] <= tol * hi[a]
            # An unverified upper end is checked first when it is a pruning point (hi < 1) or when the
            # bisection has closed in on the reference itself; otherwise bisect.
            at_hi = ~verified[a] & ((hi[a] < 1) | converged)
            alpha = torch.where(at_hi, hi[a], 0.5 * (lo[a] + hi[a]))
            xa = x[a]
            points = segment_points(xa, reference_x[index[a, ptr[a]]], alpha, oracle.bounds)
            is_t = oracle.labels(points, ids=out.ids[a]) == target[a]
            out.queries[a] += 1
            out.offer(a, points, xa, is_t)
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
            hi[moving] = (out.best[moving] * (1 - tol) / distance[moving, nxt]).clamp(max=1.0)
            lo[moving] = 0.0
            verified[moving] = False


def segment_points(x: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, bounds) -> torch.Tensor:
    """x + alpha (r - x) per row, clipped to the bounds exactly as the oracle would."""
    a = alpha.to(torch.float32).view(-1, *([1] * (x.ndim - 1)))
    return torch.clamp(x + a * (r - x), bounds[0], bounds[1])


def prepare(oracle, x, labels, reference_x, reference_y, targets, k: int):
    """Validated inputs, the pairs to search, and the k nearest references of every class per sample."""
    xt = as_images(x, "x", oracle.input_shape)
    num_classes = oracle.num_classes
    labels_t = as_labels(labels, len(xt), num_classes, "labels")
    ref = as_images(reference_x, "reference_x", oracle.input_shape)
    ref_y = as_labels(reference_y, len(ref), num_classes, "reference_y")
    pairs = make_pairs(labels_t, num_classes, targets)
    index, dist = nearest_by_class(xt, ref, ref_y, num_classes, k)
    return xt, pairs, ref, index, dist


class PairRun:
    """Per-pair results of a run, filled in as queries are answered so a stop keeps everything so far."""

    def __init__(self, x: torch.Tensor, pairs: Pairs, return_points: bool):
        n = len(pairs)
        self.n_samples, self.pairs = len(x), pairs
        self.ids = torch.from_numpy(pairs.flat)
        self.best = torch.full((n,), float("inf"), dtype=torch.float64)
        self.queries = torch.zeros(n, dtype=torch.int64)
        self.points = torch.full((n, *x.shape[1:]), float("nan")) if return_points else None
        self.budget_exhausted = False

    def view(self, chunk: slice) -> "PairView":
        return PairView(self, chunk)

    def result(self, checkpoints: tuple[int, ...] = ()) -> RobustnessResult:
        k = self.pairs.num_classes
        distances = np.full((self.n_samples, k), np.inf)
        queries = np.zeros((self.n_samples, k), dtype=np.int64)
        s, t = self.pairs.sample.numpy(), self.pairs.target.numpy()
        distances[s, t] = self.best.numpy()
        queries[s, t] = self.queries.numpy()
        points = None
        if self.points is not None:
            points = np.full((self.n_samples, k, *self.points.shape[1:]), np.nan, dtype=np.float32)
            points[s, t] = self.points.numpy()
        return RobustnessResult(distances, queries, points, checkpoints=checkpoints,
                                budget_exhausted=self.budget_exhausted)


class PairView:
    """A chunk of a `PairRun`: tensors that write through to the run's storage."""

    def __init__(self, run: PairRun, chunk: slice):
        self.ids = run.ids[chunk]
        self.best = run.best[chunk]  # views: in-place updates land in the run
        self.queries = run.queries[chunk]
        self.points = None if run.points is None else run.points[chunk]

    def offer(self, rows: torch.Tensor, points: torch.Tensor, x: torch.Tensor, is_t: torch.Tensor) -> None:
        """Keep each t-labelled point that is closer to its sample than the pair's best so far."""
        rows, points, x = rows[is_t], points[is_t], x[is_t]
        d = (points - x).flatten(1).double().norm(dim=1)  # (R,) the difference of two float32 is exact enough
        better = d < self.best[rows]
        self.best[rows[better]] = d[better]
        if self.points is not None:
            self.points[rows[better]] = points[better]
