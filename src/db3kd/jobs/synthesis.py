"""Pseudo samples for zero-shot distillation (ZSDB3KD, Wang 2021): no real image, only teacher labels.

Each sample starts as random noise the teacher labels with the wanted class (rejection sampling), then is
pushed, round after round, away from its nearest decision boundary while keeping its class, so that it
ends deep inside the class region (large *untargeted* minimal boundary distance): such samples carry the
teacher's class structure and make useful transfer data. This is the job behind `db3kd synthesize`.

Work is done shard by shard (each shard holds every class and is computed from its own seed, so shards are
independent and deterministic); finished shards are kept, so an interrupted run resumes and gives the same
result as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import integer, number
from ..errors import BudgetExceededError, ConfigError, DataError
from ..executors import Executor, ShardDone
from ..io import load_json, load_npz, save_npz
from ..oracle import LabelOracle
from ..robustness import BoundaryDistance, MinimalBoundaryDistance
from .runner import MANIFEST, ShardedJob, run_job

RESULTS = "pseudo_samples.npz"

# Grid sides of the low-frequency noise (bilinearly upsampled uniform noise). Plain uniform pixel noise is
# labelled 8 or 2 by ~95% of an MNIST LeNet (0 hits of classes 1, 6, 7 in 4000 draws); a mixture of
# coarse scales hits every class at >= 1%, a few hundred draws per accepted sample at worst.
NOISE_GRIDS = (2, 3, 4, 5, 7, 14)


@dataclass
class SynthesisConfig:
    """What determines a synthesis run's results (its shards are refused if any of this changes).

    Args:
        per_class: pseudo samples per class.
        queries_per_sample: teacher queries per sample over all rounds (boundary searches and moves);
            rejection sampling is counted apart, since rejected draws belong to no sample.
        rounds: rounds of "find the nearest boundary point p, step away from it".
        step: each move is step * d away from p, d = |x - p| (halved up to `max_halvings` times
            while the moved image would leave its class).
        max_halvings: tries per move; a sample whose every try leaves its class stays where it is.
        max_draws: noise images drawn per shard at most while a class still lacks samples (a class the
            teacher never predicts for noise raises an error instead of looping forever).
        draw_batch: noise images labelled at once.
        seed: seeds the noise and the searches.
        shard_size: samples per shard (at least the number of classes, so every shard holds every class).
    """

    per_class: int
    queries_per_sample: int = 2000
    rounds: int = 8
    step: float = 2.0  # 0.5 barely changed the images in 3 rounds (MNIST quick benchmark: 42% vs 59% at 2.0)
    max_halvings: int = 4
    max_draws: int = 200_000
    draw_batch: int = 2000
    seed: int = 0
    shard_size: int = 500

    def __post_init__(self):
        for name in ("per_class", "queries_per_sample", "rounds", "max_halvings", "max_draws", "draw_batch", "shard_size"):
            integer(getattr(self, name), name, 1)
        integer(self.seed, "seed")
        number(self.step, "step", 0, 4)  # a fraction of the boundary distance

    def search_queries(self) -> int:
        """Queries per sample for each of the rounds + 1 boundary searches (moves take the rest)."""
        return (self.queries_per_sample - self.rounds * self.max_halvings) // (self.rounds + 1)

    def check(self, num_classes: int) -> None:
        """Checks that need the teacher's number of classes."""
        if self.shard_size < num_classes:
            raise ConfigError(f"shard_size must be at least the number of classes ({num_classes}) so that every "
                              f"shard holds every class, got {self.shard_size}")
        need = (self.rounds + 1) * (num_classes - 1) + self.rounds * self.max_halvings
        if self.queries_per_sample < need:
            raise ConfigError(
                f"queries_per_sample must be at least {need} for {self.rounds} rounds and {num_classes} classes "
                f"(one query per other class per search, plus {self.max_halvings} per move), got {self.queries_per_sample}")


def low_frequency_noise(rng: np.random.Generator, n: int, input_shape, bounds) -> np.ndarray:
    """(n, C, H, W) float32 noise: uniform on a random coarse grid (NOISE_GRIDS), upsampled bilinearly."""
    c, h, w = input_shape
    grids = [g for g in NOISE_GRIDS if g < min(h, w)] or [min(h, w)]
    side = rng.choice(grids, size=n)
    out = np.empty((n, c, h, w), dtype=np.float32)
    for g in grids:  # one upsampling per grid size
        rows = np.flatnonzero(side == g)
        small = torch.from_numpy(rng.random((len(rows), c, g, g), dtype=np.float32))
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).numpy()
    lo, hi = bounds
    return (lo + (hi - lo) * out).astype(np.float32)


def rejection_sample(oracle: LabelOracle, labels: np.ndarray, config: SynthesisConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
    """Noise images the teacher labels `labels[i]`, in order; also the draws made and hits per class.

    Raises:
        DataError: a class still lacks samples after `config.max_draws` draws.
    """
    k = oracle.num_classes
    want = np.bincount(labels, minlength=k)
    pools: list[list[np.ndarray]] = [[] for _ in range(k)]
    hits = np.zeros(k, dtype=np.int64)
    draws = 0
    for _ in range(-(-config.max_draws // config.draw_batch)):  # at most max_draws images
        if all(len(pools[c]) >= want[c] for c in range(k)):
            break
        noise = low_frequency_noise(rng, min(config.draw_batch, config.max_draws - draws), oracle.input_shape, oracle.bounds)
        got = oracle.labels(noise)
        draws += len(noise)
        hits += np.bincount(got, minlength=k)
        for c in np.unique(got):
            pools[c].extend(noise[got == c][: max(want[c] - len(pools[c]), 0)])
    short = [c for c in range(k) if len(pools[c]) < want[c]]
    if short:
        c = short[0]
        raise DataError(
            f"class {c} was labelled {hits[c]} times in {draws} noise images, fewer than the {want[c]} needed "
            f"(classes short of samples: {short}); the teacher may never predict it for noise. Raise max_draws "
            f"(--max-draws) or ask for fewer samples per class.")
    images = np.empty((len(labels), *oracle.input_shape), dtype=np.float32)
    for c in np.flatnonzero(want):  # the k-th sample of class c is its k-th accepted draw
        images[labels == c] = np.stack(pools[c][:want[c]])
    return images, draws, hits


class BoundaryPush:
    """Rounds of ZSDB3KD: move each sample away from its nearest decision boundary, within its class.

    A boundary search (budget `search_queries` per sample) gives, for every sample x of class c, the
    nearest point p labelled anything but c it can find, and d = |x - p|, the untargeted minimal boundary
    distance: BD toward the other samples of every class t != c (a share of the budget per target), then
    MBD's sign-gradient walk for the nearest target with the rest. A move is
    x <- clip(x + step * d * (x - p) / d); the teacher labels the moved image (one query), and a move that
    would change the class is halved, `max_halvings` tries at most, else the sample stays.

    The references of the searches are the current samples themselves (with their labels, which are the
    teacher's: every move is checked). Queries go out with the sample's id, so the oracle counts them per
    sample.
    """

    def __init__(self, search_queries: int, step: float = 2.0, max_halvings: int = 4, seed: int = 0):
        self.search_queries, self.step, self.max_halvings, self.seed = search_queries, step, max_halvings, seed
        self._walk = None  # the MBD of the searches, made on first use (it needs the teacher's shape)

    def search(self, oracle: LabelOracle, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) untargeted boundary distances and (N, C, H, W) the boundary points (NaN where none found)."""
        k = oracle.num_classes
        # Half the search budget for BD over the K-1 targets (<= 40 per pair), half for the walk.
        bd_queries = int(min(40, max(1, self.search_queries // (2 * (k - 1)))))
        bd = BoundaryDistance(max_directions=8, queries_per_pair=bd_queries)
        result = bd(oracle, x, y, x, y, ids=ids, return_points=True)
        _raise_if_exhausted(result, oracle)
        nearest = np.argmin(result.distances, axis=1)  # (N,)
        rows = np.arange(len(x))
        distance = result.distances[rows, nearest]
        points = result.points[rows, nearest]
        walk_budget = self.search_queries - bd_queries * (k - 1)  # includes MBD's re-run of its pair's BD
        # MBD needs room for its BD, one normal estimate (probes), a step and a few bisections.
        probes = 16
        if walk_budget >= bd_queries + probes + 6:
            if self._walk is None:
                side = min(10, *oracle.input_shape[1:])  # probe subspace: a coarse grid (no PCA of noise)
                self._walk = MinimalBoundaryDistance(queries_per_pair=walk_budget, checkpoints=(walk_budget,),
                                                     probes=probes, subspace=side,
                                                     bd=BoundaryDistance(max_directions=8, queries_per_pair=bd_queries))
            mbd = self._walk
            for t in np.unique(nearest[np.isfinite(distance)]):
                group = np.flatnonzero((nearest == t) & np.isfinite(distance))
                walked = mbd(oracle, x[group], y[group], x, y, targets=[t], ids=ids[group], seed=self.seed,
                             return_points=True)
                _raise_if_exhausted(walked, oracle)
                better = walked.distances[:, t] < distance[group]
                distance[group[better]] = walked.distances[better, t]
                points[group[better]] = walked.points[better, t]
        return distance, points

    def move(self, oracle: LabelOracle, x: np.ndarray, y: np.ndarray, ids: np.ndarray, distance: np.ndarray,
             points: np.ndarray) -> np.ndarray:
        """x moved away from its boundary points, never out of its class (one query per try)."""
        lo, hi = oracle.bounds
        x = x.copy()
        found = np.isfinite(distance)
        direction = np.zeros_like(x)
        direction[found] = (x[found] - points[found]) / distance[found, None, None, None].astype(np.float32)
        scale = np.where(found, self.step * distance, 0.0).astype(np.float32)  # (N,)
        todo = np.flatnonzero(found)
        for _ in range(self.max_halvings):
            if not len(todo):
                break
            trial = np.clip(x[todo] + scale[todo, None, None, None] * direction[todo], lo, hi)
            kept = oracle.labels(trial, ids=ids[todo]) == y[todo]
            x[todo[kept]] = trial[kept]
            scale[todo[~kept]] *= 0.5
            todo = todo[~kept]
        return x


def _raise_if_exhausted(result, oracle: LabelOracle) -> None:
    if result.budget_exhausted:
        raise BudgetExceededError(oracle.queries, oracle.budget, result.refused, advice=(
            "The unfinished shard is dropped; finished shards are kept: rerun the same command to resume."))


@dataclass
class SynthesisJob(ShardedJob):
    """The pseudo samples, shard by shard (a `db3kd.jobs.runner.ShardedJob`; a shard may run on a Ray worker).

    Sample i has class i % K, so every shard holds every class; shard s draws from seed [seed, s].
    """

    config: SynthesisConfig
    num_classes: int
    name = "synthesize"
    unit = "sample"

    def __post_init__(self):
        self.labels = np.tile(np.arange(self.num_classes), self.config.per_class)

    def fingerprint(self) -> dict:
        return asdict(self.config)

    def shard_sizes(self) -> list[int]:
        n, size = len(self.labels), self.config.shard_size
        return [min(size, n - start) for start in range(0, n, size)]

    def progress(self, done: ShardDone) -> dict:
        mean = _finite_mean(done.arrays["distances"][:, -1])
        return {"mean_distance": "n/a" if mean is None else f"{mean:.3f}"}

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        """Rejection sampling and all rounds for one shard."""
        config = self.config
        ids = np.arange(shard * config.shard_size, min((shard + 1) * config.shard_size, len(self.labels)))
        labels = self.labels[ids]
        rng = np.random.default_rng([config.seed, shard])
        before = oracle.queries
        x, draws, hits = rejection_sample(oracle, labels, config, rng)
        sampling_queries = oracle.queries - before
        first_of_class = np.unique(labels, return_index=True)[1]  # one trajectory per class, for the picture
        trajectory = [x[first_of_class]]
        push = BoundaryPush(config.search_queries(), config.step, config.max_halvings, seed=config.seed + shard)
        spent_before = oracle.queries_for(ids)
        distance, points = push.search(oracle, x, labels, ids)
        initial = distance.copy()
        per_round = np.empty((len(x), config.rounds))
        for r in range(config.rounds):
            x = push.move(oracle, x, labels, ids, distance, points)
            distance, points = push.search(oracle, x, labels, ids)
            per_round[:, r] = distance
            trajectory.append(x[first_of_class])
        return dict(images=x, labels=labels, initial_distances=initial, distances=per_round,
                    queries=oracle.queries_for(ids) - spent_before, trajectory_labels=labels[first_of_class][None],
                    trajectory=np.stack(trajectory, axis=1)[None],  # (1, classes, rounds + 1, C, H, W)
                    draws=np.array([draws]), hits=hits[None], sampling_queries=np.array([sampling_queries]))

    def merge(self, merged: dict[str, np.ndarray], out: Path) -> dict:
        distances = merged["distances"].T  # (rounds, N)
        save_npz(out / RESULTS, images=merged["images"], labels=merged["labels"], distances=distances,
                 initial_distances=merged["initial_distances"], queries=merged["queries"])
        plot_samples(merged["trajectory"][0], merged["trajectory_labels"][0], out / "samples.png")
        draws, hits = merged["draws"].sum(axis=0), merged["hits"].sum(axis=0)
        k = self.num_classes
        return {
            "params": asdict(self.config), "seed": self.config.seed, "num_samples": int(len(merged["labels"])),
            "num_classes": k,
            "rejection_sampling_queries": int(merged["sampling_queries"].sum(axis=0)),
            "round_queries": int(merged["queries"].sum(axis=0)),
            "max_queries_per_sample": int(merged["queries"].max(axis=0)),
            "noise_draws": int(draws),
            "acceptance_rates": {str(c): float(hits[c] / max(draws, 1)) for c in range(k)},
            # Means over the samples whose search found a boundary point; the others (inf) are counted apart.
            "mean_initial_distance": _finite_mean(merged["initial_distances"]),
            "mean_distance_per_round": [_finite_mean(d) for d in distances],
            "no_boundary_found_per_round": [int((~np.isfinite(d)).sum(axis=0)) for d in distances],
        }


def synthesize(oracle: LabelOracle, config: SynthesisConfig, out_dir: str | os.PathLike, run_info: dict,
               progress: bool = True, executor: Executor | None = None) -> dict:
    """Make `config.per_class` pseudo samples of every class (sample i has class i % K) into `out_dir`,
    resuming finished shards; returns the manifest.

    Writes `pseudo_samples.npz` (`images`, `labels`, `distances` (rounds, N) the untargeted boundary distance
    after each round (inf where a search found no boundary point; the sample then stays put),
    `initial_distances`, `queries` per sample), `samples.png` and `manifest.json`. `run_info` goes into the
    fingerprint and the manifest; `executor` (`db3kd.executors`) computes the shards, here by default.
    """
    k = oracle.num_classes
    config.check(k)
    info = {**run_info, "teacher_input_shape": list(oracle.input_shape), "num_classes": k,
            "bounds": list(oracle.bounds)}
    return run_job(SynthesisJob(config, k), oracle, out_dir, info, executor, progress)


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean(axis=0)) if len(finite) else None


def plot_samples(trajectory: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """A PNG grid: one row per class, one column per round (0 = the accepted noise).

    Drawn as one mosaic image (one imshow, not one axes per cell: ten times faster to render).
    """
    from matplotlib.figure import Figure

    rows, cols, c, h, w = trajectory.shape
    pad = 1
    mosaic = np.ones((rows * (h + pad), cols * (w + pad), c), dtype=np.float32)  # white separators
    for r in range(rows):
        for k in range(cols):
            mosaic[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = np.moveaxis(trajectory[r, k], 0, -1)
    fig = Figure(figsize=(0.5 * cols + 1, 0.5 * rows + 0.6))
    ax = fig.subplots()
    ax.imshow(mosaic[..., 0] if c == 1 else mosaic.clip(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(w + pad) * k + w / 2 for k in range(cols)], [str(k) for k in range(cols)])
    ax.set_yticks([(h + pad) * r + h / 2 for r in range(rows)], [str(int(y)) for y in labels])
    ax.set(xlabel="round", ylabel="class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def load_pseudo_samples(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images, labels and manifest of a `db3kd synthesize` output directory."""
    directory = Path(directory)
    remedy = f"expected the output directory of `db3kd synthesize --out {directory}`; rerun it to remake it"
    manifest, data = load_json(directory / MANIFEST, remedy), load_npz(directory / RESULTS, remedy)
    if "images" not in data or "labels" not in data:
        raise DataError(f"{directory / RESULTS} lacks images or labels; {remedy}")
    return data["images"], data["labels"].astype(np.int64), manifest
