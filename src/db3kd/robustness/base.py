"""What the estimators share: the oracle they may use, the result type, and the plumbing of a call.

As Foolbox's attacks: the public `__call__` validates, pairs every sample with its targets, finds the
nearest references of every class, runs the search chunk by chunk and assembles the result; subclasses write
only `_search`, on rows of a `PairRun`, asking the teacher through `PairRun.ask` (every query counted).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..data.images import ImageStore
from ..errors import BudgetExceededError, InputError
from .guide import check_guide

# Rows of the (sample, reference) distance matrix computed at once: 256 x 60000 float32 is 60 MiB.
_DISTANCE_CHUNK = 256
_CHUNK_BYTES = 64 << 20  # the images of the pairs searched at once, at most (MNIST: 4096 pairs are 13 MB)


class LabelQueries(Protocol):
    """All an estimator may know of the teacher: its input contract and top-1 labels (a `LabelOracle`)."""

    input_shape: tuple[int, int, int]
    num_classes: int
    bounds: tuple[float, float]

    def labels(self, x: torch.Tensor, ids: Any = None) -> torch.Tensor: ...


@dataclass
class RobustnessResult:
    """Boundary-distance estimates for every (sample, target class) pair of a batch.

    Attributes:
        distances: (N, K) float64; inf for the sample's own class, classes not asked for, and pairs where
            nothing labelled t was found (or never started because the budget ran out).
        queries: (N, K) int64 queries sent to the oracle for each pair (0 for `sd`).
        points: (N, K, C, H, W) float32 points, exactly as sent to the oracle and labelled t, whose distance
            to the sample is `distances`; NaN where the distance is inf. None unless asked for.
        distances_at: (len(checkpoints), N, K) best distance reached within each checkpoint's queries per
            pair (`mbd` only), else None.
        checkpoints: queries per pair at which `distances_at` was recorded.
        budget_exhausted: True when the oracle's budget stopped the run early; results so far are kept.
        refused: queries of the batch the budget refused (0 unless budget_exhausted).
        sample_distances: (N, K) distance to the nearest reference of each class (SD; inf for the own class),
            found on the way for free: the fallback of pairs a `targets` mask leaves unsearched.
    """

    distances: np.ndarray
    queries: np.ndarray
    points: np.ndarray | None = None
    distances_at: np.ndarray | None = None
    checkpoints: tuple[int, ...] = ()
    budget_exhausted: bool = False
    refused: int = 0
    sample_distances: np.ndarray | None = None


@dataclass(frozen=True)
class Pairs:
    """The (sample, target) pairs a call works on, in row-major order of the (N, K) result."""

    sample: torch.Tensor  # (P,) int64 sample index
    target: torch.Tensor  # (P,) int64 target class
    num_classes: int

    def __len__(self) -> int:
        return len(self.sample)


@dataclass(frozen=True)
class Chunk:
    """The pairs a search works on at once: absolute rows of the `PairRun`, with what it needs of them."""

    rows: torch.Tensor  # (P,) rows of the run
    x: torch.Tensor  # (P, C, H, W) the sample of each pair
    target: torch.Tensor  # (P,) target classes
    reference_x: torch.Tensor | ImageStore  # (M, C, H, W) all references (see `reference_rows`)
    index: torch.Tensor  # (P, J) candidate reference rows of class t, nearest first (-1: none)
    distance: torch.Tensor  # (P, J) their distances to x
    own: torch.Tensor | None = None  # (P, J) reference rows of the sample's own class, nearest first (-1: none)
    guide: torch.nn.Module | None = None  # a student whose adversarial direction is searched first (guide.py)


class PairRun:
    """Per-pair results of a call, filled in as queries are answered, so a stop keeps everything so far:
    `best` (P,) the smallest distance to a point labelled t, `queries` (P,), `points` (P, C, H, W) those points
    (None unless kept), `ids` (P,) the oracle id of each pair's queries."""

    def __init__(self, x: torch.Tensor, pairs: Pairs, keep_points: bool, ids: torch.Tensor):
        n = len(pairs)
        self.n_samples, self.pairs, self.ids = len(x), pairs, ids
        self.best = torch.full((n,), float("inf"), dtype=torch.float64)
        self.queries = torch.zeros(n, dtype=torch.int64)
        self.points = torch.full((n, *x.shape[1:]), float("nan")) if keep_points else None
        self.budget_exhausted, self.refused = False, 0

    def ask(self, oracle: LabelQueries, rows: torch.Tensor, points: torch.Tensor, x: torch.Tensor,
            target: torch.Tensor) -> torch.Tensor:
        """Whether the teacher labels each of `points` (one query for pair row `rows[i]`, rows may repeat) with
        its target; counts the queries and keeps each t-labelled point closer to x than its pair's best."""
        is_t = oracle.labels(points, ids=self.ids[rows]) == target
        self.queries.index_add_(0, rows, torch.ones_like(rows))
        rows, points, x = rows[is_t], points[is_t], x[is_t]
        d = (points - x).flatten(1).double().norm(dim=1)  # (R,) the difference of two float32 is exact enough
        better = d < self.best[rows]
        self.best[rows[better]] = d[better]
        if self.points is not None:
            self.points[rows[better]] = points[better]
        return is_t

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
                                budget_exhausted=self.budget_exhausted, refused=self.refused)


class Estimator:
    """Base of the boundary-distance estimators. Subclasses set `directions` (nearest references of each class
    their search needs) and `batch_pairs`, and implement `_search`; `_begin` and `_end` are hooks for per-call
    state (MBD's probe bank and checkpoints)."""

    directions: int
    batch_pairs: int = 4096
    keeps_points = False  # the search itself needs the points (MBD walks from them)

    def __call__(self, oracle: LabelQueries, x, labels, reference_x, reference_y, targets=None, *,
                 ids=None, seed: int = 0, return_points: bool = False,
                 guide: torch.nn.Module | None = None) -> RobustnessResult:
        """Distances (N, K) from each sample of `x` to each class region (inf for its own class).

        Args:
            oracle: the teacher (a `LabelOracle`).
            x: (N, C, H, W) float32 samples; `labels` (N,) their class c (the teacher's label).
            reference_x, reference_y: (M, C, H, W) reference samples and their teacher labels, the candidate
                directions (a sample is never its own direction).
            targets: the classes to estimate (default all but each sample's own): a list of classes for every
                sample, or an (N, K) boolean mask of the pairs wanted per sample.
            ids: (N,) oracle ids of the samples: each query is then sent with its sample's id (so the oracle
                counts per sample); by default with its pair's id `i * K + t`, so that on a fresh oracle
                `oracle.queries_for(i * K + t)` equals `result.queries[i, t]`.
            seed: seeds the random draws of randomised estimators (a pair's draws depend on the seed, its
                sample's pixels and its target, never on its batch).
            return_points: also return the point behind each distance.
            guide: one of our own models imitating the teacher (a student, never the teacher): BD and MBD search
                its adversarial direction toward t first (`db3kd.robustness.guide`). SD ignores it.

        If the oracle's budget runs out, the search stops there and the result (flagged
        `budget_exhausted`) keeps what was found.
        """
        xt = as_images(x, "x", oracle.input_shape)
        k = oracle.num_classes
        labels_t = as_labels(labels, len(xt), k, "labels")
        ref = reference_x if isinstance(reference_x, ImageStore) else \
            as_images(reference_x, "reference_x", oracle.input_shape)
        if tuple(ref.shape[1:]) != tuple(oracle.input_shape):
            raise InputError(f"expected reference_x of shape (N, {', '.join(map(str, oracle.input_shape))}), "
                             f"got {tuple(ref.shape)}")
        ref_y = as_labels(reference_y, len(ref), k, "reference_y")
        pairs = make_pairs(labels_t, k, targets)
        if guide is not None:
            check_guide(guide, tuple(oracle.input_shape), k)
        index, dist = nearest_by_class(xt, ref, ref_y, k, self.directions)
        if ids is None:
            pair_ids = pairs.sample * k + pairs.target
        else:
            sample_ids = torch.as_tensor(np.asarray(ids))
            if sample_ids.shape != (len(xt),) or sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
                raise InputError(f"expected ids as {len(xt)} integers (one per sample), got shape {tuple(sample_ids.shape)}")
            pair_ids = sample_ids.to(torch.int64)[pairs.sample]
        run = PairRun(xt, pairs, return_points or self.keeps_points, pair_ids)
        state = self._begin(oracle, xt, pairs, ref, seed)
        # Large images: fewer pairs at once, so that a chunk's images stay within _CHUNK_BYTES.
        batch = max(1, min(self.batch_pairs, _CHUNK_BYTES // (4 * int(np.prod(oracle.input_shape)))))
        try:
            for start in range(0, len(pairs), batch):
                rows = torch.arange(start, min(start + batch, len(pairs)))
                ps, pt = pairs.sample[rows], pairs.target[rows]
                chunk = Chunk(rows, xt[ps], pt, ref, index[ps, pt], dist[ps, pt], index[ps, labels_t[ps]], guide)
                self._search(oracle, chunk, run, state)
        except BudgetExceededError as e:
            run.budget_exhausted, run.refused = True, e.requested
        result = self._end(run, state)
        if not return_points:
            result.points = None
        result.sample_distances = dist[:, :, 0].numpy().copy()
        result.sample_distances[np.arange(len(xt)), labels_t.numpy()] = np.inf
        return result

    def _begin(self, oracle: LabelQueries, x: torch.Tensor, pairs: Pairs, reference_x: torch.Tensor,
               seed: int) -> Any:
        """Per-call state handed to every `_search` (none by default)."""
        return None

    def _search(self, oracle: LabelQueries, chunk: Chunk, run: PairRun, state: Any) -> None:
        raise NotImplementedError

    def _end(self, run: PairRun, state: Any) -> RobustnessResult:
        return run.result()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def as_images(x, name: str, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A float32 CPU tensor (N, C, H, W) from `x` (tensor or array), with a precise error otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected {name} as a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise InputError(f"expected float32 {name}, got dtype {x.dtype}")
    if x.ndim != 4:
        raise InputError(f"expected {name} of shape (N, C, H, W), got {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(f"expected {name} of shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise InputError(f"{name} contain NaN or inf")
    return x.detach().cpu().contiguous()


def as_labels(y, n: int, num_classes: int, name: str) -> torch.Tensor:
    """An int64 CPU tensor of n class indices in [0, num_classes)."""
    y = torch.as_tensor(y.detach().cpu() if isinstance(y, torch.Tensor) else np.asarray(y))
    if y.shape != (n,) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"expected {name} as {n} integers, got shape {tuple(y.shape)} dtype {y.dtype}")
    y = y.to(torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"expected {name} in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    return y


def make_pairs(labels: torch.Tensor, num_classes: int, targets) -> Pairs:
    """Every (i, t) with t != labels[i] and t in `targets`: default all classes, else a list of classes for every
    sample or an (N, K) boolean mask of the pairs wanted."""
    n = len(labels)
    if targets is None:
        wanted = torch.ones(1, num_classes, dtype=torch.bool)
    elif np.asarray(targets).dtype == bool:
        wanted = torch.as_tensor(np.asarray(targets))
        if wanted.shape != (n, num_classes):
            raise InputError(f"expected a targets mask of shape ({n}, {num_classes}), got {tuple(wanted.shape)}")
    else:
        t = np.asarray(targets).reshape(-1)
        if not np.issubdtype(t.dtype, np.integer) or (t.size and (t.min() < 0 or t.max() >= num_classes)):
            raise InputError(f"expected targets as classes in [0, {num_classes}), got {targets!r}")
        wanted = torch.zeros(1, num_classes, dtype=torch.bool)
        wanted[0, torch.from_numpy(t.astype(np.int64))] = True
    mask = wanted & (torch.arange(num_classes)[None, :] != labels[:, None])  # (N, K)
    sample, target = mask.nonzero(as_tuple=True)
    return Pairs(sample, target, num_classes)


def nearest_by_class(x: torch.Tensor, reference_x: torch.Tensor | ImageStore, reference_y: torch.Tensor,
                     num_classes: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest reference samples (L2) of every class for every sample.

    Returns:
        index: (N, K, k) int64 rows of `reference_x`, nearest first; -1 where class t has fewer than k.
        distance: (N, K, k) float64 L2 distances, inf where index is -1. References at distance 0 from
            the sample (the sample itself) are skipped: they give no direction.
    """
    if isinstance(reference_x, ImageStore):
        return _nearest_on_disk(x, reference_x, reference_y, num_classes, k)
    n = len(x)
    index = torch.full((n, num_classes, k), -1, dtype=torch.int64)
    distance = torch.full((n, num_classes, k), float("inf"), dtype=torch.float64)
    flat_x = x.reshape(n, -1)
    flat_r = reference_x.reshape(len(reference_x), -1)
    for t in range(num_classes):
        members = (reference_y == t).nonzero().flatten()
        if not len(members):
            continue
        r = flat_r[members]
        r_sq = (r * r).sum(dim=1)  # (M_t,)
        kk = min(k + 1, len(members))  # one spare in case the sample itself is a member
        for start in range(0, n, _DISTANCE_CHUNK):
            q = flat_x[start:start + _DISTANCE_CHUNK]
            # Ranking by the float32 expansion is fast; the kept distances are then recomputed exactly.
            d2 = (q * q).sum(dim=1, keepdim=True) - 2.0 * q @ r.T + r_sq[None, :]  # (n_chunk, M_t)
            _, idx = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
            rows = members[idx]  # (n_chunk, kk)
            exact = (flat_r[rows] - q[:, None, :]).norm(dim=2).double()  # (n_chunk, kk)
            exact = torch.where(exact == 0, float("inf"), exact)  # the sample itself gives no direction
            exact, order = torch.sort(exact, dim=1, stable=True)
            rows = torch.gather(rows, 1, order)[:, :k]
            exact = exact[:, :k]
            found = torch.isfinite(exact)
            index[start:start + len(q), t, : exact.shape[1]] = torch.where(found, rows, -1)
            distance[start:start + len(q), t, : exact.shape[1]] = exact
    return index, distance


def _nearest_on_disk(x: torch.Tensor, store: ImageStore, reference_y: torch.Tensor, num_classes: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_by_class` over references read a chunk at a time, each chunk's candidates merged with the best so
    far. The expansion |q|^2 - 2 q.r + |r|^2 is taken in float64, accurate enough to need no exact recomputation
    (which would read every candidate again); a distance within rounding of 0 is the sample itself."""
    n = len(x)
    best = torch.full((n, num_classes, k), float("inf"), dtype=torch.float64)
    index = torch.full((n, num_classes, k), -1, dtype=torch.int64)
    flat_x = x.reshape(n, -1).double()
    q_sq = (flat_x * flat_x).sum(dim=1, keepdim=True)
    for first, block in store.chunks():
        r = torch.from_numpy(block).reshape(len(block), -1).double()
        r_sq = (r * r).sum(dim=1)
        d2 = (q_sq - 2.0 * flat_x @ r.T + r_sq[None, :]).clamp_min(0)  # (N, R)
        d2 = torch.where(d2 <= 1e-12 * (q_sq + r_sq[None, :]), float("inf"), d2)  # the sample itself
        block_y = reference_y[first:first + len(block)]
        for t in block_y.unique().tolist():
            members = (block_y == t).nonzero().flatten()
            both = torch.cat([best[:, t], d2[:, members].sqrt()], dim=1)
            both_rows = torch.cat([index[:, t], (first + members).expand(n, -1)], dim=1)
            both, order = torch.sort(both, dim=1, stable=True)
            best[:, t], index[:, t] = both[:, :k], torch.gather(both_rows, 1, order)[:, :k]
    return torch.where(torch.isfinite(best), index, -1), best


def reference_rows(reference_x: torch.Tensor | ImageStore, rows: torch.Tensor) -> torch.Tensor:
    """The references at `rows` as a float32 tensor, from memory or from disk."""
    if isinstance(reference_x, ImageStore):
        return torch.from_numpy(reference_x[rows.numpy()])
    return reference_x[rows]


def pair_seeds(x: torch.Tensor, pairs: Pairs, seed: int) -> np.ndarray:
    """A 63-bit seed per pair from (seed, the sample's pixels, the target), not from its batch position.

    So a pair draws the same random numbers alone or inside any batch.
    """
    flat = x.reshape(len(x), -1).numpy()
    sample_keys = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in flat]
    out = np.empty(len(pairs), dtype=np.int64)
    for p, (i, t) in enumerate(zip(pairs.sample.tolist(), pairs.target.tolist())):
        h = hashlib.blake2b(sample_keys[i] + int(t).to_bytes(4, "little") + int(seed).to_bytes(8, "little", signed=True),
                            digest_size=8)
        out[p] = int.from_bytes(h.digest(), "little") >> 1
    return out


def segment_points(x: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, bounds) -> torch.Tensor:
    """x + alpha (r - x) per row, clipped to the bounds exactly as the oracle would."""
    a = alpha.to(torch.float32).view(-1, *([1] * (x.ndim - 1)))
    return (r - x).mul_(a).add_(x).clamp_(bounds[0], bounds[1])  # in place: large images make few copies
