"""Read IDX files (the MNIST format), gzip-compressed or plain, refusing anything malformed.

Format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of dimensions n,
then n big-endian uint32 sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from math import prod
from pathlib import Path

import numpy as np

from db3kd.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"

_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """Return the content of `path`, decompressed if it is gzip (told by its first bytes, not its name)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
            if path.suffix == ".gz" and not gzipped:
                raise DataError(f"{path} is named .gz but is not a gzip file")
            f.seek(0)
            if not gzipped:
                return f.read()
            with gzip.GzipFile(fileobj=f) as g:
                return g.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse(data: bytes, source: Path | str = "<bytes>") -> np.ndarray:
    """Return the array stored in IDX `data` in native byte order (a view of `data` for uint8).

    `source` only names the data in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{source} is not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    if data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(
            f"{source} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            f"(expected 0x0000 then a type code in {sorted(hex(t) for t in _DTYPES)})"
        )
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + prod(dims) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{source} is {problem}: its header gives shape {dims} of {dtype.itemsize}-byte values, "
            f"so {expected} bytes, but it has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, count=prod(dims), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read(path: Path) -> np.ndarray:
    """Return the array stored in the IDX file at `path` (gzip or plain)."""
    return parse(read_bytes(path), path)
