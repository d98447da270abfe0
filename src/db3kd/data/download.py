"""Fetch a file from the first mirror that serves it with the right checksum. Standard library only."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import secrets
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from db3kd.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256", *, gunzip: bool = False) -> str:
    """Return the hex digest of the file at `path`, or of its decompressed content if `gunzip`."""
    # usedforsecurity=False keeps md5 (CIFAR's published checksum) available on FIPS systems.
    h = hashlib.new(algorithm, usedforsecurity=False)
    with (gzip.open if gunzip else open)(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    urls: Sequence[str],
    dest: Path,
    *,
    digest: str,
    algorithm: str = "sha256",
    gunzip: bool = False,
    timeout: float = 30.0,
) -> None:
    """Download `dest` from the first of `urls` that works and whose content has hex digest `digest`.

    The download goes to a temporary file beside `dest` and is renamed into place only once verified,
    so an interrupted or bad download never leaves a partial `dest`. With `gunzip`, the digest is of
    the decompressed content: mirrors may re-compress a .gz without changing what it holds.
    Raises DataError listing every URL tried and why it failed.
    """
    dest = Path(dest)
    what = f"{algorithm} of the decompressed content" if gunzip else algorithm
    failures = []
    for url in urls:
        out, tmp = _temp_file_beside(dest)
        try:
            log.info("downloading %s to %s", url, dest)
            with out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, _CHUNK)
            actual = file_digest(tmp, algorithm, gunzip=gunzip)
            if actual != digest:
                failures.append(f"{url}: {what} is {actual}, expected {digest}; the download was deleted")
                continue
            os.replace(tmp, dest)
            return
        except (OSError, http.client.HTTPException, ValueError, EOFError, zlib.error) as exc:
            # URLError is an OSError; HTTPException covers a connection cut mid-body; ValueError a bad URL.
            is_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
            failures.append(f"{url}: {exc.reason if is_url_error else exc}")
        finally:
            tmp.unlink(missing_ok=True)
    tried = "\n  ".join(failures) or "(no URL given)"
    raise DataError(f"could not download {dest.name} into {dest.parent}; tried:\n  {tried}")


def _temp_file_beside(dest: Path) -> tuple[BinaryIO, Path]:
    """Open a new temporary file in dest's directory (same file system, so the final rename is atomic)."""
    # Not tempfile.mkstemp: its 0600 mode would make downloads into a shared data directory private.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return open(tmp, "xb"), tmp
    except OSError as exc:
        raise DataError(f"cannot write {dest.name} into {dest.parent}: {exc.strerror or exc}") from None
