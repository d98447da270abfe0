"""Any Python callable as a teacher: `--teacher python:package.module:function` (or `module:Class`).

This is how a user wraps a vendor API with its own auth and encoding. The callable (or object) declares its
contract in attributes, read once when the teacher is loaded:

| attribute | | meaning |
| --- | --- | --- |
| `input_shape` | required | `(C, H, W)` of one image |
| `num_classes` or `classes` | required | K, or the K class names (`str`) in index order; both: they must agree |
| `bounds` | required | `(lo, hi)`, the pixel range |
| `preferred_batch` | optional | most images per call (default 256) |
| `identity` / `version` | optional | what tells this teacher from another, recorded in runs' fingerprints |

It is called with a NumPy float32 array (N, C, H, W), pixels already clipped to `bounds`, and returns N
labels: class indices (integers) or, with `classes`, class names. A class `module:Class` is instantiated with
no arguments; an object may be callable or have `predict_labels(batch)`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DB3KDError, TeacherError
from .dispatch import Dispatcher, RatePacer, check_rate

DEFAULT_PREFERRED_BATCH = 256
PREFIX = "python:"


def resolve(path: str):
    """The object `path` names ("package.module:attribute", the attribute possibly dotted), imported."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected a Python teacher as python:package.module:function or python:module:Class, "
                          f"got {PREFIX}{path!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise TeacherError(f"cannot import {module_name!r} for the Python teacher {PREFIX}{path}: {e}. Install it, "
                           "or put its folder on PYTHONPATH") from e
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise TeacherError(f"{module_name} has no {attribute!r} (the Python teacher {PREFIX}{path})") from None
    return target


def identity_of(path: str, target) -> str:
    """A Python teacher's identity: its `module:attribute` path, plus its own `identity` and `version` if set."""
    own = [f"{key}={getattr(target, key)}" for key in ("identity", "version") if getattr(target, key, None) is not None]
    return " ".join([PREFIX + path, *own])


def path_of(target) -> str:
    """`module:qualname` of a function, or of an object's class."""
    named = target if hasattr(target, "__qualname__") else type(target)
    return f"{named.__module__}:{named.__qualname__}"


class PythonBackend:
    """Labels from a Python callable or object that declares its contract (see the module's docstring).

    With `concurrency` N a batch is split into N pieces and the callable called from N threads at once (it
    must then be thread-safe); `max_rps` spaces the calls to at most that many per second (and then calls
    are filled up to `preferred_batch` images before more are made).

    If the callable raises, the error is a `TeacherError` and the call's images are not counted (whether the
    vendor billed them is the callable's to say: raise a db3kd `TeacherError` with `answered` set). Once it
    has answered, its images are counted, even if the answer is wrong (not N labels, a name not in `classes`).

    Args:
        target: the callable, or an object with `predict_labels`; a class is instantiated with no arguments.
        path: `module:attribute` it was loaded from (default: the target's own).
        concurrency: calls in flight at once.
        max_rps: most calls started per second; None for no limit.
    """

    def __init__(self, target, path: str | None = None, concurrency: int = 1, max_rps: float | None = None):
        path = path or path_of(target)
        if isinstance(target, type):
            try:
                target = target()
            except Exception as e:
                raise TeacherError(f"cannot create the Python teacher {PREFIX}{path} with no arguments: "
                                   f"{type(e).__name__}: {e}") from e
        self.name = PREFIX + path
        predict = getattr(target, "predict_labels", target)
        if not callable(predict):
            raise TeacherError(f"the Python teacher {self.name}: expected a callable or an object with "
                               f"predict_labels(batch), got {type(target).__name__}")
        self._predict: Callable = predict
        self.input_shape = _declared(target, self.name, "input_shape", _shape, "(C, H, W) of positive sizes",
                                     "(1, 28, 28)")
        self.bounds = _declared(target, self.name, "bounds", _bounds, "(lo, hi) with lo < hi", "(0.0, 1.0)")
        self.classes, self.num_classes = _classes(target, self.name)
        self._index = None if self.classes is None else {name: i for i, name in enumerate(self.classes)}
        batch = getattr(target, "preferred_batch", DEFAULT_PREFERRED_BATCH)
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise TeacherError(f"the Python teacher {self.name}: expected preferred_batch as a positive integer, "
                               f"got {batch!r}")
        self.batch_limit = int(batch)
        self.dispatcher = Dispatcher(self.name, concurrency)
        self.preferred_batch = self.batch_limit * self.dispatcher.concurrency
        self.max_rps = check_rate(max_rps)
        self._pacer = None if self.max_rps is None else RatePacer(self.max_rps)
        self.identity = identity_of(path, target)

    @classmethod
    def from_path(cls, path: str, **options) -> "PythonBackend":
        """The teacher `python:` + `path` names (see `resolve`)."""
        return cls(resolve(path), path=path, **options)

    @property
    def concurrency(self) -> int:
        return self.dispatcher.concurrency

    def predict_labels(self, x: torch.Tensor) -> np.ndarray:
        images = x.detach().cpu().numpy()
        size = self.dispatcher.piece_size(len(images), self.batch_limit, fill=self.max_rps is not None)
        return self.dispatcher.run(images, size, self._call)

    def _call(self, images: np.ndarray) -> np.ndarray:
        if self._pacer is not None:
            self._pacer.wait()
        try:
            answer = self._predict(images)
        except DB3KDError:
            raise
        except Exception as e:
            raise TeacherError(f"the Python teacher {self.name} raised {type(e).__name__}: {e}; its "
                               f"{len(images)} images were not counted") from e
        try:
            return self._indices(answer)
        except TeacherError as error:
            error.answered = len(images)  # it did answer: those queries happened
            raise

    def _indices(self, answer) -> np.ndarray:
        """The answer as an array of class indices (names mapped through `classes`); the oracle checks the rest."""
        if isinstance(answer, torch.Tensor):
            answer = answer.detach().cpu().numpy()
        try:
            labels = np.atleast_1d(np.asarray(answer))
        except ValueError as e:
            raise TeacherError(f"the Python teacher {self.name} returned something that is not an array of "
                               f"labels: {e}") from None
        names = labels.dtype.kind == "U" or (labels.dtype == object and all(isinstance(v, str) for v in labels.flat))
        if not names:
            return labels
        if self._index is None:
            raise TeacherError(f"the Python teacher {self.name} returned class names (e.g. {str(labels.flat[0])!r}) but "
                               "declares no classes: set its classes attribute to the class names in index order")
        unknown = sorted({str(v) for v in labels.flat if str(v) not in self._index})
        if unknown:
            raise TeacherError(f"the Python teacher {self.name} returned {unknown[:5]}, not among its classes "
                               f"{list(self.classes)[:20]}; expected one of those names per image")
        return np.array([self._index[str(v)] for v in labels.flat], dtype=np.int64).reshape(labels.shape)

    def close(self) -> None:
        """Stop the call threads."""
        self.dispatcher.close()

    def __repr__(self) -> str:
        return f"PythonBackend({self.name!r})"


def _declared(target, name: str, attribute: str, parse, expected: str, example: str):
    value = getattr(target, attribute, None)
    if value is None:
        raise TeacherError(f"the Python teacher {name} declares no {attribute}: expected an attribute {attribute} = "
                           f"{expected} on the function or object, e.g. {attribute} = {example}")
    parsed = parse(value)
    if parsed is None:
        raise TeacherError(f"the Python teacher {name}: expected {attribute} = {expected}, got {value!r}")
    return parsed


def _shape(value) -> tuple[int, int, int] | None:
    try:
        shape = tuple(value)
    except TypeError:
        return None
    ok = len(shape) == 3 and all(not isinstance(s, bool) and isinstance(s, (int, np.integer)) and s > 0 for s in shape)
    return tuple(int(s) for s in shape) if ok else None


def _bounds(value) -> tuple[float, float] | None:
    try:
        lo, hi = (float(b) for b in value)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None


def _classes(target, name: str) -> tuple[tuple[str, ...] | None, int]:
    """(class names or None, K) from `classes` and/or `num_classes`."""
    classes, k = getattr(target, "classes", None), getattr(target, "num_classes", None)
    if classes is None and k is None:
        raise TeacherError(f"the Python teacher {name} declares neither num_classes nor classes: expected an "
                           "attribute num_classes = K or classes = ['name0', 'name1', ...] on the function or object")
    if classes is not None:
        if isinstance(classes, str) or not isinstance(classes, Sequence) or not all(isinstance(c, str) for c in classes):
            raise TeacherError(f"the Python teacher {name}: expected classes as a list of class names (str), in "
                               f"index order, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise TeacherError(f"the Python teacher {name}: its classes repeat a name: {list(classes)!r}")
        if k is not None and k != len(classes):
            raise TeacherError(f"the Python teacher {name} declares num_classes = {k!r} but {len(classes)} classes")
        return tuple(classes), len(classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TeacherError(f"the Python teacher {name}: expected num_classes as an integer, got {k!r}")
    return None, int(k)
