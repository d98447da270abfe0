"""MNIST and Fashion-MNIST: four official IDX files each, checked against their published sha256.

Files live in DATA_DIR/mnist/ and DATA_DIR/fashion-mnist/ under their official names, gzip-compressed
(`t10k-images-idx3-ubyte.gz`) or not (`t10k-images-idx3-ubyte`). Every read checks the structure and
the sha256 of the decompressed content: hashing costs ~30 ms on the 47 MB we decompress anyway, and
it catches a file that is well-formed but not the official one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from db3kd.data import download as dl
from db3kd.data import idx
from db3kd.errors import DataError

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_COUNT = {"train": 60_000, "test": 10_000}
_SIDE = 28
_NUM_CLASSES = 10

# sha256 of the decompressed files. Not of the .gz: mirrors re-compress, which changes those bytes.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# Tried in order; each serves the four files as <mirror><name>.gz.
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    # The official bucket is plain http only; the sha256 check is what makes the content trustworthy.
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


def load_split(name: str, split: str, root: Path, *, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return x (N, 1, 28, 28) float32 in [0, 1] and y (N,) int64 of `split`, reading only that split's files."""
    folder = root / name
    stems = SPLIT_FILES[split]
    missing = [stem for stem in stems if _find(folder, stem) is None]
    if missing and not download:
        raise DataError(
            f"{name} {split} data not found in {folder}: looked for {_gz_names(missing)} "
            f"(gzip-compressed or not). Pass download=True, or place the official files there by hand."
        )
    if missing:
        _download(name, folder, missing)
    images_path, labels_path = (_find(folder, stem) for stem in stems)
    count = _COUNT[split]
    images = _read_verified(name, images_path, (count, _SIDE, _SIDE))
    labels = _read_verified(name, labels_path, (count,))

    x = np.empty((count, 1, _SIDE, _SIDE), dtype=np.float32)  # the only full-size allocation
    np.divide(images[:, None], np.float32(255), out=x)  # a float32 divisor keeps the loop in float32
    return x, labels.astype(np.int64)


def _find(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _gz_names(stems: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"{stem}.gz" for stem in stems)


def _download(name: str, folder: Path, stems: list[str]) -> None:
    for stem in stems:
        urls = [mirror + f"{stem}.gz" for mirror in MIRRORS[name]]
        try:
            dl.fetch(urls, folder / f"{stem}.gz", digest=SHA256[name][stem], gunzip=True)
        except DataError as exc:
            raise DataError(
                f"{name} data not found in {folder} (looked for {_gz_names(stems)}) and the download failed: "
                f"{exc}\nWithout network access, copy those files from another machine into {folder}; "
                f"they are at {MIRRORS[name][0]}<file name>."
            ) from None


def _read_verified(name: str, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read the uint8 IDX file at `path` and check its shape, labels and sha256 against the official file."""
    stem = path.name.removesuffix(".gz")
    try:
        data = idx.read_bytes(path)
        array = idx.parse(data, path)
        if array.dtype != np.uint8 or array.shape != shape:
            raise DataError(
                f"{path} holds {array.dtype} values of shape {array.shape}; expected uint8 of shape {shape}"
            )
        if array.ndim == 1 and array.max(initial=0) >= _NUM_CLASSES:
            raise DataError(f"{path} holds label {array.max()}; expected labels 0..{_NUM_CLASSES - 1}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name][stem]:
            raise DataError(
                f"{path} is not the official {name} file: the sha256 of its decompressed content is {digest}, "
                f"expected {SHA256[name][stem]}"
            )
    except DataError as exc:
        raise DataError(
            f"{exc}. Delete {path} so that it is downloaded again, or replace it with the official file."
        ) from None
    return array
