"""Files written atomically: complete or absent, never half-written, flushed to disk before they count."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import ConfigError, DataError


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


def load_npz(path: str | os.PathLike, remedy: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; an unreadable one is a DataError naming the file and `remedy`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise DataError(f"{path} not found; {remedy}") from None
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, zipfile.BadZipFile, zlib.error: a damaged file
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); {remedy}") from None


def load_json(path: str | os.PathLike, remedy: str) -> dict:
    """A JSON file's content; a missing or unreadable one is a DataError naming the file and `remedy`."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found; {remedy}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); {remedy}") from None


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold `directory` for this process alone while inside (a file lock that dies with its process, kill -9
    included): a second db3kd process on it is refused, with a message naming the first (pid, host)."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{directory} is a file; expected a directory for the results (choose another --out)")
    directory.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(directory / ".lock", timeout=0), directory / ".lock.owner"
    try:
        lock.acquire()
    except Timeout:
        try:
            first = json.loads(owner.read_text())
        except (OSError, ValueError):
            first = {}
        raise ConfigError(
            f"{directory} is in use by another db3kd process (pid {first.get('pid', '?')} on host "
            f"{first.get('host', '?')}, since {first.get('since', '?')}); two writers would pay for the same work "
            "twice: wait for it to finish or stop it, or write elsewhere") from None
    try:
        write_json(owner, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield directory
    finally:
        lock.release()


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
