"""Tests of db3kd.data. No network: an autouse fixture refuses every non-loopback connection."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import tarfile
import threading
from dataclasses import FrozenInstanceError
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from db3kd.data import (
    DATASETS,
    Dataset,
    DatasetInfo,
    dataset_info,
    load_dataset,
    load_split,
    resolve_data_dir,
)
from db3kd.data import cifar, download, idx, mnist
from db3kd.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")

# Per-class counts of the official files.
MNIST_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FASHION_COUNTS = {"train": [6000] * 10, "test": [1000] * 10}
FIRST_LABELS = {
    ("mnist", "train"): [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    ("mnist", "test"): [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
    ("fashion-mnist", "train"): [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
    ("fashion-mnist", "test"): [9, 2, 1, 1, 6, 1, 4, 6, 5, 7],
}

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --- fixtures and helpers ---


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that tries to reach a host other than this machine."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK:
            raise OSError(f"network access disabled in tests (lookup of {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise OSError(f"network access disabled in tests (connect to {address!r})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("DB3KD_DATA", raising=False)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (expected ../shared/data beside the project)")
    return SHARED_DATA


@pytest.fixture
def mnist_test_only(shared_data, tmp_path) -> Path:
    """A data dir holding only MNIST's two official test files."""
    (tmp_path / "mnist").mkdir()
    for stem in TEST_FILES:
        shutil.copy(shared_data / "mnist" / f"{stem}.gz", tmp_path / "mnist")
    return tmp_path


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve tmp_path/'served' on 127.0.0.1; yields (base URL, served directory)."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not intercept loopback
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()
    thread.join()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def official_bytes(name: str, stem: str) -> bytes:
    return gzip.decompress((SHARED_DATA / name / f"{stem}.gz").read_bytes())


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)  # level 9 takes seconds on the image files


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".*.part")]


# --- names, info, data directory ---


@pytest.mark.parametrize(
    "name, shape, first_class",
    [
        ("mnist", (1, 28, 28), "0"),
        ("fashion-mnist", (1, 28, 28), "T-shirt/top"),
        ("cifar10", (3, 32, 32), "airplane"),
        ("digits", (1, 8, 8), "0"),
    ],
)
def test_dataset_info(name, shape, first_class):
    info = dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.input_shape, info.num_classes) == (name, shape, 10)
    assert len(info.class_names) == 10 and info.class_names[0] == first_class


def test_datasets_constant_matches_info():
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "digits")
    assert all(dataset_info(name).name == name for name in DATASETS)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: dataset_info("imagenet"), id="dataset_info"),
        pytest.param(lambda: load_split("imagenet", "test"), id="load_split"),
        pytest.param(lambda: load_dataset("imagenet"), id="load_dataset"),
    ],
)
def test_unknown_dataset_lists_known_names(call):
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; expected one of 'mnist', 'fashion-mnist', "
                                          "'cifar10', 'digits'"):
        call()


def test_bad_split_and_download_arguments():
    with pytest.raises(ConfigError, match="unknown split 'val'; expected one of 'train', 'test'"):
        load_split("digits", "val")
    with pytest.raises(ConfigError, match="download must be True or False, got 'no'"):
        load_split("digits", "test", download="no")


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "db3kd" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore relative paths
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "db3kd" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "db3kd" / "data"
    monkeypatch.setenv("DB3KD_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert resolve_data_dir("~/d") == tmp_path / "home" / "d"


@pytest.mark.parametrize(
    "bad, message",
    [("", "data_dir is an empty string"), (3, "data_dir must be a str, os.PathLike or None, got int")],
)
def test_resolve_data_dir_rejects(bad, message):
    with pytest.raises(ConfigError, match=message):
        resolve_data_dir(bad)


def test_load_split_reads_env_var(monkeypatch, mnist_test_only):
    monkeypatch.setenv("DB3KD_DATA", str(mnist_test_only))
    x, y = load_split("mnist", "test", download=False)
    assert x.shape == (10000, 1, 28, 28) and np.bincount(y).tolist() == MNIST_COUNTS["test"]


# --- MNIST and Fashion-MNIST from the shared official files ---


@pytest.mark.parametrize("split", ["test", "train"])
@pytest.mark.parametrize("name, counts", [("mnist", MNIST_COUNTS), ("fashion-mnist", FASHION_COUNTS)])
def test_official_files_load(shared_data, name, counts, split):
    x, y = load_split(name, split, shared_data, download=False)
    n = sum(counts[split])
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == counts[split]
    assert y[:10].tolist() == FIRST_LABELS[name, split]
    # Pixels are exactly the stored bytes over 255, in the stored order.
    raw = np.frombuffer(official_bytes(name, mnist.SPLIT_FILES[split][0]), np.uint8, offset=16)
    np.testing.assert_array_equal(x[:100].ravel(), raw[: 100 * 784] / np.float32(255))


def test_load_dataset(shared_data):
    data = load_dataset("fashion-mnist", shared_data, download=False)
    assert isinstance(data, Dataset) and data.info == dataset_info("fashion-mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.y_train.shape == (60000,)
    assert data.x_test.shape == (10000, 1, 28, 28) and data.y_test.shape == (10000,)
    assert "x_train" not in repr(data)  # arrays stay out of the repr
    with pytest.raises(FrozenInstanceError):
        data.x_train = data.x_test


def test_test_split_needs_no_train_files(mnist_test_only):
    x, y = load_split("mnist", "test", mnist_test_only, download=False)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"):
        load_split("mnist", "train", mnist_test_only, download=False)


def test_test_split_never_reads_train_files(mnist_test_only):
    for stem in TRAIN_FILES:  # reading either would raise
        (mnist_test_only / "mnist" / f"{stem}.gz").write_bytes(b"garbage")
    x, _ = load_split("mnist", "test", mnist_test_only, download=False)
    assert x.shape == (10000, 1, 28, 28)


def test_uncompressed_files_accepted(mnist_test_only):
    x_gz, y_gz = load_split("mnist", "test", mnist_test_only, download=False)
    for stem in TEST_FILES:
        packed = mnist_test_only / "mnist" / f"{stem}.gz"
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    x, y = load_split("mnist", "test", mnist_test_only, download=False)
    np.testing.assert_array_equal(x, x_gz)
    np.testing.assert_array_equal(y, y_gz)


@pytest.mark.parametrize(
    "present, missing",
    [((), TEST_FILES), (TEST_FILES[:1], TEST_FILES[1:])],
    ids=["none", "labels-only"],
)
def test_missing_files_without_download(shared_data, tmp_path, present, missing):
    (tmp_path / "mnist").mkdir()
    for stem in present:
        shutil.copy(shared_data / "mnist" / f"{stem}.gz", tmp_path / "mnist")
    with pytest.raises(DataError) as excinfo:
        load_split("mnist", "test", tmp_path, download=False)
    message = str(excinfo.value)
    assert f"not found in {tmp_path / 'mnist'}" in message
    assert all(f"{stem}.gz" in message for stem in missing)
    assert not any(f"{stem}.gz" in message for stem in present)
    assert "download=True" in message


def _idx(array: np.ndarray, magic: bytes = b"\x00\x00\x08") -> bytes:
    header = magic + bytes([array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _images() -> bytes:
    return official_bytes("mnist", TEST_FILES[0])


def _labels() -> bytes:
    return official_bytes("mnist", TEST_FILES[1])


def _flip_one_pixel() -> bytes:
    data = bytearray(_images())
    data[16 + 300] ^= 0xFF
    return bytes(data)


def _label_ten() -> bytes:
    data = bytearray(_labels())
    data[8] = 10
    return bytes(data)


# (file to corrupt, its raw bytes as written to disk, expected message)
CORRUPTIONS = {
    "truncated-gzip": (0, lambda: gz(_images())[:50_000], r"is a truncated or corrupt gzip file"),
    "garbage-gzip": (0, lambda: b"\x1f\x8b" + bytes(range(256)) * 10, r"is a truncated or corrupt gzip file"),
    "not-gzip": (0, lambda: b"<html>Not Found</html>", r"is named \.gz but is not a gzip file"),
    "bad-magic": (0, lambda: gz(b"\x00\x00\x99\x03" + _images()[4:]), r"bad magic number 0x00009903"),
    "short-header": (0, lambda: gz(b"\x00\x00\x08\x03\x00\x00"), r"shorter than its 16-byte header"),
    "truncated-idx": (0, lambda: gz(_images()[:-784]), r"is truncated: .* 7840016 bytes, but it has 7839232"),
    "trailing-bytes": (1, lambda: gz(_labels() + b"\x00"), r"is longer than its header says"),
    "wrong-count": (
        0,
        lambda: gz(_idx(np.zeros((9999, 28, 28)))),
        r"holds uint8 values of shape \(9999, 28, 28\); expected uint8 of shape \(10000, 28, 28\)",
    ),
    "wrong-dims": (
        1,
        lambda: gz(_idx(np.zeros((10000, 1)))),
        r"shape \(10000, 1\); expected uint8 of shape \(10000,\)",
    ),
    "label-out-of-range": (1, lambda: gz(_label_ten()), r"holds label 10; expected labels 0..9"),
    "not-official": (
        0,
        lambda: gz(_flip_one_pixel()),
        r"is not the official mnist file: the sha256 of its decompressed content is [0-9a-f]{64}, "
        r"expected 0fa7898d",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_file_raises_data_error(mnist_test_only, case):
    which, make, pattern = CORRUPTIONS[case]
    bad = mnist_test_only / "mnist" / f"{TEST_FILES[which]}.gz"
    bad.write_bytes(make())
    with pytest.raises(DataError, match=pattern) as excinfo:
        load_split("mnist", "test", mnist_test_only, download=False)
    assert str(bad) in str(excinfo.value)
    assert f"Delete {bad} so that it is downloaded again" in str(excinfo.value)


def test_idx_parse_other_types():
    data = b"\x00\x00\x0b\x02" + np.array([2, 3], ">u4").tobytes() + np.arange(6, dtype=">i2").tobytes()
    array = idx.parse(data)
    assert array.dtype == np.int16 and array.dtype.isnative
    np.testing.assert_array_equal(array, np.arange(6).reshape(2, 3))


# --- downloads, from a local HTTP server ---


def test_download_tries_mirrors_in_order(shared_data, http_server, tmp_path, monkeypatch):
    base, served = http_server
    for stem in TEST_FILES:  # re-compressed: only the decompressed content must match
        (served / f"{stem}.gz").write_bytes(gz(official_bytes("mnist", stem)))
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (f"{base}/absent/", f"{base}/"))
    data_dir = tmp_path / "data"

    x, y = load_split("mnist", "test", data_dir)

    assert x.shape == (10000, 1, 28, 28) and np.bincount(y).tolist() == MNIST_COUNTS["test"]
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == [f"{stem}.gz" for stem in TEST_FILES]


def test_download_rejects_checksum_mismatch(shared_data, http_server, tmp_path, monkeypatch):
    base, served = http_server
    (served / "bad").mkdir()
    (served / "good").mkdir()
    for stem in TEST_FILES:
        shutil.copy(shared_data / "mnist" / f"{stem}.gz", served / "good")
        (served / "bad" / f"{stem}.gz").write_bytes(gz(b"not mnist"))
    data_dir = tmp_path / "data"

    monkeypatch.setitem(mnist.MIRRORS, "mnist", (f"{base}/bad/",))
    with pytest.raises(DataError) as excinfo:
        load_split("mnist", "test", data_dir)
    message = str(excinfo.value)
    assert f"{base}/bad/t10k-images-idx3-ubyte.gz: sha256 of the decompressed content is" in message
    expected = mnist.SHA256["mnist"]["t10k-images-idx3-ubyte"]
    assert f"expected {expected}; the download was deleted" in message
    assert not (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert leftovers(data_dir / "mnist") == []

    monkeypatch.setitem(mnist.MIRRORS, "mnist", (f"{base}/bad/", f"{base}/good/"))
    x, _ = load_split("mnist", "test", data_dir)
    assert x.shape == (10000, 1, 28, 28)
    assert leftovers(data_dir / "mnist") == []


def test_download_failure_explains_what_to_do(tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{unused_port()}/"
    monkeypatch.setitem(mnist.MIRRORS, "fashion-mnist", (dead,))
    with pytest.raises(DataError) as excinfo:
        load_split("fashion-mnist", "test", tmp_path)
    message = str(excinfo.value)
    assert f"fashion-mnist data not found in {tmp_path / 'fashion-mnist'}" in message
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message
    assert f"{dead}t10k-images-idx3-ubyte.gz: " in message  # the URL tried and why it failed
    assert "copy those files from another machine" in message
    assert leftovers(tmp_path / "fashion-mnist") == []


def test_interrupted_download_leaves_nothing(http_server, tmp_path, monkeypatch):
    base, served = http_server
    (served / "file.bin").write_bytes(b"x" * 1000)
    dest = tmp_path / "out" / "file.bin"

    def cut_short(source, target, length=0):
        assert Path(target.name) != dest  # the bytes go to a temporary file, never straight into dest
        target.write(source.read(10))
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(download, "shutil", SimpleNamespace(copyfileobj=cut_short))
    with pytest.raises(DataError, match=r"file.bin: connection reset by peer"):
        download.fetch([f"{base}/file.bin"], dest, digest=hashlib.sha256(b"x" * 1000).hexdigest())
    assert list(dest.parent.iterdir()) == []


# --- CIFAR-10 from fake files ---


def _fake_cifar(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images as the official batches store them: (n, 3072) uint8 rows, labels 0..9."""
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def _write_batch(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    batch = {b"batch_label": b"fake", b"labels": labels.tolist(), b"data": data, b"filenames": [b"a"] * len(data)}
    # Protocol 2 with NumPy 1 module names, as in the official (Python 2) files.
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def _write_batches(folder: Path, rng: np.random.Generator, n: int = 4, splits=("train", "test")) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        parts = [_fake_cifar(rng, n) for _ in cifar.SPLIT_BATCHES[split]]
        for name, (data, labels) in zip(cifar.SPLIT_BATCHES[split], parts):
            _write_batch(folder / name, data, labels)
        written[split] = (np.concatenate([d for d, _ in parts]), np.concatenate([y for _, y in parts]))
    return written


def _check_cifar(x, y, data, labels):
    n = len(labels)
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    assert x[1, 0, 0, 0] == data[1, 0] / np.float32(255)
    assert x[1, 1, 0, 0] == data[1, 1024] / np.float32(255)
    assert x[-1, 2, 31, 30] == data[-1, 2048 + 31 * 32 + 30] / np.float32(255)
    np.testing.assert_array_equal(x, data.reshape(n, 3, 32, 32) / np.float32(255))


@pytest.mark.parametrize("where", ["cifar10/cifar-10-batches-py", "cifar-10-batches-py"])
def test_cifar_from_pickles(tmp_path, where):
    written = _write_batches(tmp_path / where, np.random.default_rng(0))
    for split in ("train", "test"):
        x, y = load_split("cifar10", split, tmp_path, download=False)
        _check_cifar(x, y, *written[split])
    assert len(written["train"][1]) == 20


def test_cifar_test_split_needs_no_train_batches(tmp_path):
    folder = tmp_path / "cifar10" / cifar.BATCHES_DIR
    written = _write_batches(folder, np.random.default_rng(1), splits=("test",))
    _check_cifar(*load_split("cifar10", "test", tmp_path, download=False), *written["test"])
    missing = ", ".join(f"data_batch_{i}" for i in range(1, 6))
    with pytest.raises(DataError, match=rf"{cifar.BATCHES_DIR} lacks {missing}\. Re-extract"):
        load_split("cifar10", "train", tmp_path, download=False)


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")  # creates the file if the unpickler lets it through


@pytest.mark.parametrize(
    "content, pattern",
    [
        pytest.param(
            lambda t: pickle.dumps(_Exploit(t / "pwned")), r"refusing to load (builtins|io)\.open", id="exploit"
        ),
        pytest.param(lambda t: pickle.dumps({b"data": 1})[:-5], r"not a readable CIFAR-10 batch", id="truncated"),
        pytest.param(lambda t: pickle.dumps([1, 2]), r"a dict with keys b'data' and b'labels'", id="not-dict"),
        pytest.param(
            lambda t: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"b'data' is a uint8 array of shape \(2, 100\); expected a uint8 array of shape \(N, 3072\)",
            id="bad-shape",
        ),
        pytest.param(
            lambda t: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}),
            r"b'labels' holds labels in \[0, 12\]; expected 0..9",
            id="bad-label",
        ),
        pytest.param(
            lambda t: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
            r"expected 2 integer labels, one per image",
            id="count-mismatch",
        ),
    ],
)
def test_cifar_bad_batch(tmp_path, content, pattern):
    folder = tmp_path / "cifar10" / cifar.BATCHES_DIR
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(content(tmp_path))
    with pytest.raises(DataError, match=pattern) as excinfo:
        load_split("cifar10", "test", tmp_path, download=False)
    assert str(folder / "test_batch") in str(excinfo.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "layout, dtype",
    [("nhwc", np.uint8), ("nchw", np.uint8), ("nhwc", np.float32), ("nchw", np.float64)],
)
@pytest.mark.parametrize("at", ["cifar10/cifar10.npz", "cifar10.npz"])
def test_cifar_from_npz(tmp_path, layout, dtype, at):
    rng = np.random.default_rng(2)
    arrays, expected = {}, {}
    for split, n in (("train", 6), ("test", 3)):
        data, labels = _fake_cifar(rng, n)
        nchw = data.reshape(n, 3, 32, 32)
        images = nchw if layout == "nchw" else nchw.transpose(0, 2, 3, 1)
        arrays[f"x_{split}"] = images if dtype == np.uint8 else (images / 255).astype(dtype)
        arrays[f"y_{split}"] = labels[:, None] if split == "test" else labels  # Keras saves labels as (N, 1)
        expected[split] = (data, labels)
    path = tmp_path / at
    path.parent.mkdir(exist_ok=True)
    np.savez(path, **arrays)
    for split in ("train", "test"):
        x, y = load_split("cifar10", split, tmp_path, download=False)
        data, labels = expected[split]
        np.testing.assert_array_equal(y, labels)
        assert x.shape == (len(labels), 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
        np.testing.assert_allclose(x, data.reshape(-1, 3, 32, 32) / 255, rtol=0, atol=1e-7)


GOOD_X, GOOD_Y = np.zeros((2, 3, 32, 32), np.uint8), [0, 1]
# id: (x_test, y_test or None to leave it out, expected message)
BAD_NPZ = {
    "int64": (GOOD_X.astype(np.int64), GOOD_Y, r"x_test has dtype int64; expected uint8 \(0..255\) or float"),
    "float-255": (np.full_like(GOOD_X, 255.0, float), GOOD_Y, r"float64 with values in \[255.0, 255.0\]; float"),
    "nan": (np.full_like(GOOD_X, np.nan, float), GOOD_Y, r"values in \[nan, nan\]"),
    "3d": (np.zeros((2, 32, 32)), GOOD_Y, r"shape \(2, 32, 32\); expected \(N, 32, 32, 3\) or \(N, 3, 32, 32\)"),
    "float-labels": (GOOD_X, [0.0, 1.0], r"y_test is float64 of shape \(2,\); expected 2 integer labels"),
    "label-10": (GOOD_X, [0, 10], r"y_test holds labels in \[0, 10\]"),
    "missing-key": (GOOD_X, None, r"lacks y_test \(it holds x_test\)"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_cifar_bad_npz(tmp_path, case):
    x_test, y_test, pattern = BAD_NPZ[case]
    arrays = {"x_test": x_test} if y_test is None else {"x_test": x_test, "y_test": np.array(y_test)}
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=pattern):
        load_split("cifar10", "test", tmp_path, download=False)


def test_cifar_npz_not_a_zip(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"junk" * 100)
    with pytest.raises(DataError, match=r"cifar10.npz is not a readable .npz file"):
        load_split("cifar10", "test", tmp_path, download=False)


def test_cifar_missing_lists_every_place(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", "test", tmp_path, download=False)
    message = str(excinfo.value)
    for path in [*cifar.candidates(tmp_path), tmp_path / "cifar10" / cifar.ARCHIVE]:
        assert str(path) in message
    assert "download=True" in message and cifar.URL in message


def _tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _cifar_archive(rng: np.random.Generator, tmp_path: Path) -> tuple[bytes, dict]:
    staging = tmp_path / "staging"
    written = _write_batches(staging, rng, n=2)
    members = {f"{cifar.BATCHES_DIR}/{p.name}": p.read_bytes() for p in sorted(staging.iterdir())}
    return _tar_gz(members), written


def test_cifar_download_and_extract(http_server, tmp_path, monkeypatch):
    base, served = http_server
    archive, written = _cifar_archive(np.random.default_rng(3), tmp_path)
    (served / cifar.ARCHIVE).write_bytes(archive)
    monkeypatch.setattr(cifar, "URL", f"{base}/{cifar.ARCHIVE}")
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive).hexdigest())
    data_dir = tmp_path / "data"

    _check_cifar(*load_split("cifar10", "test", data_dir), *written["test"])

    folder = data_dir / "cifar10"
    assert (folder / cifar.BATCHES_DIR / "data_batch_5").is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted([cifar.ARCHIVE, cifar.BATCHES_DIR])  # no staging


def test_cifar_download_rejects_bad_md5(http_server, tmp_path, monkeypatch):
    base, served = http_server
    archive, _ = _cifar_archive(np.random.default_rng(4), tmp_path)
    (served / cifar.ARCHIVE).write_bytes(archive)
    monkeypatch.setattr(cifar, "URL", f"{base}/{cifar.ARCHIVE}")
    pattern = rf"md5 is {hashlib.md5(archive).hexdigest()}, expected {cifar.MD5}; the download was deleted"
    with pytest.raises(DataError, match=pattern):
        load_split("cifar10", "test", tmp_path / "data")
    assert list((tmp_path / "data" / "cifar10").iterdir()) == []


def test_cifar_local_archive_extracted_without_download(tmp_path, monkeypatch):
    archive, written = _cifar_archive(np.random.default_rng(5), tmp_path)
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / cifar.ARCHIVE).write_bytes(archive)
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive).hexdigest())
    _check_cifar(*load_split("cifar10", "train", tmp_path, download=False), *written["train"])

    monkeypatch.setattr(cifar, "MD5", "0" * 32)  # a damaged local archive is refused, not extracted
    shutil.rmtree(tmp_path / "cifar10" / cifar.BATCHES_DIR)
    with pytest.raises(DataError, match=r"not the official CIFAR-10 archive: its md5 is \w{32}, expected 0+\."):
        load_split("cifar10", "train", tmp_path, download=False)


@pytest.mark.parametrize(
    "members, links, pattern",
    [
        ({"cifar-10-batches-py/../../evil": b"x"}, None, r"'cifar-10-batches-py/\.\./\.\./evil', outside"),
        ({"/tmp/evil": b"x"}, None, r"'/tmp/evil', outside cifar-10-batches-py/"),
        ({"evil": b"x"}, None, r"'evil', outside cifar-10-batches-py/"),
        ({}, {"cifar-10-batches-py/test_batch": "/etc/passwd"}, r"a link or special file; refusing to extract"),
    ],
    ids=["dotdot", "absolute", "outside", "symlink"],
)
def test_cifar_archive_extraction_is_safe(tmp_path, monkeypatch, members, links, pattern):
    archive = _tar_gz({"cifar-10-batches-py/readme": b"ok", **members}, links)
    folder = tmp_path / "data" / "cifar10"
    folder.mkdir(parents=True)
    (folder / cifar.ARCHIVE).write_bytes(archive)
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive).hexdigest())
    with pytest.raises(DataError, match=pattern):
        load_split("cifar10", "test", tmp_path / "data", download=False)
    assert sorted(p.name for p in folder.iterdir()) == [cifar.ARCHIVE]  # nothing extracted
    assert not (tmp_path / "evil").exists()


# --- digits ---


def test_digits_split():
    x_train, y_train = load_split("digits", "train")
    x_test, y_test = load_split("digits", "test")
    assert x_train.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert x_train.dtype == x_test.dtype == np.float32 and x_train.flags.c_contiguous
    assert y_train.dtype == y_test.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # Stratified: every class gives a fifth of its images to test.
    per_class = np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), np.round(per_class * 0.2))
    # Together the splits are exactly scikit-learn's images over 16, each used once.
    from sklearn.datasets import load_digits

    reference = load_digits()
    rows = np.concatenate([x_train, x_test]).reshape(1797, 64)
    expected = (reference.images / 16).astype(np.float32).reshape(1797, 64)
    order = lambda a: np.lexsort(a.T)  # noqa: E731
    np.testing.assert_array_equal(rows[order(rows)], expected[order(expected)])
    assert sorted(np.concatenate([y_train, y_test]).tolist()) == sorted(reference.target.tolist())


def test_digits_deterministic_and_offline(tmp_path):
    first = load_dataset("digits", tmp_path / "nowhere", download=False)
    second = load_dataset("digits")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    assert first.y_test[:10].tolist() == [5, 9, 2, 4, 6, 7, 9, 3, 4, 6]  # pinned: the split must not drift
    assert not (tmp_path / "nowhere").exists()
    assert first.x_test is not second.x_test  # callers may modify their arrays freely
