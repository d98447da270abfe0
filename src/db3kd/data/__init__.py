"""Datasets as arrays: x (N, C, H, W) float32 in [0, 1] and y (N,) int64.

    >>> from db3kd.data import load_split
    >>> x, y = load_split("mnist", "test", "/path/to/data")  # reads data/mnist/t10k-*.gz

Files are found under a data directory (see resolve_data_dir) and downloaded there, checksums
verified, when missing. 'digits' ships with scikit-learn and needs neither.
"""

from db3kd.data.load import Dataset, load_dataset, load_split
from db3kd.data.paths import resolve_data_dir
from db3kd.data.registry import DATASETS, DatasetInfo, dataset_info, split_size

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "dataset_info",
    "split_size",
    "load_dataset",
    "load_split",
    "resolve_data_dir",
]
