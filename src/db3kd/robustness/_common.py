"""What the robustness estimators share: the result type, input checks, pairs and nearest references."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputError

# Rows of the (sample, reference) distance matrix computed at once: 256 x 60000 float32 is 60 MiB.
_DISTANCE_CHUNK = 256


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
    """

    distances: np.ndarray
    queries: np.ndarray
    points: np.ndarray | None = None
    distances_at: np.ndarray | None = None
    checkpoints: tuple[int, ...] = ()
    budget_exhausted: bool = False


@dataclass(frozen=True)
class Pairs:
    """The (sample, target) pairs a call works on, in row-major order of the (N, K) result."""

    sample: torch.Tensor  # (P,) int64 sample index
    target: torch.Tensor  # (P,) int64 target class
    num_classes: int

    def __len__(self) -> int:
        return len(self.sample)

    @property
    def flat(self) -> np.ndarray:
        """Index of each pair in the flattened (N, K) result; also its oracle id."""
        return (self.sample * self.num_classes + self.target).numpy()


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
    """Every (i, t) with t in `targets` (default: all classes) and t != labels[i]."""
    if targets is None:
        wanted = torch.ones(num_classes, dtype=torch.bool)
    else:
        t = np.asarray(targets).reshape(-1)
        if not np.issubdtype(t.dtype, np.integer) or (t.size and (t.min() < 0 or t.max() >= num_classes)):
            raise InputError(f"expected targets as classes in [0, {num_classes}), got {targets!r}")
        wanted = torch.zeros(num_classes, dtype=torch.bool)
        wanted[torch.from_numpy(t.astype(np.int64))] = True
    mask = wanted[None, :] & (torch.arange(num_classes)[None, :] != labels[:, None])  # (N, K)
    sample, target = mask.nonzero(as_tuple=True)
    return Pairs(sample, target, num_classes)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def fraction(value, name: str, upper_inclusive: bool = False) -> float:
    """A float in (0, 1) (or (0, 1] with upper_inclusive)."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not (0 < value < 1 or (upper_inclusive and value == 1)):
        raise ConfigError(f"{name} must be a number in (0, 1{']' if upper_inclusive else ')'}, got {value!r}")
    return float(value)


def nearest_by_class(x: torch.Tensor, reference_x: torch.Tensor, reference_y: torch.Tensor, num_classes: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest reference samples (L2) of every class for every sample.

    Returns:
        index: (N, K, k) int64 rows of `reference_x`, nearest first; -1 where class t has fewer than k.
        distance: (N, K, k) float64 L2 distances, inf where index is -1. References at distance 0 from
            the sample (the sample itself) are skipped: they give no direction.
    """
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
