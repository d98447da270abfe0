"""The datasets db3kd knows, with their shapes and class names. No I/O happens here."""

from __future__ import annotations

from dataclasses import dataclass

from db3kd.errors import ConfigError

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "digits")
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before seeing any of it."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int
    class_names: tuple[str, ...]


_DIGIT_NAMES = tuple(str(i) for i in range(10))

_INFOS = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, _DIGIT_NAMES),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        (1, 28, 28),
        10,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        (3, 32, 32),
        10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, _DIGIT_NAMES),
}


# Images per split, for planning without reading the files (digits: db3kd's own fixed split).
_SPLIT_SIZES = {"mnist": (60_000, 10_000), "fashion-mnist": (60_000, 10_000), "cifar10": (50_000, 10_000),
                "digits": (1_438, 359)}


def split_size(name: str, split: str) -> int:
    """The number of images in `split` of dataset `name` (no file is read)."""
    dataset_info(name)
    check_split(split)
    return _SPLIT_SIZES[name][SPLITS.index(split)]


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(repr(n) for n in names)


def dataset_info(name: str) -> DatasetInfo:
    """Return the shape and classes of dataset `name`; raise ConfigError for an unknown name."""
    if not isinstance(name, str) or name not in _INFOS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {_quoted(DATASETS)}")
    return _INFOS[name]


def check_split(split: str) -> None:
    """Raise ConfigError unless `split` is 'train' or 'test'."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {_quoted(SPLITS)}")
