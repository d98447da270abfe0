"""load_split and load_dataset: one entry point for every dataset in DATASETS."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from db3kd.data import cifar, digits, mnist
from db3kd.data.paths import resolve_data_dir
from db3kd.data.registry import DatasetInfo, check_split, dataset_info
from db3kd.errors import ConfigError


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays element-wise has no single truth value
class Dataset:
    """A dataset's description and both splits: x (N, C, H, W) float32 in [0, 1], y (N,) int64."""

    info: DatasetInfo
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)


def load_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return x (N, C, H, W) float32 in [0, 1], C-contiguous, and y (N,) int64 of one split.

    Args:
        name: one of DATASETS.
        split: 'train' or 'test'. Loading 'test' never opens the training files, so it works without them.
        data_dir: where datasets live; see resolve_data_dir. Unused by 'digits', which ships with scikit-learn.
        download: fetch missing files from the official mirrors (checksums verified). With False, missing
            files raise DataError naming the directory and files looked for.

    Raises:
        ConfigError: unknown name or split, or an argument of the wrong type.
        DataError: files missing, corrupt, or not the official ones; or the download failed.
    """
    dataset_info(name)
    check_split(split)
    if not isinstance(download, bool):
        raise ConfigError(f"download must be True or False, got {download!r}")
    root = resolve_data_dir(data_dir)
    if name == "digits":
        return digits.load_split(split)
    if name == "cifar10":
        return cifar.load_split(split, root, download=download)
    return mnist.load_split(name, split, root, download=download)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """Return both splits of dataset `name`; arguments and errors as for load_split."""
    info = dataset_info(name)
    x_train, y_train = load_split(name, "train", data_dir, download=download)
    x_test, y_test = load_split(name, "test", data_dir, download=download)
    return Dataset(info, x_train, y_train, x_test, y_test)
