"""The user's own images: a folder (one subfolder per class, or flat and unlabelled) or an .npy/.npz of arrays.

Every image is converted to the teacher's input contract by a declared `ImageTransform` (channels, size,
value range). A folder is decoded in chunks (Pillow, two threads) straight into an on-disk `ImageStore`, an
.npy of uint8 images cached (in $DB3KD_CACHE/images, default ~/.cache/db3kd/images) under a key of the files and
the transform: a folder of any size is read with bounded memory, and the next command on it reuses the cache.
Arrays are converted in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from db3kd.errors import ConfigError, DataError

from .rows import row_indices

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE = ("crop", "pad")
_CHUNK_BYTES = 64 << 20  # images decoded, written or read at once: ~64 MB whatever their size


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes a teacher input (C, H, W) in `bounds`, the declared and recorded conversion:

    channels: converted to grey (C = 1) or RGB (C = 3) as the teacher takes; size: `crop` resizes the shorter
    side to fit then crops the centre (nothing squashed, the border may be lost), `pad` resizes the longer side
    to fit then pads with the lower bound (nothing lost); both bilinear. Values: 0..255 map linearly to bounds.
    """

    input_shape: tuple[int, int, int]
    bounds: tuple[float, float] = (0.0, 1.0)
    resize: str = "crop"

    def __post_init__(self):
        if self.resize not in RESIZE:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE)}, got {self.resize!r}")
        if len(self.input_shape) != 3 or self.input_shape[0] not in (1, 3):
            raise ConfigError(f"expected a teacher of grey (1, H, W) or RGB (3, H, W) images, got {self.input_shape}")

    def __call__(self, image) -> np.ndarray:
        """(C, H, W) uint8 of a Pillow image."""
        from PIL import Image, ImageOps

        c, h, w = self.input_shape
        image = image.convert("L" if c == 1 else "RGB")
        if image.size != (w, h):
            fit = ImageOps.fit if self.resize == "crop" else ImageOps.pad
            image = fit(image, (w, h), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """float32 teacher inputs from uint8 pixels."""
        lo, hi = self.bounds
        out = pixels.astype(np.float32)
        out *= np.float32((hi - lo) / 255)
        out += np.float32(lo)
        return out

    def describe(self) -> dict:
        return {**asdict(self), "channels": "grey" if self.input_shape[0] == 1 else "RGB",
                "values": f"0..255 -> [{self.bounds[0]}, {self.bounds[1]}]", "interpolation": "bilinear"}


class ImageStore:
    """Images (N, C, H, W) in an .npy file of uint8, read in chunks and never mapped whole (a scan of a large
    folder keeps little in memory). Indexing (an int, a slice, an array of rows) gives float32 inputs in the
    transform's bounds, as an array does; `chunks()` iterates over it; `head(n)` is a view of the first n."""

    def __init__(self, path: str | os.PathLike, transform: ImageTransform, start: int = 0, stop: int | None = None):
        self.path, self.transform = Path(path), transform
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)(f)
            self._offset = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != tuple(transform.input_shape):
            raise DataError(f"{self.path} holds {dtype} {shape}, not the uint8 (N, {transform.input_shape}) images "
                            "of this transform; delete it to rebuild the cache")
        self._rows, self._row_bytes = shape[0], int(np.prod(shape[1:]))
        self.start, self.stop = start, shape[0] if stop is None else min(stop, shape[0])
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.transform.input_shape)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.stop - self.start

    def head(self, n: int) -> ImageStore:
        return ImageStore(self.path, self.transform, self.start, self.start + min(n, len(self)))

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            first, last, _ = key.indices(len(self))
            return self.transform.scale(self._read(first, max(last - first, 0)))
        rows = row_indices(key, len(self))
        if rows.ndim == 0:
            return self[rows.reshape(1)][0]
        unique, back = np.unique(rows, return_inverse=True)
        out = np.empty((len(unique), *self.transform.input_shape), dtype=np.uint8)
        with open(self.path, "rb") as f:
            for i, row in enumerate(unique):  # runs of consecutive rows would read faster; rows are few here
                f.seek(self._offset + (self.start + int(row)) * self._row_bytes)
                f.readinto(memoryview(out[i]).cast("B"))
        return self.transform.scale(out[back])

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 images) over the whole store, `size` rows at a time (default ~64 MB)."""
        size = size or max(1, _CHUNK_BYTES // (4 * self._row_bytes))
        for first in range(0, len(self), size):
            yield first, self[first:first + size]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def _read(self, first: int, n: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self._offset + (self.start + first) * self._row_bytes)
            raw = np.fromfile(f, dtype=np.uint8, count=n * self._row_bytes)
        return raw.reshape(n, *self.transform.input_shape)

    def __reduce__(self):  # pickled as its file: Ray workers read the same cache (a shared file system)
        return ImageStore, (self.path, self.transform, self.start, self.stop)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, {len(self)} images {self.transform.input_shape})"


@dataclass
class Images:
    """A user's images as teacher inputs: `x` (an array, or an `ImageStore` for a folder), labels `y` if the
    source has them (class subfolders, or labels in the arrays), their class names, and what was done."""

    x: np.ndarray | ImageStore = field(repr=False)
    y: np.ndarray | None = field(repr=False)
    classes: tuple[str, ...] | None
    source: dict


def load_images(path: str | os.PathLike, transform: ImageTransform, cache_dir: str | os.PathLike | None = None,
                skip_bad: bool = False, progress: bool = True) -> Images:
    """The images at `path` (a folder or an .npy/.npz) converted by `transform` (see the module docstring).

    Raises DataError for a missing or empty source, a class folder without images, files that cannot be
    decoded (listed; with `skip_bad` they are left out and listed in `source["skipped"]`), or arrays of another
    layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: expected a folder of images (one subfolder per class, or flat) or an "
                        ".npy/.npz of images")
    if path.is_file():
        return _from_arrays(path, transform)
    files, labels, classes = scan_folder(path)
    cache = Path(cache_dir) if cache_dir is not None else \
        Path(os.environ.get("DB3KD_CACHE") or Path.home() / ".cache" / "db3kd") / "images"
    stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(path.resolve()), stamp, transform.describe(), skip_bad]).encode()).hexdigest()[:24]
    store_path, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    if not (store_path.is_file() and meta_path.is_file()):
        _decode(path, files, transform, store_path, meta_path, skip_bad, progress)
    meta = json.loads(meta_path.read_text())
    kept = np.setdiff1d(np.arange(len(files)), [files.index(path / s) for s in meta["skipped"]])
    source = {"path": str(path), "kind": "labelled folder" if classes else "folder", "images": len(kept),
              "transform": transform.describe(), "skipped": meta["skipped"], "skip_bad": skip_bad,
              "cache": str(store_path)}
    return Images(ImageStore(store_path, transform), None if labels is None else labels[kept], classes, source)


def scan_folder(root: Path) -> tuple[list[Path], np.ndarray | None, tuple[str, ...] | None]:
    """Image files of a folder in a fixed order, with labels and class names if it has one subfolder per class
    (class order: `classes.txt`, one name per line, else the sorted folder names)."""
    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)

    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
    if loose and subfolders:
        raise DataError(f"{root} holds both images and subfolders: expected either one subfolder per class "
                        f"(labelled) or images only (unlabelled), e.g. {loose[0].name} beside {subfolders[0].name}/")
    if not subfolders:
        files = sorted(loose)
        if not files:
            raise DataError(f"{root} holds no image ({', '.join(SUFFIXES)}): expected one subfolder per class or images")
        return files, None, None
    listed = root / "classes.txt"
    names = [n.strip() for n in listed.read_text().splitlines() if n.strip()] if listed.is_file() else \
        [p.name for p in subfolders]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise DataError(f"{listed} names classes without a folder in {root}: {', '.join(missing[:10])}")
    unlisted = [p.name for p in subfolders if p.name not in names]
    if unlisted:
        raise DataError(f"{root} has class folders that {listed} does not name: {', '.join(unlisted[:10])}; add "
                        "them to it (in the teacher's class order) or move them out")
    per_class = [images_in(root / n) for n in names]
    empty = [n for n, f in zip(names, per_class) if not f]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:10])}; every class needs images "
                        f"({', '.join(SUFFIXES)})")
    labels = np.concatenate([np.full(len(f), c, dtype=np.int64) for c, f in enumerate(per_class)])
    return [p for f in per_class for p in f], labels, tuple(names)


def _decode(root: Path, files: list[Path], transform: ImageTransform, store_path: Path, meta_path: Path,
            skip_bad: bool, progress: bool) -> None:
    """Decode `files` chunk by chunk into the uint8 store (written under a temporary name, then renamed)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from db3kd.io import write_json

    def one(path: Path) -> np.ndarray | str:
        try:
            with Image.open(path) as image:
                image.draft("L" if transform.input_shape[0] == 1 else "RGB", transform.input_shape[:0:-1])
                return transform(image)
        except Exception as e:  # noqa: BLE001 - any decoder error: a bad file, reported with the others
            return path, f"{type(e).__name__}: {e}"

    store_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = store_path.with_name(f"{store_path.name}.{os.getpid()}.tmp")
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(files), *transform.input_shape)}
    bad, kept, per_chunk = [], 0, max(1, _CHUNK_BYTES // int(np.prod(transform.input_shape)))
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(2) as pool, \
                tqdm(total=len(files), unit="img", desc="decode images", disable=not progress) as bar:
            np.lib.format.write_array_header_2_0(f, header)
            for first in range(0, len(files), per_chunk):
                for result in pool.map(one, files[first:first + per_chunk]):  # Pillow decodes without the GIL
                    if isinstance(result, tuple):
                        bad.append(result)
                    else:
                        f.write(result.tobytes())
                        kept += 1
                bar.update(min(per_chunk, len(files) - first))
            if bad and not skip_bad:
                raise DataError(f"{len(bad)} file(s) cannot be decoded as images (pass --skip-bad-images to leave "
                                "them out): " + "; ".join(f"{p}: {e}" for p, e in bad[:10]) + ("; ..." if len(bad) > 10 else ""))
            f.seek(0)  # the header again, with the images actually kept (a version-2 header has room for it)
            np.lib.format.write_array_header_2_0(f, {**header, "shape": (kept, *transform.input_shape)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, store_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(meta_path, {"images": kept, "skipped": [str(p.relative_to(root)) for p, _ in bad],
                           "errors": [f"{p}: {e}" for p, e in bad]})


def _from_arrays(path: Path, transform: ImageTransform) -> Images:
    """Images (N, C, H, W) or (N, H, W, C), uint8 or float in [0, 1], from an .npy or an .npz (`x` or `images`,
    optional `y` or `labels`)."""
    from db3kd.io import load_npz

    if path.suffix == ".npz":
        arrays = load_npz(path, "expected an .npz with images under x or images (and labels under y or labels)")
        x = next((arrays[k] for k in ("x", "images") if k in arrays), None)
        y = next((arrays[k] for k in ("y", "labels") if k in arrays), None)
        if x is None:
            raise DataError(f"{path} holds {', '.join(arrays) or 'nothing'}: expected images under x or images")
    elif path.suffix == ".npy":
        try:
            x, y = np.load(path, allow_pickle=False), None
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path} cannot be read as an .npy of images ({e}); expected a file written by numpy.save")
    else:
        raise DataError(f"{path}: expected a folder of images or an .npy/.npz of images, got a {path.suffix} file")
    if len(x) == 0:
        raise DataError(f"{path} holds no image (an array of shape {x.shape}): expected at least one")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or (x.shape[1] not in (1, 3) and x.shape[3] not in (1, 3)):
        raise DataError(f"{path}: expected images (N, C, H, W) or (N, H, W, C) with 1 or 3 channels, got {x.shape}")
    if x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DataError(f"{path}: expected uint8 images or floats in [0, 1], got {x.dtype} in "
                            f"[{x.min()}, {x.max()}]")
        x = np.round(x * 255).astype(np.uint8)  # one 8-bit grid for every source
    if x.shape[1:] != transform.input_shape:
        from PIL import Image

        mode = "L" if x.shape[1] == 1 else "RGB"
        x = np.stack([transform(Image.fromarray(i[0] if mode == "L" else i.transpose(1, 2, 0), mode)) for i in x])
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{path}: expected one integer label per image, got labels {y.dtype} {y.shape}")
    source = {"path": str(path), "kind": "arrays", "images": len(x), "transform": transform.describe(), "skipped": []}
    return Images(transform.scale(x), None if y is None else y.astype(np.int64), None, source)
