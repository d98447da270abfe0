"""Supervised training and evaluation of classifiers: the teacher trainer and the CE-only student baseline."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import integer, number
from .errors import ConfigError
from .losses import KDLoss


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_classifier`. Defaults reach >= 99% on MNIST with LeNet-5 in 10 epochs."""

    epochs: int = 10
    batch_size: int = 128  # small enough for many updates per epoch on 60k images
    lr: float = 1e-3  # Adam's usual step; cosine-decayed to 0 over the run for a stable final epoch
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self):
        integer(self.epochs, "epochs", 1)
        integer(self.batch_size, "batch_size", 1)
        number(self.lr, "lr", 0, math.inf, closed="none")
        number(self.weight_decay, "weight_decay", 0, math.inf, closed="low")
        integer(self.seed, "seed")


@dataclass
class TrainResult:
    """What a training run did: per-epoch history and totals."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return self.history[-1].get("test_accuracy") if self.history else None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Arg-max predictions of a (white-box, our own) model over a dataset, in batches."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x)
    out = [model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(model: torch.nn.Module, x, y, batch_size: int = 1000) -> float:
    """Fraction of `x` that `model` classifies as `y`."""
    return float((predict(model, x, batch_size) == np.asarray(y)).mean())


def train_classifier(
    model: torch.nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
    soft_logits: np.ndarray | None = None,
    kd: KDLoss | None = None,
) -> TrainResult:
    """Train `model` on (x_train, y_train) using Adam with cosine decay.

    The loss is cross-entropy, or with `soft_logits` and `kd`, the distillation loss `kd` against the
    soft targets (see `db3kd.losses.KDLoss`).

    Args:
        model: maps (N, C, H, W) images to logits; trained in place.
        x_train: (N, C, H, W) float32 images.
        y_train: (N,) int64 class labels (ground truth or a teacher's labels).
        config: hyper-parameters.
        eval_set: (x, y) evaluated after each epoch (test accuracy in the history).
        progress: show a progress bar per epoch.
        soft_logits: (N, K) soft-target logits per training image, for `kd`.
        kd: the distillation loss; needs `soft_logits`.
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ConfigError(f"expected as many labels as images (> 0), got {len(x_train)} images and {len(y_train)} labels")
    if (soft_logits is None) != (kd is None):
        raise ConfigError("soft_logits and kd go together: pass both for distillation, neither for cross-entropy")
    if soft_logits is not None and len(soft_logits) != len(x_train):
        raise ConfigError(f"expected soft logits for each of the {len(x_train)} images, got {len(soft_logits)}")
    with torch.random.fork_rng():  # dropout and the like: reproducible from the seed, the caller's RNG untouched
        torch.manual_seed(config.seed)
        return _fit(model, x_train, y_train, config, eval_set, progress, soft_logits, kd)


def _fit(model, x_train, y_train, config: TrainConfig, eval_set, progress: bool, soft_logits, kd) -> TrainResult:
    device = resolve_device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    x_all = torch.as_tensor(x_train)
    y_all = torch.as_tensor(y_train, dtype=torch.int64)
    z_all = None if soft_logits is None else torch.as_tensor(soft_logits, dtype=torch.float32)
    steps_per_epoch = math.ceil(len(x_all) / config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        total_loss, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=None if progress else True, leave=False)  # None: no bar when not a terminal
        for step in bar:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb) if kd is None else kd(logits, yb, z_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        record = {"epoch": epoch, "train_loss": total_loss / seen, "seconds": time.perf_counter() - start}
        if eval_set is not None:
            record["test_accuracy"] = accuracy(model, *eval_set)
        result.history.append(record)
        if progress:
            acc = f", test accuracy {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
            tqdm.write(f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}{acc} ({record['seconds']:.0f} s)")
    result.seconds = time.perf_counter() - start
    return result
