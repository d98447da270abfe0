"""Supervised training and evaluation of classifiers: teachers, students, the CE-only baseline.

Two profiles. `auto` (the default) suits a transfer set of any size: the batch size and the number of
epochs follow from the set's size (a few thousand optimizer steps whatever the size), light augmentation
(random shifts of grey images; random crops with padding and horizontal flips of colour images), and a
held-out part of the transfer set (its own labels, the teacher's for a distilled student; never the test
split) chooses the epoch whose weights are kept. `paper` is the DB3KD reference code's setting: batch 512, 10
epochs, no augmentation, no hold-out, the final epoch.

Training writes its state after every epoch when given a checkpoint path, and a rerun resumes from the last
finished epoch with the same result as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import choice, integer, number
from .errors import ConfigError
from .losses import KDLoss

PROFILES = ("auto", "paper")
AUGMENTATIONS = ("auto", "none", "shift", "crop-flip")
TARGET_STEPS = 5000  # auto profile's default steps over the run (10 epochs of 60,000 at batch 128 are 4,690)
MIN_EPOCHS, MAX_EPOCHS = 10, 300  # the floor gives way for sets of over ~250,000 images (e.g. with mixtures)
HOLDOUT_FRACTION, HOLDOUT_MAX, HOLDOUT_MIN = 0.1, 5000, 50
MAX_TEST_EVALUATIONS = 20  # the test split is evaluated at most this often (a curve, not a choice)
# Augmentation's reach, scaled with the image: shifts of up to 2 pixels on 28x28 (none below 14x14), crops
# padded by 4 pixels on 32x32 (the usual CIFAR-10 setting).
SHIFT_FRACTION, CROP_FRACTION = 1 / 14, 1 / 8


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_classifier`; None means "derived by the profile from the set's size".

    profile: 'auto' (sizes, augmentation and hold-out chosen for the transfer set) or 'paper' (batch 512,
        10 epochs, nothing else).
    epochs: passes over the training images (default: from `steps`, or 10 with the paper profile).
    steps: optimizer steps over the run, the epochs rounded up from them; give epochs or steps, not both.
        Default: the auto profile's 5,000 (at least 10 epochs unless the set is so large that fewer already make
        20,000 steps), which suits MNIST; LeNet-5-half on Fashion-MNIST is still learning there (87.4% at 12
        epochs, 89.7% at 40: 17,200 steps).
    augment: 'auto' (auto profile: 'shift' for grey images, 'crop-flip' for colour ones; paper: 'none'),
        'none', 'shift' (up to 1/14 of the side each way: 2 pixels on 28x28, none below 14x14) or 'crop-flip'
        (padded by 1/8 of the side, 4 pixels on 32x32, randomly cropped, flipped horizontally half the time).
    holdout: fraction of the transfer set held out to choose the epoch (auto profile: 0.1, at most 5,000
        images, none below 500 images; paper: 0).
    """

    profile: str = "auto"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3  # Adam's usual step; cosine-decayed to 0 over the run for a stable final epoch
    weight_decay: float = 0.0
    augment: str = "auto"
    holdout: float | None = None
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self):
        choice(self.profile, "profile", PROFILES)
        choice(self.augment, "augment", AUGMENTATIONS)
        if self.epochs is not None:
            integer(self.epochs, "epochs", 1)
        if self.steps is not None:
            integer(self.steps, "steps", 1)
            if self.epochs is not None:
                raise ConfigError(f"give epochs or steps, not both (got epochs {self.epochs} and steps {self.steps})")
        if self.batch_size is not None:
            integer(self.batch_size, "batch_size", 1)
        if self.holdout is not None:
            number(self.holdout, "holdout", 0, 0.5, closed="low")
        number(self.lr, "lr", 0, math.inf, closed="none")
        number(self.weight_decay, "weight_decay", 0, math.inf, closed="low")
        integer(self.seed, "seed")

    def to_dict(self) -> dict:
        """The settings as hashed and recorded; `steps`, added later, only when given (old results keep their
        hashes)."""
        settings = asdict(self)
        if self.steps is None:
            del settings["steps"]
        return settings

    def plan(self, num_samples: int, channels: int, holdout_pool: int | None = None) -> TrainPlan:
        """The concrete settings for `num_samples` transfer images of `channels` channels, the first
        `holdout_pool` of which (default: all) may be held out."""
        paper = self.profile == "paper"
        fraction = self.holdout if self.holdout is not None else 0.0 if paper else HOLDOUT_FRACTION
        pool = num_samples if holdout_pool is None else holdout_pool
        holdout = min(round(pool * fraction), HOLDOUT_MAX)
        if fraction and not (HOLDOUT_MIN <= holdout < pool and holdout < num_samples):  # too few to hold any out
            holdout = 0 if self.holdout is None else _too_small(num_samples, self.holdout)
        train = num_samples - holdout
        batch = self.batch_size or (512 if paper else 128 if train >= 16384 else 64 if train >= 4096 else 32)
        steps_per_epoch = math.ceil(train / batch)
        if self.epochs or self.steps:
            epochs = self.epochs or math.ceil(self.steps / steps_per_epoch)
        elif paper:
            epochs = 10
        else:  # at least MIN_EPOCHS, unless the set is so large that fewer already make 4x the target steps
            floor = min(MIN_EPOCHS, math.ceil(4 * TARGET_STEPS / steps_per_epoch))
            epochs = min(max(math.ceil(TARGET_STEPS / steps_per_epoch), floor), MAX_EPOCHS)
        augment = self.augment
        if augment == "auto":
            augment = "none" if paper else "shift" if channels == 1 else "crop-flip"
        return TrainPlan(epochs=epochs, batch_size=batch, augment=augment, holdout=holdout, train=train)


def _too_small(num_samples: int, fraction: float) -> int:
    raise ConfigError(f"holdout: {fraction} of {num_samples} images leaves no usable held-out set (expected at least "
                      f"{HOLDOUT_MIN} held out and one to train on); pass a larger fraction, or holdout 0")


@dataclass(frozen=True)
class TrainPlan:
    """What a `TrainConfig` comes to for one transfer set (recorded in metrics.json)."""

    epochs: int
    batch_size: int
    augment: str
    holdout: int  # images held out to choose the epoch (0: the final epoch is kept)
    train: int  # images trained on


@dataclass
class TrainResult:
    """What a training run did: per-epoch history, the epoch whose weights were kept, and its evaluation."""

    plan: TrainPlan | None = None
    history: list[dict] = field(default_factory=list)
    chosen_epoch: int = 0
    evaluation: dict = field(default_factory=dict)  # the kept weights', e.g. test_accuracy, fidelity
    resumed_from_epoch: int = 0
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return self.evaluation.get("test_accuracy")

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Inside, torch runs on `n` threads (the previous count is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Arg-max predictions of a (white-box, our own) model over a dataset, in batches."""
    return _batched(model, x, batch_size, lambda logits: logits.argmax(dim=1), np.zeros(0, dtype=np.int64))


def probabilities(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """(N, K) softmax outputs of a (white-box, our own) model over a dataset, in batches."""
    return _batched(model, x, batch_size, lambda logits: logits.softmax(dim=1), np.zeros((0, 0), dtype=np.float32))


@torch.inference_mode()
def _batched(model: torch.nn.Module, x, batch_size: int, head, empty: np.ndarray) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    if not getattr(x, "lazy", False):  # an array or tensor: one conversion; rows built when indexed: a batch at a time
        x = torch.as_tensor(x)
    out = [head(model(torch.as_tensor(x[i:i + batch_size]).to(device))).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else empty


def accuracy(model: torch.nn.Module, x, y, batch_size: int = 1000) -> float:
    """Fraction of `x` that `model` classifies as `y`."""
    return float((predict(model, x, batch_size) == np.asarray(y)).mean())


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Randomly shifted (`shift`) or cropped and flipped (`crop-flip`) copies of a batch, per image.

    The image is padded with zeros (by 1/14 of its side for a shift, 1/8 for a crop) and a window of its size
    taken at a random offset, for all images at once.
    """
    n, _, h, w = x.shape
    pad = int(min(h, w) * (SHIFT_FRACTION if kind == "shift" else CROP_FRACTION))
    if kind == "none" or pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)
    if kind == "crop-flip":
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def train_classifier(
    model: torch.nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    progress: bool = True,
    soft_logits: np.ndarray | None = None,
    kd: KDLoss | None = None,
    checkpoint: str | os.PathLike | None = None,
    holdout_pool: int | None = None,
) -> TrainResult:
    """Train `model` on (x_train, y_train) with Adam and cosine decay; `model` ends with the kept weights.

    The loss is cross-entropy, or with `soft_logits` and `kd`, the distillation loss `kd` against the
    soft targets (see `db3kd.losses.KDLoss`).

    Args:
        model: maps (N, C, H, W) images to logits; trained in place.
        x_train: (N, C, H, W) float32 images: an array, or an array-like such as `db3kd.data.rows.LazyRows`
            (indexed a batch at a time when its `lazy` is true, else read whole).
        y_train: (N,) int64 class labels (ground truth or a teacher's labels).
        config: hyper-parameters; `config.plan` makes them concrete for this set.
        evaluate: called with the model on some epochs (a curve) and on the kept weights at the end; returns
            figures such as {"test_accuracy": ...}, recorded in the history and the result.
        progress: show a progress bar per epoch.
        soft_logits: (N, K) soft-target logits per training image, for `kd`.
        kd: the distillation loss; needs `soft_logits`.
        checkpoint: a file to write the training state to after every epoch; an existing one of the same
            training resumes it from its last finished epoch. Removed when training ends.
        holdout_pool: the hold-out is drawn from the first `holdout_pool` rows only (default: all), e.g. the real
            images of a set whose later rows are mixtures, which always train.
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ConfigError(f"expected as many labels as images (> 0), got {len(x_train)} images and {len(y_train)} labels")
    if (soft_logits is None) != (kd is None):
        raise ConfigError("soft_logits and kd go together: pass both for distillation, neither for cross-entropy")
    if soft_logits is not None and len(soft_logits) != len(x_train):
        raise ConfigError(f"expected soft logits for each of the {len(x_train)} images, got {len(soft_logits)}")
    pool = len(x_train) if holdout_pool is None else min(integer(holdout_pool, "holdout_pool", 0), len(x_train))
    plan = config.plan(len(x_train), int(np.shape(x_train)[1]), pool)
    with torch.random.fork_rng():  # dropout and the like: reproducible from the seed, the caller's RNG untouched
        torch.manual_seed(config.seed)
        return _Fit(model, x_train, y_train, config, plan, soft_logits, kd, checkpoint, pool).run(evaluate, progress)


class _Fit:
    """One training run: its data split, optimizer and schedule, and the state a checkpoint holds."""

    def __init__(self, model, x_train, y_train, config: TrainConfig, plan: TrainPlan, soft_logits, kd, checkpoint,
                 pool: int):
        self.model, self.config, self.plan, self.kd = model, config, plan, kd
        self.device = resolve_device(config.device)
        model.to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        order = torch.arange(len(x_train))
        if plan.holdout:  # a random part of the pool (drawn only then: the paper profile's shuffles stay as they were)
            order[:pool] = torch.randperm(pool, generator=self.generator)
        self.train_idx, self.holdout_idx = order[plan.holdout:], order[:plan.holdout]
        # Rows built when indexed (millions of mixtures: `db3kd.data.rows`) are built a batch at a time; other
        # images (arrays, an ImageStore) are read whole, in one go.
        self.x = x_train if getattr(x_train, "lazy", False) else torch.as_tensor(np.asarray(x_train))
        self.y = torch.as_tensor(y_train, dtype=torch.int64)
        self.z = None if soft_logits is None else torch.as_tensor(soft_logits, dtype=torch.float32)
        self.steps_per_epoch = math.ceil(plan.train / plan.batch_size)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=plan.epochs * self.steps_per_epoch)
        self.result = TrainResult(plan=plan)
        self.best: tuple[float, int, dict] | None = None  # (hold-out agreement, epoch, weights)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.fingerprint = _fingerprint(config, plan, pool, x_train, y_train, soft_logits, kd)

    def run(self, evaluate, progress: bool) -> TrainResult:
        start_epoch, elapsed = self._resume()
        start = time.perf_counter() - elapsed
        evaluate_every = math.ceil(self.plan.epochs / MAX_TEST_EVALUATIONS)
        for epoch in range(start_epoch + 1, self.plan.epochs + 1):
            record = {"epoch": epoch, "train_loss": self._epoch(epoch, progress)}
            if self.plan.holdout:
                record["holdout_agreement"] = accuracy(self.model, self.x[self.holdout_idx], self.y[self.holdout_idx])
                if self.best is None or record["holdout_agreement"] >= self.best[0]:  # ties: the later epoch
                    self.best = (record["holdout_agreement"], epoch, copy.deepcopy(self.model.state_dict()))
            if evaluate is not None and (epoch % evaluate_every == 0 or epoch == self.plan.epochs):
                record.update(evaluate(self.model))
            record["seconds"] = time.perf_counter() - start
            self.result.history.append(record)
            if progress:
                shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                                  if k not in ("epoch", "seconds") and isinstance(v, float))
                tqdm.write(f"epoch {epoch}/{self.plan.epochs}: {shown} ({record['seconds']:.0f} s)")
            self._save(epoch, record["seconds"])
        self.result.chosen_epoch = self.plan.epochs
        if self.best is not None:
            self.result.chosen_epoch = self.best[1]
            self.model.load_state_dict(self.best[2])
        if evaluate is not None:
            self.result.evaluation = evaluate(self.model)
        self.result.seconds = time.perf_counter() - start
        if self.checkpoint is not None:
            self.checkpoint.unlink(missing_ok=True)
        return self.result

    def _epoch(self, epoch: int, progress: bool) -> float:
        self.model.train()
        order = self.train_idx[torch.randperm(self.plan.train, generator=self.generator)]
        total, seen, size = 0.0, 0, self.plan.batch_size
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{self.plan.epochs}", leave=False,
                   disable=None if progress else True)  # None: no bar when not a terminal
        for step in bar:
            idx = order[step * size:(step + 1) * size]
            xb = augment_batch(torch.as_tensor(self.x[idx]), self.plan.augment, self.generator).to(self.device)
            yb = self.y[idx].to(self.device)
            logits = self.model(xb)
            loss = F.cross_entropy(logits, yb) if self.kd is None else self.kd(logits, yb, self.z[idx].to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{total / seen:.4f}")
        return total / seen

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": self.result.history, "best": self.best}

    def _save(self, epoch: int, seconds: float) -> None:
        if self.checkpoint is None or epoch == self.plan.epochs:
            return
        from .io import atomic_write

        state = {"fingerprint": self.fingerprint, "epoch": epoch, "seconds": seconds, **self._state()}
        atomic_write(self.checkpoint, lambda f: torch.save(state, f))

    def _resume(self) -> tuple[int, float]:
        """(last finished epoch, seconds spent) of a checkpoint of this same training, else (0, 0)."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return 0, 0.0
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is not a reason to fail: start afresh
            tqdm.write(f"training state {self.checkpoint} unreadable ({type(exc).__name__}); training from epoch 1")
            return 0, 0.0
        if state.get("fingerprint") != self.fingerprint:
            tqdm.write(f"training state {self.checkpoint} is of another training (settings or data); "
                       "training from epoch 1")
            return 0, 0.0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.result.history, self.best = state["history"], state["best"]
        self.result.resumed_from_epoch = state["epoch"]
        tqdm.write(f"resuming training after epoch {state['epoch']}/{self.plan.epochs} from {self.checkpoint}")
        return state["epoch"], state["seconds"]


def _fingerprint(config: TrainConfig, plan: TrainPlan, pool: int, x, y, soft_logits, kd) -> str:
    """A digest of what decides a training's result: settings, plan and (a sample of) the data."""
    digest = hashlib.sha256(repr((replace(config, device=None).to_dict(), asdict(plan), pool,
                                  None if kd is None else asdict(kd), np.shape(x))).encode())
    step = max(1, len(x) // 256)
    for array in (np.asarray(x[::step]), np.asarray(y), None if soft_logits is None else np.asarray(soft_logits)):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
