"""MBD: shrink the BD estimate with zeroth-order steps along the teacher's boundary (HopSkipJump-style)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import ImageStore
from ..errors import ConfigError
from ..checks import integer, number
from .base import (
    Chunk, Estimator, LabelQueries, PairRun, Pairs, RobustnessResult, pair_seeds,
    segment_points,
)
from .boundary import BoundaryDistance

# Random probe directions shared by all pairs; each pair walks the bank from its own offset, wrapping
# around only beyond ~4096 probes per pair (budgets above ~4000 queries).
_BANK_SIZE = 4096
_FIRST_GUESS = 0.85  # first bisection point, as a fraction of the previous distance
_MAX_PCA_DIMENSIONS = 8192  # a (D, D) float64 covariance of 0.5 GB
_MIN_PROBES = 8  # the last iteration of a pair may use fewer probes, down to this many
_BISECT_ROOM = 4  # queries an iteration keeps for its step check and bisection
_PROBE_BYTES = 64 << 20  # the probe images of the pairs estimating their normals at once, at most


class MinimalBoundaryDistance(Estimator):
    """Minimal boundary distance (DB3KD's `MBD`): BD, then walk the best BD point along the boundary toward x.

    The walk starts from the best point of `bd` (by default BoundaryDistance(): 20 queries per pair). Each
    iteration i = 0, 1, ..., at the current boundary point p (labelled t, at distance d from x):
    1. probe `probes` * sqrt(i + 1) random directions u (HopSkipJump's schedule; `probes` each with
       probe_growth=False), one query each at clip(p + delta d u); the labels give the sign of the boundary's
       normal along each probe, and their baseline-corrected sum estimates the normal (HopSkipJump's
       estimator). With `momentum` m > 0 the unit estimate n_i is g_i + m n_{i-1}, normalised: the point moves
       little between iterations, so the previous probes still say much about the normal. On the MNIST
       benchmark's 900 all-targets pairs at 500 queries, m = 0.5 took the median from 2.96 to 2.88 with 32
       fixed probes, and 48 growing probes (fewer, better-aimed steps) to 2.78; fixed 16, 24 or 32 probes,
       or a tolerance of 0.01 or 0.0025, did worse. An iteration that would not have room for all its
       probes uses as many as are left (at least 8), so the budget is spent. Probes are drawn in a low-dimensional subspace, where a few dozen probes
       say much more: by default the leading `components` principal directions of the references (free:
       no queries; whitened, on MNIST better than a 10x10 grid, itself better than 7x7, 14x14 or pixels);
       an int draws them on a `subspace` x `subspace` grid upsampled bilinearly; None uses raw pixels.
       Probes are made orthogonal to p - x (a radial move only rescales p - x, which step 3 does anyway;
       on the MNIST benchmark this alone lowered the 0 -> 1 median at 500 queries by about 3%).
       The probes used for the estimate are the clipped differences actually sent, so directions that
       leave the box [lo, hi] count only for what is left;
    2. step from p along the normal into the class-t side by eps = step * d, halving eps (at most
       `max_halvings` times) until the point is labelled t; per pair, `step` grows 1.5x after a success
       (to at most 1) and keeps its halvings after a failure;
    3. bisect on the segment from x to that point to relative `tolerance` (first query at 85% of the
       previous distance, where the boundary usually is just beyond), giving the next p.
    The best point labelled t ever seen is kept, so the distance never grows.

    BD's queries count toward `queries_per_pair`. Distances at each of `checkpoints` (queries per pair) are recorded
    in the same run. Each pair's random probes come from (the call's seed, its sample's pixels, its target), so a pair
    gets the same result alone or inside any batch. The principal directions come from `reference_x`, so
    they change with the reference set (training images, or pseudo samples later).

    Args:
        queries_per_pair: queries per pair at most, BD included.
        checkpoints: queries per pair at which to record the best distance so far (each <= queries_per_pair).
        probes: probes of the first normal estimate (of every one with probe_growth=False).
        subspace: "pca", the side of a probe grid upsampled bilinearly to the image, or None (pixels).
        components: principal directions used with "pca" (fewer if the references span fewer).
        delta: probe radius as a fraction of d.
        step: initial step as a fraction of d.
        tolerance: relative bisection tolerance.
        max_halvings: most step halvings per iteration.
        bd: the BoundaryDistance that gives the start point (default settings if None).
        batch_pairs: pairs worked on at once; bounds memory.
        momentum: weight of the previous normal estimate in the next (0: none).
        probe_growth: grow the probes per estimate as sqrt(iteration + 1).
    """

    keeps_points = True  # the walk starts from the BD points

    def __init__(self, queries_per_pair: int = 500, checkpoints=(250, 500), probes: int = 48,
                 subspace: str | int | None = "pca", components: int = 70, delta: float = 0.1, step: float = 0.3,
                 tolerance: float = 0.005, max_halvings: int = 6, bd: BoundaryDistance | None = None,
                 batch_pairs: int = 1024, momentum: float = 0.5, probe_growth: bool = True):
        self.queries_per_pair = integer(queries_per_pair, "queries_per_pair", 1)
        self.checkpoints = tuple(integer(c, "each checkpoint", 1) for c in checkpoints)
        if (any(c > self.queries_per_pair for c in self.checkpoints)
                or list(self.checkpoints) != sorted(set(self.checkpoints))):
            raise ConfigError(f"checkpoints must be increasing and <= queries_per_pair {self.queries_per_pair}, "
                              f"got {checkpoints!r}")
        self.probes = integer(probes, "probes", 1)
        if subspace is not None and subspace != "pca":
            subspace = integer(subspace, "subspace (a grid side, 'pca' or None)", 1)
        self.subspace = subspace
        self.components = integer(components, "components", 1)
        self.delta = number(delta, "delta", 0, 1, closed="none")
        self.step = number(step, "step", 0, 1)
        self.tolerance = number(tolerance, "tolerance", 0, 1, closed="none")
        self.max_halvings = integer(max_halvings, "max_halvings", 1)
        self.bd = BoundaryDistance() if bd is None else bd
        if not isinstance(self.bd, BoundaryDistance):
            raise ConfigError(f"bd must be a BoundaryDistance, got {type(self.bd).__name__}")
        self.batch_pairs = integer(batch_pairs, "batch_pairs", 1)
        self.momentum = number(momentum, "momentum", 0, closed="low")
        self.probe_growth = bool(probe_growth)
        self._bank_cache: tuple = (None, None)  # (key, bank): a grid or pixel bank does not depend on the references

    @property
    def directions(self) -> int:
        return self.bd.max_directions

    def _begin(self, oracle: LabelQueries, x: torch.Tensor, pairs: Pairs, reference_x: torch.Tensor, seed: int):
        at = torch.full((len(self.checkpoints), len(pairs)), float("inf"), dtype=torch.float64)
        offsets = torch.from_numpy(pair_seeds(x, pairs, seed) % _BANK_SIZE)
        return at, offsets, self.probe_bank(oracle.input_shape, reference_x, seed)

    def _search(self, oracle: LabelQueries, chunk: Chunk, run: PairRun, state) -> None:
        at, offsets, bank = state
        self.bd.search(oracle, chunk, run, self.queries_per_pair)
        self._record(at, run, chunk.rows)
        self._walk(oracle, chunk, run, at, bank, offsets[chunk.rows])

    def _end(self, run: PairRun, state) -> RobustnessResult:
        at, _, _ = state
        if run.budget_exhausted:  # pairs stopped mid-iteration: their latest best counts for every checkpoint left
            self._record(at, run, torch.arange(len(run.best)))
        result = run.result(checkpoints=self.checkpoints)
        s, t = run.pairs.sample.numpy(), run.pairs.target.numpy()
        result.distances_at = np.full((len(self.checkpoints), *result.distances.shape), np.inf)
        result.distances_at[:, s, t] = at.numpy()
        return result

    def probe_bank(self, input_shape, reference_x: torch.Tensor, seed: int) -> torch.Tensor:
        """(_BANK_SIZE, C, H, W) unit-norm random directions in the chosen subspace (made once per seed on a
        grid or in pixels; from the references' principal directions with "pca")."""
        key = (tuple(input_shape), seed)
        if self.subspace != "pca" and self._bank_cache[0] == key:
            return self._bank_cache[1]
        c, h, w = input_shape
        gen = torch.Generator().manual_seed(seed)
        if self.subspace is None:
            bank = torch.randn((_BANK_SIZE, c, h, w), generator=gen)
        elif self.subspace == "pca":
            basis = principal_components(reference_x, self.components)  # (k, C*H*W)
            # Whitened: every component gets the same variance (better than eigenvalue-weighted on MNIST).
            z = torch.randn((_BANK_SIZE, len(basis)), generator=gen, dtype=torch.float64)
            bank = (z @ basis).to(torch.float32).view(_BANK_SIZE, c, h, w)
        else:
            small = torch.randn((_BANK_SIZE, c, self.subspace, self.subspace), generator=gen)
            bank = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        bank = bank / bank.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        self._bank_cache = (key, bank)
        return bank

    def _record(self, at: torch.Tensor, run: PairRun, rows: torch.Tensor) -> None:
        """Best distance so far for each checkpoint the pairs `rows` have not passed yet."""
        for c, checkpoint in enumerate(self.checkpoints):
            within = rows[run.queries[rows] <= checkpoint]
            at[c, within] = run.best[within]

    def _walk(self, oracle, chunk: Chunk, run: PairRun, at, bank, offsets) -> None:
        """HopSkipJump-style iterations from each pair's best BD point until its queries are spent."""
        rows = chunk.rows
        step = torch.full((len(rows),), self.step, dtype=torch.float64)
        previous = torch.zeros_like(chunk.x)  # each pair's last normal estimate (momentum)
        # Each iteration spends at least _MIN_PROBES + 1 queries per active pair, which bounds the loop.
        drawn_so_far = 0  # bank rows each pair has used so far (its offset aside)
        for iteration in range(self.queries_per_pair // (min(self.probes, _MIN_PROBES) + 1) + 1):
            probes = self.probes_at(iteration)
            # Needs room for the probes (fewer in the last iteration, never below _MIN_PROBES), one step
            # check and a few bisection queries.
            room = self.queries_per_pair - run.queries[rows] - _BISECT_ROOM
            active = torch.isfinite(run.best[rows]) & (room >= min(probes, _MIN_PROBES))
            a = active.nonzero().flatten()
            if not len(a):
                break
            count = room[a].clamp(max=probes)
            normal = self._estimate_normal(oracle, chunk, run, a, bank, offsets + drawn_so_far, probes, count)
            drawn_so_far += probes
            if self.momentum > 0:
                normal = normal + self.momentum * previous[a]
                normal = normal / normal.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                previous[a] = normal
            candidate, ok = self._step(oracle, chunk, run, a, normal, step)
            step[a] = torch.where(ok, (step[a] * 1.5).clamp(max=1.0), step[a])
            self._record(at, run, rows[a])
            moved = a[ok]
            before = run.best[rows[moved]].clone()
            self._bisect(oracle, chunk, run, moved, candidate[ok], before)
            self._record(at, run, rows[a])

    def probes_at(self, iteration: int) -> int:
        """Probes of an iteration: `probes`, times sqrt(iteration + 1) with `probe_growth`."""
        if not self.probe_growth:
            return self.probes
        return int(round(self.probes * (iteration + 1) ** 0.5))

    def _estimate_normal(self, oracle, chunk: Chunk, run: PairRun, a, bank, offsets, b, count) -> torch.Tensor:
        """Unit estimate (R, C, H, W) of the boundary normal at each pair's point, toward class t, from
        `count` (R,) probes each (at most `b`). Pairs are taken a block at a time, so that their probes stay
        within _PROBE_BYTES."""
        normal = torch.empty_like(chunk.x[a])
        block = max(1, _PROBE_BYTES // (4 * b * chunk.x[0].numel()))
        for start in range(0, len(a), block):
            part = slice(start, start + block)
            normal[part] = self._normal_block(oracle, chunk, run, a[part], bank, offsets, b, count[part])
        return normal

    def _normal_block(self, oracle, chunk: Chunk, run: PairRun, a, bank, offsets, b, count) -> torch.Tensor:
        rows, x = chunk.rows[a], chunk.x[a]
        # Pair r uses bank rows offset_r + [0, count_r): the caller moves the offsets on every iteration.
        drawn = (offsets[a, None] + torch.arange(b)[None, :]) % _BANK_SIZE  # (R, B)
        u = bank[drawn]  # (R, B, C, H, W)
        point = run.points[rows]  # (R, C, H, W)
        # Probes orthogonal to the current perturbation w = p - x: moving along w only rescales it, which the
        # bisection does anyway, so every probe is spent on the directions that can shorten it.
        w = (point - x).flatten(1)
        w = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))[:, None, :]  # (R, 1, D)
        flat = u.flatten(2)
        flat = flat - (flat * w).sum(dim=2, keepdim=True) * w
        u = (flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12)).view_as(u)
        d = run.best[rows].to(torch.float32).view(-1, 1, 1, 1, 1)
        lo, hi = oracle.bounds
        probes = torch.clamp(point[:, None] + self.delta * d * u, lo, hi)  # (R, B, C, H, W)
        used = torch.arange(b)[None, :] < count[:, None]  # (R, B): the last iteration may use fewer
        r_index = torch.arange(len(a))[:, None].expand(-1, b)[used]
        is_t = torch.zeros(len(a), b, dtype=torch.bool)
        is_t[used] = run.ask(oracle, rows[r_index], probes[used], x[r_index], chunk.target[a][r_index])
        sign = torch.where(used, is_t.to(torch.float32) * 2 - 1, 0.0)  # (R, B) +1 on the t side, 0 unused
        mean = sign.sum(dim=1, keepdim=True) / count[:, None].clamp_min(1).to(torch.float32)
        # Baseline correction (HopSkipJump) unless all probes agree, when it would zero the estimate.
        weight = torch.where(used, torch.where(mean.abs() < 1, sign - mean, sign), 0.0)
        v = probes.sub_(point[:, None])  # what was actually sent, after clipping (in place: no second copy)
        g = (weight.view(*weight.shape, 1, 1, 1) * v).sum(dim=1)  # (R, C, H, W)
        return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def _step(self, oracle, chunk: Chunk, run: PairRun, a, normal, step):
        """From each point, step along the normal by step * d, halving until labelled t (bounded)."""
        lo, hi = oracle.bounds
        rows = chunk.rows[a]
        candidate = run.points[rows].clone()
        ok = torch.zeros(len(a), dtype=torch.bool)
        scale = step[a].clone()
        for _ in range(self.max_halvings):
            todo = (~ok & (run.queries[rows] < self.queries_per_pair)).nonzero().flatten()
            if not len(todo):
                break
            eps = (scale[todo] * run.best[rows[todo]]).to(torch.float32).view(-1, 1, 1, 1)
            trial = torch.clamp(run.points[rows[todo]] + eps * normal[todo], lo, hi)
            is_t = run.ask(oracle, rows[todo], trial, chunk.x[a[todo]], chunk.target[a[todo]])
            candidate[todo[is_t]] = trial[is_t]
            ok[todo[is_t]] = True
            scale[todo[~is_t]] *= 0.5
        step[a] = scale  # failed pairs keep their halved scale for the next iteration
        return candidate, ok

    def _bisect(self, oracle, chunk: Chunk, run: PairRun, moved, candidate, previous) -> None:
        """Bisect on x -> candidate (labelled t) for the boundary, to relative tolerance.

        The first query is at 85% of the previous distance, not halfway: one step rarely gains more than
        15%, so that query usually lifts the lower end close to the boundary and saves 1-3 bisections.
        """
        rows, x, target = chunk.rows[moved], chunk.x[moved], chunk.target[moved]
        lo = torch.zeros(len(rows), dtype=torch.float64)
        hi = torch.ones(len(rows), dtype=torch.float64)
        length = (candidate - x).flatten(1).double().norm(dim=1)
        first = (_FIRST_GUESS * previous / length.clamp_min(1e-12)).clamp(0.05, 0.95)
        for i in range(64):  # the tolerance is reached long before: 2^-64 is below float64 resolution
            todo = ((hi - lo > self.tolerance * hi) & (run.queries[rows] < self.queries_per_pair)).nonzero().flatten()
            if not len(todo):
                break
            mid = first[todo] if i == 0 else 0.5 * (lo[todo] + hi[todo])
            points = segment_points(x[todo], candidate[todo], mid, oracle.bounds)
            is_t = run.ask(oracle, rows[todo], points, x[todo], target[todo])
            hi[todo] = torch.where(is_t, mid, hi[todo])
            lo[todo] = torch.where(is_t, lo[todo], mid)


def principal_components(reference_x: torch.Tensor | ImageStore, k: int) -> torch.Tensor:
    """(k', D) the leading k' = min(k, rank) principal directions of the references (rows, float64)."""
    d = int(np.prod(reference_x.shape[1:]))
    if d > _MAX_PCA_DIMENSIONS:
        raise ConfigError(f"subspace='pca' needs the (D, D) covariance of the references, and D = {d:,} pixels is "
                          f"more than {_MAX_PCA_DIMENSIONS:,}: use a probe grid instead (e.g. subspace=16)")
    if isinstance(reference_x, ImageStore):  # on disk: the covariance from sums over chunks, in float64
        total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros((d, d), dtype=torch.float64)
        for _, chunk in reference_x.chunks():
            flat = torch.from_numpy(chunk).flatten(1).double()
            total += flat.sum(dim=0)
            outer += flat.T @ flat
        n = len(reference_x)
        cov = (outer - torch.outer(total, total) / n) / max(n - 1, 1)
    else:
        flat = reference_x.flatten(1)
        centred = flat - flat.mean(dim=0, keepdim=True)
        cov = (centred.T @ centred).double() / max(len(flat) - 1, 1)  # (D, D)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    keep = min(k, int((values > values[-1] * 1e-9).sum()))
    return vectors[:, -keep:].flip(1).T.contiguous()
