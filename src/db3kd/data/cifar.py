"""CIFAR-10 from the official python pickles or from an .npz of arrays.

Looked for, first match wins: DATA_DIR/cifar10/cifar-10-batches-py/, DATA_DIR/cifar10/cifar10.npz,
DATA_DIR/cifar-10-batches-py/, DATA_DIR/cifar10.npz. Failing those, the official archive
DATA_DIR/cifar10/cifar-10-python.tar.gz is extracted (downloaded first if allowed and absent).

The official batches are pickles, and unpickling a file can run arbitrary code. They are read with an
unpickler that only builds NumPy arrays, which blocks the usual exploits, but only load CIFAR files
from a source you trust. The .npz route uses no pickle at all (allow_pickle=False).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from db3kd.data import download as dl
from db3kd.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# md5 of the archive, as published on https://www.cs.toronto.edu/~kriz/cifar.html
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
NPZ = "cifar10.npz"
SPLIT_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

_SHAPE = (3, 32, 32)
_NUM_CLASSES = 10


def candidates(root: Path) -> list[Path]:
    """The places CIFAR-10 is looked for under `root`, in order."""
    return [root / "cifar10" / BATCHES_DIR, root / "cifar10" / NPZ, root / BATCHES_DIR, root / NPZ]


def load_split(split: str, root: Path, *, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return x (N, 3, 32, 32) float32 in [0, 1] and y (N,) int64 of `split`, reading only that split."""
    source = _find(root) or _install(root, download=download)
    if source.suffix == ".npz":
        return _load_npz(source, split)
    return _load_batches(source, split)


def _find(root: Path) -> Path | None:
    for path in candidates(root):
        if path.is_file() if path.suffix == ".npz" else path.is_dir():
            return path
    return None


# --- installing from the official archive ---


def _install(root: Path, *, download: bool) -> Path:
    """Extract the official archive into root/cifar10/, downloading it first if allowed and absent."""
    folder = root / "cifar10"
    archive = folder / ARCHIVE
    looked = "\n  ".join(str(p) for p in [*candidates(root), archive])
    by_hand = (
        f"Place {URL} in {folder} (it is extracted on first use), or its extracted {BATCHES_DIR}/ there, "
        f"or an .npz with arrays x_train, y_train, x_test, y_test as {folder / NPZ}."
    )
    if archive.is_file():
        _check_archive(archive)
    elif not download:
        raise DataError(f"CIFAR-10 not found; looked for:\n  {looked}\nPass download=True, or: {by_hand}")
    else:
        try:
            dl.fetch([URL], archive, digest=MD5, algorithm="md5")
        except DataError as exc:
            raise DataError(
                f"CIFAR-10 not found (looked for:\n  {looked}\n) and the download failed: {exc}\n{by_hand}"
            ) from None
    _extract(archive, folder)
    return folder / BATCHES_DIR


def _check_archive(archive: Path) -> None:
    try:
        digest = dl.file_digest(archive, "md5")
    except OSError as exc:
        raise DataError(f"cannot read {archive}: {exc.strerror or exc}") from None
    if digest != MD5:
        raise DataError(
            f"{archive} is not the official CIFAR-10 archive: its md5 is {digest}, expected {MD5}. "
            f"Delete it so that it is downloaded again, or replace it with the official file."
        )


def _extract(archive: Path, folder: Path) -> None:
    """Extract the archive's cifar-10-batches-py/ into `folder`, refusing links and paths that escape it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            # Extract beside the target and rename, so an interrupted extraction leaves nothing half-done.
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
            try:
                # The "data" filter (Python >= 3.11.4) re-checks what _check_member checked.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **kwargs)
                if not (staging / BATCHES_DIR).is_dir():
                    raise DataError(f"{archive} holds no {BATCHES_DIR}/; it is not the CIFAR-10 archive")
                os.replace(staging / BATCHES_DIR, folder / BATCHES_DIR)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"cannot extract {archive}: {exc}. If the archive is damaged, delete it so that it is downloaded again."
        ) from None


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    path = PurePosixPath(member.name)
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive} holds {member.name!r}, a link or special file; refusing to extract it")
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (BATCHES_DIR,):
        raise DataError(f"{archive} holds {member.name!r}, outside {BATCHES_DIR}/; refusing to extract it")


# --- the official pickled batches ---


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild NumPy arrays: the official batches need nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # NumPy 1 names, used by the official files
        ("numpy._core.multiarray", "_reconstruct"),  # NumPy 2 names
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def _load_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = SPLIT_BATCHES[split]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 {split} data incomplete: {folder} lacks {', '.join(missing)}. "
            f"Re-extract the official archive {ARCHIVE} there."
        )
    batches = [_read_batch(folder / name) for name in names]
    count = sum(len(labels) for _, labels in batches)
    x = np.empty((count, *_SHAPE), dtype=np.float32)  # the only full-size allocation
    y = np.empty(count, dtype=np.int64)
    start = 0
    for data, labels in batches:
        stop = start + len(labels)
        # Each 3072-value row is the R, G and B planes of a 32x32 image, so (3, 32, 32) in C order.
        np.divide(data.reshape(-1, *_SHAPE), np.float32(255), out=x[start:stop])
        y[start:stop] = labels
        start = stop
    return x, y


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the (N, 3072) uint8 data and (N,) labels of one pickled batch."""
    fix = "Delete it and re-extract the official archive."
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 -- unpickling garbage can raise almost any exception type
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}). {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with keys b'data' and b'labels'. {fix}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is a {got}; expected a uint8 array of shape (N, 3072). {fix}")
    return data, _check_labels(batch[b"labels"], len(data), f"{path}: b'labels'")


# --- an .npz of arrays ---


def _load_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_key, y_key = f"x_{split}", f"y_{split}"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array; expected an .npz with x_train, y_train, x_test, y_test")
    with archive:
        missing = [key for key in (x_key, y_key) if key not in archive.files]
        if missing:
            raise DataError(
                f"{path} lacks {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'}); "
                f"expected arrays x_train, y_train, x_test, y_test"
            )
        try:
            images, labels = archive[x_key], archive[y_key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{path}: cannot read {x_key} or {y_key}: {exc}") from None
    x = _images_to_float(images, f"{path}: {x_key}")
    return x, _check_labels(labels, len(x), f"{path}: {y_key}")


def _images_to_float(images: np.ndarray, where: str) -> np.ndarray:
    """Return (N, 3, 32, 32) float32 in [0, 1] from NHWC or NCHW images, uint8 0..255 or float in [0, 1]."""
    if images.ndim == 4 and images.shape[1:] == (32, 32, 3):
        images = images.transpose(0, 3, 1, 2)  # a view; the copy below makes it C-contiguous
    elif images.ndim != 4 or images.shape[1:] != _SHAPE:
        raise DataError(f"{where} has shape {images.shape}; expected (N, 32, 32, 3) or (N, 3, 32, 32)")
    x = np.empty(images.shape, dtype=np.float32)
    if images.dtype == np.uint8:
        np.divide(images, np.float32(255), out=x)
    elif np.issubdtype(images.dtype, np.floating):
        np.copyto(x, images, casting="same_kind")
        low, high = (x.min(), x.max()) if x.size else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise DataError(
                f"{where} is {images.dtype} with values in [{low}, {high}]; float images must lie in [0, 1] "
                f"(store 0..255 values as uint8)"
            )
    else:
        raise DataError(f"{where} has dtype {images.dtype}; expected uint8 (0..255) or float in [0, 1]")
    return x


def _check_labels(labels: object, count: int, where: str) -> np.ndarray:
    """Return `labels` as (count,) int64 in 0..9, accepting shape (count, 1) as Keras saves them."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(f"{where} is {y.dtype} of shape {y.shape}; expected {count} integer labels, one per image")
    if count and (y.min() < 0 or y.max() >= _NUM_CLASSES):
        raise DataError(f"{where} holds labels in [{y.min()}, {y.max()}]; expected 0..{_NUM_CLASSES - 1}")
    return y.astype(np.int64)
