"""Files written atomically: complete or absent, never half-written, flushed to disk before they count."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share one
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """`payload` as indented JSON (NumPy scalars, arrays, tuples and paths converted)."""
    return write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """`np.savez` (uncompressed: shards and results are written often and read whole)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
