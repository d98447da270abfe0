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

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import integer, number
from ..errors import DataError
from ..executors import Executor
from ..io import load_json, load_npz, save_npz
from ..oracle import LabelOracle
from .runner import MANIFEST, ShardedJob, run_job
from .soft_labels import digest

RECIPE_KEYS = ("first", "second", "weight", "dy", "dx", "brightness")
OPTIONAL_KEYS = ("mask", "angle", "scale")  # stored only when their options are used
STORED_KEYS = (*RECIPE_KEYS, *OPTIONAL_KEYS)
_LATER = ("mask", "max_rotation", "max_scale")  # options added later: hashed only when used
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
        seed: seeds the draws (shard s draws from seed [seed, s]).
        shard_size: mixtures per shard.
    """

    count: int
    max_shift: int = 3
    min_brightness: float = 0.3
    mask: float = 0.0
    max_rotation: float = 0.0
    max_scale: float = 0.0
    seed: int = 0
    shard_size: int = 50_000

    def __post_init__(self):
        for name, low in (("count", 1), ("max_shift", 0), ("shard_size", 1), ("seed", None)):
            integer(getattr(self, name), name, low)
        number(self.min_brightness, "min_brightness", 0, 1)
        number(self.mask, "mask", 0, 1, closed="both")
        number(self.max_rotation, "max_rotation", 0, 180, closed="both")
        number(self.max_scale, "max_scale", 0, 1, closed="low")

    def params(self) -> dict:
        """The config as hashed and recorded: the options added later (`mask`, `max_rotation`, `max_scale`) only
        when used, so mixtures made before they existed keep their hash (and are not bought again)."""
        return {k: v for k, v in asdict(self).items() if k not in _LATER or v}


# How mixtures look (what a budget's `mixture_options` may set), not how many, which draw or how they are split.
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


@dataclass
class MixtureJob(ShardedJob):
    """Draws and labels mixtures shard by shard (a `db3kd.jobs.runner.ShardedJob`; a shard may run on Ray)."""

    pseudo_x: np.ndarray = field(repr=False)
    config: MixtureConfig
    num_classes: int
    batch: int = 5000  # images built and sent at once: a shard's images never sit in memory all at once
    name = "mixtures"
    unit = "img"

    def fingerprint(self) -> dict:
        # The pseudo samples enter by their hash: other samples' shards are never mixed with these.
        return {**self.config.params(), "pseudo_samples_sha256": digest(self.pseudo_x)}

    def shard_sizes(self) -> list[int]:
        c = self.config
        return [min(c.shard_size, c.count - start) for start in range(0, c.count, c.shard_size)]

    def known_cost(self, shards: list[int]) -> int:
        sizes = self.shard_sizes()
        return sum(sizes[s] for s in shards)  # one query per mixture

    def __call__(self, oracle: LabelOracle, shard: int) -> dict[str, np.ndarray]:
        n = self.shard_sizes()[shard]
        recipes = draw_recipes(np.random.default_rng([self.config.seed, shard]), n, len(self.pseudo_x), self.config,
                               self.pseudo_x.shape[2:])
        labels = np.empty(n, dtype=np.int64)
        for i in range(0, n, self.batch):
            part = {k: v[i:i + self.batch] for k, v in recipes.items()}
            labels[i:i + self.batch] = oracle.labels(mixture_images(self.pseudo_x, part, oracle.bounds))
        return dict(**recipes, labels=labels)

    def merge(self, merged: dict[str, np.ndarray], out: Path) -> dict:
        save_npz(out / RESULTS, **{k: merged[k] for k in (*STORED_KEYS, "labels") if k in merged})
        return {"params": self.config.params(), "count": self.config.count,
                "label_counts": np.bincount(merged["labels"], minlength=self.num_classes).tolist()}


def label_mixtures(oracle: LabelOracle, pseudo_x: np.ndarray, config: MixtureConfig, out_dir: str | os.PathLike,
                   run_info: dict, progress: bool = True, executor: Executor | None = None) -> dict:
    """Draw and label `config.count` mixtures of `pseudo_x` into `out_dir`, resuming finished shards.

    Writes `mixtures.npz` (the recipe arrays, `labels` (count,)) and `manifest.json` (queries, label
    counts per class); returns the manifest. `run_info` goes into the fingerprint and the manifest.
    `executor` (`db3kd.executors`) computes the shards, here by default or on Ray.
    """
    info = {**run_info, "bounds": list(oracle.bounds)}
    return run_job(MixtureJob(pseudo_x, config, oracle.num_classes), oracle, out_dir, info, executor, progress)


def load_mixtures(synthesis_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images (rebuilt), labels and manifest of the mixtures of a `db3kd synthesize --mixtures N` directory."""
    from .synthesis import load_pseudo_samples

    pseudo_x, _, _ = load_pseudo_samples(synthesis_dir)
    return read_mixtures(Path(synthesis_dir) / "mixtures", pseudo_x, source=f"{synthesis_dir}'s",
                         remake=f"run `db3kd synthesize --mixtures N --out {synthesis_dir}`")


def read_mixtures(directory: str | os.PathLike, pseudo_x: np.ndarray, source: str = "the pseudo samples given",
                  remake: str = "label them again") -> tuple[np.ndarray, np.ndarray, dict]:
    """Images (rebuilt from `pseudo_x`), labels and manifest of the mixtures `label_mixtures` wrote to `directory`.

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
    labels = arrays["labels"].astype(np.int64)
    images = np.empty((len(labels), *pseudo_x.shape[1:]), dtype=np.float32)
    for i in range(0, len(labels), 10_000):  # chunked: no second full-size copy
        images[i:i + 10_000] = mixture_images(pseudo_x, {k: v[i:i + 10_000] for k, v in recipes.items()},
                                              tuple(fingerprint["bounds"]))
    return images, labels, manifest
