"""The label-only teacher: the one object through which db3kd queries a teacher.

Every image sent is counted, in total and (when the caller says which sample an image belongs to) per
sample. A budget, when set, is checked before anything is sent. Callers get labels and nothing else.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Protocol

import numpy as np
import torch

from .data.images import ImageStore
from .data.rows import LazyRows
from .errors import BudgetExceededError, DB3KDError, InputError, TeacherError
from .teachers.base import LabelBackend


class QueryLedger(Protocol):
    """A budget shared by several oracles (e.g. one per worker of a distributed run).

    The oracle reserves a batch before sending it, so concurrent oracles can never together exceed the
    shared budget, then settles how many of the reserved images were really sent.
    """

    def reserve(self, n: int) -> None:
        """Claim `n` queries; raise `BudgetExceededError` (nothing is sent) if the shared budget cannot."""
        ...

    def settle(self, reserved: int, sent: int) -> None:
        """`sent` of the `reserved` queries went to the teacher; the rest are released."""
        ...


class LabelOracle:
    """Top-1 labels from a teacher backend, with exact query accounting.

    Pixels outside the teacher's bounds are clipped to them before sending (as in the DB3KD paper, whose
    searches may step slightly outside the image box); NaN and inf are refused.

    Args:
        backend: the teacher (see `db3kd.teachers.load_teacher`).
        budget: maximum number of images ever sent; None for no limit.
        chunk_size: largest batch sent at once; default the backend's preferred batch.
        ledger: a budget shared with other oracles, checked after `budget` (see `QueryLedger`).
        price_per_1000: what the teacher charges per 1000 images, in USD (None: not known); see `cost_usd`.
    """

    def __init__(self, backend: LabelBackend, budget: int | None = None, chunk_size: int | None = None,
                 ledger: QueryLedger | None = None, price_per_1000: float | None = None):
        if budget is not None and (int(budget) != budget or budget < 0):
            raise InputError(f"budget must be a non-negative integer or None, got {budget!r}")
        if price_per_1000 is not None and not 0 <= price_per_1000 < float("inf"):
            raise InputError(f"price_per_1000 must be a non-negative number of USD or None, got {price_per_1000!r}")
        chunk_size = backend.preferred_batch if chunk_size is None else chunk_size
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        _check_contract(backend)
        self._backend = backend
        self.budget = None if budget is None else int(budget)
        self.chunk_size = int(chunk_size)
        self.ledger = ledger
        self.price_per_1000 = None if price_per_1000 is None else float(price_per_1000)
        self.queries = 0
        self._per_sample = np.zeros(0, dtype=np.int64)

    # The teacher's contract, for algorithms that need to know the image box.
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._backend.input_shape

    @property
    def num_classes(self) -> int:
        return self._backend.num_classes

    @property
    def bounds(self) -> tuple[float, float]:
        return self._backend.bounds

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def identity(self) -> str:
        """What tells this teacher from another (a file's digest, a service's URL and contract); runs record it."""
        return getattr(self._backend, "identity", self.name)

    def check_fits(self, input_shape, num_classes: int, what: str) -> None:
        """Refuse, before any query, data that this teacher cannot label: other image shape or class count."""
        if tuple(input_shape) != tuple(self.input_shape) or num_classes != self.num_classes:
            raise TeacherError(
                f"teacher {self.name} takes images {tuple(self.input_shape)} and answers {self.num_classes} classes, "
                f"but {what} has images {tuple(input_shape)} in {num_classes} classes: use a teacher of that data")

    @property
    def price_per_query(self) -> float | None:
        """USD per image sent (None when the price is not known)."""
        return None if self.price_per_1000 is None else self.price_per_1000 / 1000

    @property
    def cost_usd(self) -> float | None:
        """USD spent so far on this oracle's queries (None when the price is not known)."""
        return None if self.price_per_1000 is None else self.queries * self.price_per_1000 / 1000

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget (None when unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    def labels(self, x: torch.Tensor | np.ndarray, ids=None) -> torch.Tensor | np.ndarray:
        """Teacher labels (int64, one per image) for a batch (N, C, H, W) of float32 images.

        Args:
            x: the images; a NumPy input gets a NumPy answer, a tensor a tensor on x's device; an
                `ImageStore` (a folder on disk) or `LazyRows` (e.g. mixtures) is built and labelled chunk by chunk,
                for a NumPy answer.
            ids: optional non-negative sample id per image; queries are then also counted per id
                (see `queries_for`).

        Raises:
            InputError: wrong type, rank, shape or dtype, or NaN/inf pixels. Nothing is sent.
            BudgetExceededError: the batch would exceed the budget or the ledger's. Nothing is sent.
            TeacherError: the backend answered something that is not N labels in [0, K).
        """
        if isinstance(x, (ImageStore, LazyRows)):
            if self.budget is not None and self.queries + len(x) > self.budget:
                raise BudgetExceededError(self.queries, self.budget, len(x))  # the whole store, as for an array
            return np.concatenate([self.labels(chunk, None if ids is None else np.asarray(ids)[start:start + len(chunk)])
                                   for start, chunk in x.chunks()]) if len(x) else np.zeros(0, dtype=np.int64)
        as_numpy = isinstance(x, np.ndarray)
        xt = self._validate(x)
        id_array = self._validate_ids(ids, len(xt))
        n = len(xt)
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceededError(self.queries, self.budget, n)
        if self.ledger is not None and n:
            self.ledger.reserve(n)  # the whole call at once: a refusal comes before anything is sent
        lo, hi = self.bounds
        out = torch.empty(n, dtype=torch.int64, device=xt.device)
        sent = 0
        try:
            for start in range(0, n, self.chunk_size):
                chunk = _clip(xt[start:start + self.chunk_size], lo, hi)
                try:
                    answer = self._backend.predict_labels(chunk)
                except DB3KDError as error:
                    # A backend that split the chunk may have had some of its images answered before failing.
                    sent += self._count_answered(start, error, len(chunk), id_array)
                    raise
                # Counted as soon as the teacher has answered (even with garbage), so no failure hides spent queries.
                sent += self._count(start, len(chunk), id_array)
                out[start:start + len(chunk)] = self._check_labels(answer, len(chunk))
        finally:
            if self.ledger is not None and n:
                self.ledger.settle(n, sent)
        return out.cpu().numpy() if as_numpy else out

    def count_external(self, n: int) -> None:
        """Count `n` queries sent on this oracle's behalf by other oracles sharing its budget through a ledger
        (the workers of a distributed run), so that `queries` and `remaining` cover the whole run."""
        if int(n) != n or n < 0:
            raise InputError(f"expected a non-negative number of queries, got {n!r}")
        self.queries += int(n)

    def queries_for(self, ids) -> np.ndarray:
        """Queries counted so far for each sample id in `ids` (0 for ids never seen)."""
        ids = np.asarray(ids, dtype=np.int64)
        counts = np.zeros(ids.shape, dtype=np.int64)
        known = ids < len(self._per_sample)
        counts[known] = self._per_sample[ids[known]]
        return counts

    def _validate(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise InputError(f"expected float32 images, got dtype {x.dtype}; convert with x.astype(np.float32)")
            x = torch.from_numpy(np.ascontiguousarray(x))  # torch refuses negative strides (e.g. x[..., ::-1])
        elif not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor or numpy.ndarray of images, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise InputError(f"expected float32 images, got dtype {x.dtype}; convert with x.float()")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        # A finite sum proves every pixel finite, ~30x faster than isfinite(x).all(); an infinite sum may be
        # overflow, so only then are pixels checked one by one. NumPy on CPU: torch's thread pool would
        # compete with the teacher's for the cores.
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported below, precisely
            total = x.numpy().sum() if x.device.type == "cpu" else x.sum()
        if x.numel() and not np.isfinite(float(total)):
            bad = (~torch.isfinite(x)).flatten(1).any(dim=1).nonzero().flatten()[:5].tolist()
            if bad:
                raise InputError(f"images contain NaN or inf (first bad images: {bad}); nothing was sent to the teacher")
        return x

    @staticmethod
    def _validate_ids(ids, n: int) -> np.ndarray | None:
        if ids is None:
            return None
        ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"expected ids as {n} integers (one per image), got shape {ids.shape} dtype {ids.dtype}")
        if n and ids.min() < 0:
            raise InputError(f"ids must be non-negative, got {int(ids.min())}")
        return ids.astype(np.int64, copy=False)

    def _check_labels(self, labels, n: int) -> torch.Tensor:
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TeacherError(f"teacher {self.name} returned something that is not an array of labels: {e}") from e
        if labels.shape != (n,):
            raise TeacherError(f"teacher {self.name} returned {tuple(labels.shape)} labels for {n} images; expected ({n},)")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TeacherError(f"teacher {self.name} returned labels of dtype {labels.dtype}; expected integers")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise TeacherError(
                f"teacher {self.name} returned labels in [{int(labels.min())}, {int(labels.max())}]; "
                f"expected classes in [0, {self.num_classes})"
            )
        return labels.to(torch.int64)

    def _count(self, start: int, k: int, id_array: np.ndarray | None) -> int:
        """Count the images start..start+k of the current call as sent; returns k."""
        self.queries += k
        if id_array is not None:
            self._count_ids(id_array[start:start + k])
        return k

    def _count_answered(self, start: int, error: DB3KDError, size: int, id_array: np.ndarray | None) -> int:
        """Count the images of a failed chunk (of `size`, at `start`) that the error says were answered: its
        first `answered`, or those at `answered_at` when requests in flight together left others unanswered."""
        if error.answered_at is None:
            return self._count(start, min(error.answered, size), id_array)
        at = np.unique(np.asarray(error.answered_at, dtype=np.int64))
        at = at[(at >= 0) & (at < size)]
        self.queries += len(at)
        if id_array is not None:
            self._count_ids(id_array[start + at])
        return len(at)

    def _count_ids(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        top = int(ids.max()) + 1
        if top > len(self._per_sample):
            grown = np.zeros(max(top, 2 * len(self._per_sample)), dtype=np.int64)
            grown[: len(self._per_sample)] = self._per_sample
            self._per_sample = grown
        np.add.at(self._per_sample, ids, 1)

    def __repr__(self) -> str:
        return f"LabelOracle({self.name!r}, queries={self.queries}, budget={self.budget})"


# Above this, a class count is a broken teacher, not a task (the (N, K) distance arrays alone would not fit).
MAX_CLASSES = 100_000


def _check_contract(backend: LabelBackend) -> None:
    """Refuse a backend whose declared contract no image or label array could follow."""
    shape, k, bounds = backend.input_shape, backend.num_classes, backend.bounds
    if not (isinstance(k, (int, np.integer)) and 2 <= k <= MAX_CLASSES):
        raise TeacherError(f"teacher {backend.name} declares {k!r} classes; expected between 2 and {MAX_CLASSES:,}")
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and 0 < s <= 65_536 for s in shape):
        raise TeacherError(f"teacher {backend.name} declares input shape {shape!r}; expected (C, H, W) of positive sizes")
    if not (len(bounds) == 2 and np.isfinite(bounds).all() and bounds[0] < bounds[1]):
        raise TeacherError(f"teacher {backend.name} declares pixel bounds {bounds!r}; expected finite [lo, hi], lo < hi")


def _clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """`x` clipped to [lo, hi], as a new tensor (NumPy on CPU, for the reason given in `_validate`)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.clip(x.numpy(), lo, hi))
    return x.clamp(lo, hi)


def open_oracle(spec, budget: int | None = None, chunk_size: int | None = None, ledger: QueryLedger | None = None,
                api_key: str | None = None, price_per_1000: float | None = None, budget_usd: float | None = None,
                **options) -> LabelOracle:
    """A `LabelOracle` over the teacher `spec` (a path, URL, `TeacherSpec`, callable, module or backend: see
    `db3kd.teachers.load_teacher`); `ledger`: a budget shared with other oracles.

    `price_per_1000` and `budget_usd` default to the spec's (`--price-per-1000`, `--budget-usd`); a money budget
    becomes a query budget, `floor(budget_usd / price_per_1000 * 1000)`, and the smaller of it and `budget` holds.
    """
    from .teachers import TeacherSpec, load_teacher

    if isinstance(spec, TeacherSpec):
        price_per_1000 = spec.price_per_1000 if price_per_1000 is None else price_per_1000
        budget_usd = spec.budget_usd if budget_usd is None else budget_usd
    if budget_usd is not None:
        bought = queries_for_usd(budget_usd, price_per_1000)
        budget = bought if budget is None else min(budget, bought)
    return LabelOracle(load_teacher(spec, api_key=api_key, **options), budget=budget, chunk_size=chunk_size,
                       ledger=ledger, price_per_1000=price_per_1000)


def queries_for_usd(usd: float, price_per_1000: float | None) -> int:
    """How many queries `usd` buys at `price_per_1000` USD per 1000 images: floor(usd / price * 1000), computed on
    the decimals as written (0.3 USD at 0.1 per 1000 buys 3000, not 2999)."""
    if price_per_1000 is None:
        raise InputError(f"a budget of {usd!r} USD needs the teacher's price: pass price_per_1000 (--price-per-1000 "
                         "on the command line), in USD per 1000 images")
    if not 0 <= usd < float("inf") or not 0 < price_per_1000 < float("inf"):
        raise InputError(f"expected a non-negative USD budget and a positive price per 1000 images, got {usd!r} USD "
                         f"at {price_per_1000!r}")
    return int(Fraction(repr(float(usd))) * 1000 // Fraction(repr(float(price_per_1000))))
