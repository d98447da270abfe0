"""Teacher-labelled mixtures of transfer images: cheap extra transfer data, one query each.

Written for pseudo samples (zero-shot), and used the same way on real transfer images (a recipe's
`transfer.mixtures` beside a `split`): between and around few labelled images, the teacher's decisions.

Pseudo samples (`db3kd.synthesis`) are few and sit deep inside their class regions; a student trained on
them alone learns little about where the teacher's boundaries run between them. A mixture blends two
random pseudo samples (weight w ~ U(0, 1)), optionally rotates it by up to `max_rotation` degrees and zooms it
by up to `max_scale` about its centre, shifts it by up to `max_shift` pixels (the border filled with the lower
bound) and dims it by a factor b ~ U(min_brightness, 1) toward the lower bound; a share `mask`
of them is also cut out by a random smooth mask (the rest falls to the lower bound: shapes on a background);
the teacher labels it, one query each. They teach the student the teacher's decisions between and around the pseudo
samples for one query per image, a small fraction of a pseudo sample's cost (see benchmarks/zero_shot.py).

Only each mixture's recipe (which samples, w, angle and zoom, shift, b, and its mask as packed bits) and label
are stored, not its image: `mixture_images` rebuilds the images exactly (the same float32 arithmetic the
teacher's images came from), so a million mixtures take a few dozen MB on disk (masks add 98 MB per million on
28x28 images). Work is done in seeded shards, resumable like the other long jobs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import integer, number
from ..data.rows import LazyRows, RowStack
from ..errors import BudgetExceededError, ConfigError, DataError
from ..executors import Executor
from ..io import load_json, load_npz, save_npz, write_json
from ..oracle import LabelOracle
from ..shards import ShardStore
from ..training import probabilities, torch_threads
from .runner import MANIFEST, ShardedJob, run_job
from .selection import margins
from .soft_labels import digest, model_digest

RECIPE_KEYS = ("first", "second", "weight", "dy", "dx", "brightness")
OPTIONAL_KEYS = ("mask", "angle", "scale")  # stored only when their options are used
STORED_KEYS = (*RECIPE_KEYS, *OPTIONAL_KEYS)
_LATER = ("mask", "max_rotation", "max_scale", "rounds", "pool")  # options added later: hashed only when used
RESULTS = "mixtures.npz"


@dataclass
class MixtureConfig:
    """What determines a set of mixtures (its shards are refused if any of this changes).

    Args:
        count: mixtures to label (one teacher query each).
        max_shift: largest shift in pixels, each axis (0: no shift).
        min_brightness: smallest dimming factor b in (0, 1]; 1: no dimming.
        mask: share of the mixtures also multiplied by a random smooth binary mask (uniform noise on a coarse
            grid, upsampled, kept above 0.5), the parts outside set to the lower bound. On Fashion-MNIST's
            zero-shot recipe, all of them masked took the student from 74% to 80% (objects on a background,
            where the pseudo samples fill the frame).
        max_rotation: largest rotation in degrees, either way, about the image centre (0: none).
        max_scale: largest zoom, as a zoom factor in [1 - max_scale, 1 + max_scale] about the centre (0: none).
            Rotations and zooms keep mixtures of real images near the images' manifold (handwriting and photos
            are seen tilted and at other sizes), where few images leave the teacher's decisions unseen.
        rounds: rounds of draw -> label -> train a selector student. Round 1 draws at random; each later round
            draws `pool` times its share of candidates, keeps those the selector (trained on every mixture
            labelled so far, and the pseudo samples when zero-shot) is least sure of, and labels only those:
            queries go where the student still has to learn the teacher's decisions. The count is shared
            evenly between the rounds.
        pool: candidates drawn per mixture kept, in rounds after the first (no query: the selector scores them);
            at least 2 with rounds.
        seed: seeds the draws (shard s draws from seed [seed, s]; after round 1, candidates from [seed, s, r, chunk]).
        shard_size: mixtures per shard.
    """

    count: int
    max_shift: int = 3
    min_brightness: float = 0.3
    mask: float = 0.0
    max_rotation: float = 0.0
    max_scale: float = 0.0
    rounds: int = 1
    pool: int = 4
    seed: int = 0
    shard_size: int = 50_000

    def __post_init__(self):
        for name, low in (("count", 1), ("max_shift", 0), ("rounds", 1), ("pool", 1), ("shard_size", 1),
                          ("seed", None)):
            integer(getattr(self, name), name, low)
        if self.rounds > self.count:
            raise ConfigError(f"rounds must be at most count ({self.count}): every round labels some mixtures, "
                              f"got {self.rounds}")
        if self.rounds > 1 and self.pool < 2:
            raise ConfigError(f"pool must be at least 2 with rounds (candidates to choose from), got {self.pool}")
        number(self.min_brightness, "min_brightness", 0, 1)
        number(self.mask, "mask", 0, 1, closed="both")
        number(self.max_rotation, "max_rotation", 0, 180, closed="both")
        number(self.max_scale, "max_scale", 0, 1, closed="low")

    def params(self) -> dict:
        """The config as hashed and recorded: the options added later (`_LATER`) only when not at their
        defaults, so mixtures made before they existed keep their hash (and are not bought again); `pool` only
        with rounds to use it."""
        defaults = MixtureConfig(count=1)
        return {k: v for k, v in asdict(self).items()
                if k not in _LATER or (self.rounds > 1 if k == "pool" else v != getattr(defaults, k))}

    def round_counts(self) -> list[int]:
        """Mixtures labelled in each round (the count shared evenly, the first rounds taking the remainder)."""
        share, extra = divmod(self.count, self.rounds)
        return [share + (r < extra) for r in range(self.rounds)]

    def shard_sizes(self, round: int = 1) -> list[int]:
        """Mixtures in each shard of round `round` (1-based)."""
        count, size = self.round_counts()[round - 1], self.shard_size
        return [min(size, count - start) for start in range(0, count, size)]


# What a budget's `mixture_options` may set: how mixtures look and in how many rounds they are chosen, not how
# many there are (the plan's), which draw or how they are split into shards.
MIXTURE_OPTIONS = tuple(f.name for f in fields(MixtureConfig) if f.name not in ("count", "seed", "shard_size"))


def draw_recipes(rng: np.random.Generator, n: int, num_samples: int, config: MixtureConfig,
                 image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """`n` random mixture recipes over `num_samples` pseudo samples of `image_size` (H, W) pixels (arrays keyed by
    STORED_KEYS; "mask" (n, ceil(H * W / 8)) packed bits only if config.mask > 0, all ones where unmasked;
    "angle" (degrees) and "scale" only if rotations or zooms are asked for)."""
    from .synthesis import low_frequency_noise

    s = config.max_shift
    recipes = dict(first=rng.integers(0, num_samples, n), second=rng.integers(0, num_samples, n),
                   weight=rng.random(n, dtype=np.float32),
                   dy=rng.integers(-s, s + 1, n).astype(np.int8), dx=rng.integers(-s, s + 1, n).astype(np.int8),
                   brightness=rng.uniform(config.min_brightness, 1.0, n).astype(np.float32))
    if config.mask > 0:  # drawn last: recipes without masks stay what they were
        masked = rng.random(n) < config.mask
        keep = low_frequency_noise(rng, n, (1, *image_size), (0.0, 1.0))[:, 0] > 0.5
        keep[~masked] = True
        recipes["mask"] = np.packbits(keep.reshape(n, -1), axis=1)
    if config.max_rotation or config.max_scale:  # drawn after the mask, for the same reason
        r, z = config.max_rotation, config.max_scale
        recipes["angle"] = rng.uniform(-r, r, n).astype(np.float32)
        recipes["scale"] = rng.uniform(1 - z, 1 + z, n).astype(np.float32)
    return recipes


def rotate_and_zoom(images: np.ndarray, angle: np.ndarray, scale: np.ndarray, fill: np.float32) -> np.ndarray:
    """(n, C, H, W) images rotated by `angle` degrees and zoomed by `scale` about their centres (bilinear; what
    comes in from outside the frame is `fill`).

    The sampling grid is built elementwise in float32 (no matrix product), so an image comes out bit for bit
    the same whatever batch it is in: the images the teacher labelled can be rebuilt exactly.
    """
    n, _, h, w = images.shape
    theta, scale = np.deg2rad(angle.astype(np.float32)), scale.astype(np.float32)  # the grid stays float32
    cos = (np.cos(theta) / scale)[:, None, None]
    sin = (np.sin(theta) / scale)[:, None, None]
    px = (np.arange(w, dtype=np.float32) - np.float32((w - 1) / 2))[None, None, :]  # pixels from the centre
    py = (np.arange(h, dtype=np.float32) - np.float32((h - 1) / 2))[None, :, None]
    # Output pixel p samples the input at R(-angle) p / scale; grid_sample wants it normalised to [-1, 1].
    sx = cos * px + sin * py
    sy = cos * py - sin * px
    grid = np.stack([np.broadcast_to(2 * sx / w, (n, h, w)), np.broadcast_to(2 * sy / h, (n, h, w))], axis=-1)
    moved = F.grid_sample(torch.from_numpy(np.ascontiguousarray(images - fill)),
                          torch.from_numpy(grid), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return moved.numpy() + fill


def mixture_images(x: np.ndarray, recipes: dict[str, np.ndarray], bounds: tuple[float, float]) -> np.ndarray:
    """(n, C, H, W) float32 images of the mixtures `recipes` of pseudo samples `x`."""
    lo = np.float32(bounds[0])
    w = recipes["weight"][:, None, None, None]
    blend = w * x[recipes["first"]] + (1 - w) * x[recipes["second"]]
    if "angle" in recipes:
        blend = rotate_and_zoom(blend, recipes["angle"], recipes["scale"], lo)
    n, c, h, width = blend.shape
    s = int(max(np.abs(recipes["dy"]).max(initial=0), np.abs(recipes["dx"]).max(initial=0)))
    padded = np.pad(blend, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=lo)
    # Pixel (i, j) of the shifted image is pixel (i - dy, j - dx) of the blend: one gather for the batch.
    rows = np.arange(h)[None, :] + s - recipes["dy"].astype(np.int64)[:, None]  # (n, H)
    cols = np.arange(width)[None, :] + s - recipes["dx"].astype(np.int64)[:, None]  # (n, W)
    shifted = padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    out = lo + recipes["brightness"][:, None, None, None] * (shifted - lo)
    if "mask" in recipes:
        keep = np.unpackbits(recipes["mask"], axis=1, count=h * width).reshape(n, 1, h, width)
        out = np.where(keep.astype(bool), out, lo)
    return out.astype(np.float32)


class MixtureImages(LazyRows):
    """The (n, C, H, W) images of stored mixtures, rebuilt from their recipes when indexed (`db3kd.data.rows`):
    in memory, a mixture is its recipe (about 130 bytes on 28x28 masked, against 3 KB as an image), so the
    millions a large budget buys train a batch at a time."""

    def __init__(self, pool: np.ndarray, recipes: dict[str, np.ndarray], bounds: tuple[float, float]):
        self.pool, self.recipes, self.bounds = pool, recipes, bounds
        self.shape = (len(recipes["first"]), *pool.shape[1:])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return mixture_images(self.pool, {k: v[indices] for k, v in self.recipes.items()}, self.bounds)


@dataclass
class MixtureJob(ShardedJob):
    """Draws and labels one round's mixtures shard by shard (a `db3kd.jobs.runner.ShardedJob`; a shard may run on
    Ray); after round 1, of `config.pool` candidates per mixture, those `scorer` is least sure of."""

    pseudo_x: np.ndarray = field(repr=False)
    config: MixtureConfig
    num_classes: int
    round: int = 1
    scorer: torch.nn.Module | None = field(default=None, repr=False)
    batch: int = 5000  # images built and sent at once: a shard's images never sit in memory all at once
    name = "mixtures"
    unit = "img"

    def __post_init__(self):
        if (self.scorer is None) != (self.round == 1):
            raise ConfigError(f"round 1's mixtures are drawn at random and later rounds' chosen by a selector student; "
                              f"got round {self.round} {'without' if self.scorer is None else 'with'} one")

    def fingerprint(self) -> dict:
        # The pseudo samples enter by their hash: other samples' shards are never mixed with these.
        found = {**self.config.params(), "pseudo_samples_sha256": digest(self.pseudo_x)}
        if self.scorer is not None:  # a retrained selector chooses other mixtures
            found.update(round=self.round, scorer_sha256=model_digest(self.scorer))
        return found

    def shard_sizes(self) -> list[int]:
        return self.config.shard_sizes(self.round)

    def known_cost(self, shards: list[int]) -> int:
        sizes = self.shard_sizes()
        return sum(sizes[s] for s in shards)  # one query per mixture

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        n = self.shard_sizes()[shard]
        if self.scorer is None:
            recipes = draw_recipes(np.random.default_rng([self.config.seed, shard]), n, len(self.pseudo_x),
                                   self.config, self.pseudo_x.shape[2:])
        else:
            recipes = self._least_sure(n, shard, oracle.bounds)
        labels = np.empty(n, dtype=np.int64)
        for i in range(0, n, self.batch):
            part = {k: v[i:i + self.batch] for k, v in recipes.items()}
            labels[i:i + self.batch] = oracle.labels(mixture_images(self.pseudo_x, part, oracle.bounds))
        return dict(**recipes, labels=labels)

    def _least_sure(self, n: int, shard: int, bounds) -> dict[str, np.ndarray]:
        """The `n` of `n * pool` candidate recipes the scorer is least sure of, in draw order (no query)."""
        draws, chunks, gaps = n * self.config.pool, [], []
        with torch_threads(1):  # the same margins, so the same mixtures, whatever executor or machine scores them
            for c, start in enumerate(range(0, draws, self.batch)):  # never all candidates' images (or masks) at once
                # [seed, shard, round, c]: round >= 2, so no stream of round 1's [seed, shard] is drawn again.
                rng = np.random.default_rng([self.config.seed, shard, self.round, c])
                chunk = draw_recipes(rng, min(self.batch, draws - start), len(self.pseudo_x), self.config,
                                     self.pseudo_x.shape[2:])
                gaps.append(margins(probabilities(self.scorer, mixture_images(self.pseudo_x, chunk, bounds))))
                chunks.append(chunk)
        keep = np.sort(np.argsort(np.concatenate(gaps), kind="stable")[:n])
        return {k: np.concatenate([chunk[k] for chunk in chunks])[keep] for k in chunks[0]}

    def merge(self, merged: dict[str, np.ndarray], out: Path) -> dict:
        save_npz(out / RESULTS, **{k: merged[k] for k in (*STORED_KEYS, "labels") if k in merged})
        return {"params": self.config.params(), "count": len(merged["labels"]),
                "label_counts": np.bincount(merged["labels"], minlength=self.num_classes).tolist()}


# selector(round, earlier) -> the student choosing round `round`'s mixtures; `earlier()` gives the images and
# labels of the mixtures before it (rebuilt only when called: a finished selector need not see them again).
Selector = Callable[[int, Callable[[], tuple[RowStack, np.ndarray]]], torch.nn.Module]
SUMMED = ("total_queries", "queries_sent", "queries_discarded", "queries_unconfirmed", "attempts_discarded", "shards",
          "seconds", "cost_usd", "sent_usd")  # a manifest's figures that add up over the rounds


def label_mixtures(oracle: LabelOracle, pseudo_x: np.ndarray, config: MixtureConfig, out_dir: str | os.PathLike,
                   run_info: dict, progress: bool = True, executor: Executor | None = None,
                   selector: Selector | None = None) -> dict:
    """Draw and label `config.count` mixtures of `pseudo_x` into `out_dir`, resuming finished shards.

    Writes `mixtures.npz` (the recipe arrays, `labels` (count,)) and `manifest.json` (queries, label
    counts per class); returns the manifest. `run_info` goes into the fingerprint and the manifest.
    `executor` (`db3kd.executors`) computes the shards, here by default or on Ray. With `config.rounds` > 1,
    round r's mixtures go to `out_dir`/round<r> (each resumable), chosen by `selector` (see `Selector`), and are
    then merged into `out_dir`; the manifest sums the rounds' queries and lists each round's.
    """
    info = {**run_info, "bounds": list(oracle.bounds)}
    if config.rounds == 1:
        return run_job(MixtureJob(pseudo_x, config, oracle.num_classes), oracle, out_dir, info, executor, progress)
    if selector is None:
        raise ConfigError(f"mixtures in {config.rounds} rounds need a selector student to choose them")
    out = Path(out_dir)

    def earlier(r: int) -> tuple[RowStack, np.ndarray]:
        parts = [read_mixtures(out / f"round{k}", pseudo_x)[:2] for k in range(1, r)]
        return RowStack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # Every round's cost is known (one query a mixture): a budget short of what the rounds still need is refused
    # before round 1 sends anything, not when round 2 finds it short.
    need = sum(n for r in range(1, config.rounds + 1)
               for s, n in enumerate(config.shard_sizes(r)) if s not in ShardStore.written(out / f"round{r}"))
    if oracle.remaining is not None and need > oracle.remaining:
        raise BudgetExceededError(oracle.queries, oracle.budget, need, advice=(
            f"The {config.rounds} rounds of mixtures still need {need:,} queries, known in advance: nothing was sent "
            "for them. Raise the budget, or ask for fewer mixtures."))
    rounds = []
    for r in range(1, config.rounds + 1):
        scorer = None if r == 1 else selector(r, functools.partial(earlier, r))
        rounds.append(run_job(MixtureJob(pseudo_x, config, oracle.num_classes, r, scorer), oracle, out / f"round{r}",
                              info, executor, progress))
    arrays = [load_npz(out / f"round{r}" / RESULTS, "rerun") for r in range(1, config.rounds + 1)]
    merged = {k: np.concatenate([a[k] for a in arrays]) for k in (*STORED_KEYS, "labels") if k in arrays[0]}
    save_npz(out / RESULTS, **merged)
    write_json(out / "fingerprint.json", load_json(out / "round1" / "fingerprint.json", "rerun"))
    manifest = {**{k: v for k, v in rounds[0].items() if k not in ("shard_queries", "executor")},
                **{k: sum(m[k] for m in rounds) for k in SUMMED if k in rounds[0]},
                "params": config.params(), "count": len(merged["labels"]),
                "label_counts": np.bincount(merged["labels"], minlength=oracle.num_classes).tolist(), "rounds": rounds}
    write_json(out / MANIFEST, manifest)
    return manifest


def load_mixtures(synthesis_dir: str | os.PathLike) -> tuple[MixtureImages, np.ndarray, dict]:
    """Images (`MixtureImages`, rebuilt when indexed; `np.asarray` for an array), labels and manifest of the
    mixtures of a `db3kd synthesize --mixtures N` directory."""
    from .synthesis import load_pseudo_samples

    pseudo_x, _, _ = load_pseudo_samples(synthesis_dir)
    return read_mixtures(Path(synthesis_dir) / "mixtures", pseudo_x, source=f"{synthesis_dir}'s",
                         remake=f"run `db3kd synthesize --mixtures N --out {synthesis_dir}`")


def read_mixtures(directory: str | os.PathLike, pseudo_x: np.ndarray, source: str = "the pseudo samples given",
                  remake: str = "label them again") -> tuple[MixtureImages, np.ndarray, dict]:
    """Images (`MixtureImages`: rebuilt from `pseudo_x` when indexed), labels and manifest of the mixtures
    `label_mixtures` wrote to `directory`.

    Refused (DataError) if missing or made from other pseudo samples; `source` names `pseudo_x` and `remake`
    says how to make them (again), in those messages.
    """
    directory = Path(directory)
    manifest, arrays = load_json(directory / MANIFEST, remake), load_npz(directory / RESULTS, remake)
    fingerprint = load_json(directory / "fingerprint.json", remake)
    if fingerprint.get("pseudo_samples_sha256") != digest(pseudo_x):
        raise DataError(f"the mixtures in {directory} were made from other pseudo samples than {source}; "
                        f"delete that directory and {remake}")
    recipes = {k: arrays[k] for k in RECIPE_KEYS} | {k: arrays[k] for k in OPTIONAL_KEYS if k in arrays}
    return MixtureImages(pseudo_x, recipes, tuple(fingerprint["bounds"])), arrays["labels"].astype(np.int64), manifest
