"""The user's own images (`db3kd.data.images`): folders and arrays converted to a teacher's contract, the
on-disk `ImageStore` cache, `transfer.dataset_images` against a real teacher, and recipes on a path dataset.

Every image here is made by the test (Pillow, NumPy) in tmp_path; $DB3KD_CACHE points into tmp_path.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import db3kd.data.images as images_module
from db3kd import open_oracle
from db3kd.data.images import ImageStore, ImageTransform, load_images
from db3kd.errors import ConfigError, DataError

DIGITS_TEACHER = Path(__file__).resolve().parent / "data" / "digits_teacher.onnx"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """The decoded-image cache of this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DB3KD_CACHE", str(cache))
    return cache


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts folder decodes (`_decode` calls, with the number of files each): a cache hit decodes nothing."""
    calls, original = [], images_module._decode

    def counting(root, files, *args, **kwargs):
        calls.append(len(files))
        return original(root, files, *args, **kwargs)

    monkeypatch.setattr(images_module, "_decode", counting)
    return calls


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    """An image file of uint8 `pixels` ((H, W) grey or (H, W, 3) RGB); the format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, **options)
    return path


def constant(value, h: int, w: int, rgb: bool = False) -> np.ndarray:
    return np.full((h, w, 3) if rgb else (h, w), value, dtype=np.uint8)


def load(path, transform, **kwargs):
    return load_images(path, transform, progress=False, **kwargs)


def labelled_folder(root: Path, counts: dict[str, int], value_of: dict[str, int], h: int = 8, w: int = 8) -> Path:
    """One subfolder per class; every image of a class a constant grey `value_of[class]`."""
    for name, n in counts.items():
        for i in range(n):
            save(root / name / f"{i:02d}.png", constant(value_of[name], h, w))
    return root


# --- ImageTransform --------------------------------------------------------------------------------------------

def test_transform_refuses_other_channels_and_resize_modes():
    with pytest.raises(ConfigError, match="resize must be one of crop, pad"):
        ImageTransform((1, 8, 8), resize="stretch")
    with pytest.raises(ConfigError, match=r"grey \(1, H, W\) or RGB \(3, H, W\)"):
        ImageTransform((2, 8, 8))
    with pytest.raises(ConfigError, match=r"grey \(1, H, W\) or RGB \(3, H, W\)"):
        ImageTransform((8, 8))


def test_transform_describes_itself():
    described = ImageTransform((3, 32, 32), (-1.0, 1.0), "pad").describe()
    assert described["input_shape"] == (3, 32, 32) and described["resize"] == "pad"
    assert described["channels"] == "RGB" and described["values"] == "0..255 -> [-1.0, 1.0]"
    assert ImageTransform((1, 8, 8)).describe()["channels"] == "grey"


def test_scale_maps_0_255_linearly_onto_the_bounds():
    transform = ImageTransform((1, 1, 3), (-2.0, 3.0))
    out = transform.scale(np.array([[[[0, 51, 255]]]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-2.0, -1.0, 3.0], atol=1e-6)


# --- labelled folders ----------------------------------------------------------------------------------------

def test_labelled_folder_classes_are_the_sorted_folder_names(tmp_path):
    values = {"zebra": 30, "ant": 120, "moose": 240}
    root = labelled_folder(tmp_path / "photos", {"zebra": 1, "ant": 2, "moose": 3}, values)
    images = load(root, ImageTransform((1, 8, 8)))
    assert images.classes == ("ant", "moose", "zebra")
    np.testing.assert_array_equal(images.y, [0, 0, 1, 1, 1, 2])
    assert images.y.dtype == np.int64
    assert isinstance(images.x, ImageStore) and images.x.shape == (6, 1, 8, 8)
    x = np.asarray(images.x)
    for row, label in enumerate(images.y):  # each image is the one of its folder
        np.testing.assert_allclose(x[row], values[images.classes[label]] / 255, atol=1e-6)
    assert images.source["kind"] == "labelled folder" and images.source["images"] == 6
    assert images.source["skipped"] == [] and images.source["path"] == str(root)


def test_classes_txt_sets_the_class_order(tmp_path):
    values = {"zebra": 30, "ant": 120, "moose": 240}
    root = labelled_folder(tmp_path / "photos", {"zebra": 1, "ant": 2, "moose": 3}, values)
    (root / "classes.txt").write_text("zebra\nant\n\nmoose\n")  # a blank line is no class
    images = load(root, ImageTransform((1, 8, 8)))
    assert images.classes == ("zebra", "ant", "moose")
    np.testing.assert_array_equal(images.y, [0, 1, 1, 2, 2, 2])
    x = np.asarray(images.x)
    for row, label in enumerate(images.y):
        np.testing.assert_allclose(x[row], values[images.classes[label]] / 255, atol=1e-6)


def test_classes_txt_naming_a_missing_folder_is_refused(tmp_path):
    root = labelled_folder(tmp_path / "photos", {"a": 1, "b": 1}, {"a": 1, "b": 2})
    (root / "classes.txt").write_text("a\nb\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt names classes without a folder .*: cat"):
        load(root, ImageTransform((1, 8, 8)))


def test_class_folders_are_read_recursively_and_hidden_folders_are_no_class(tmp_path):
    root = labelled_folder(tmp_path / "photos", {"a": 1, "b": 1}, {"a": 10, "b": 200})
    save(root / "a" / "deeper" / "more" / "x.png", constant(10, 8, 8))
    (root / ".thumbnails").mkdir()
    (root / "a" / "notes.txt").write_text("not an image")
    images = load(root, ImageTransform((1, 8, 8)))
    assert images.classes == ("a", "b")
    np.testing.assert_array_equal(images.y, [0, 0, 1])


def test_rgb_files_become_grey_28x28_inputs(tmp_path):
    """RGB 40x36 files for a grey 1x28x28 teacher: luma (ITU-R 601: red 76, blue 29), resized."""
    root = tmp_path / "photos"
    save(root / "red" / "0.png", constant((255, 0, 0), 36, 40, rgb=True))
    save(root / "blue" / "0.png", constant((0, 0, 255), 36, 40, rgb=True))
    images = load(root, ImageTransform((1, 28, 28), (-1.0, 1.0)))
    assert images.classes == ("blue", "red") and images.x.shape == (2, 1, 28, 28)
    x = np.asarray(images.x)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[0], 29 / 255 * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(x[1], 76 / 255 * 2 - 1, atol=1e-6)


def test_grey_files_become_rgb_inputs(tmp_path):
    root = tmp_path / "photos"
    save(root / "a" / "0.png", constant(128, 20, 20))
    save(root / "b" / "0.bmp", constant(64, 10, 10))
    images = load(root, ImageTransform((3, 10, 10)))
    x = np.asarray(images.x)
    assert x.shape == (2, 3, 10, 10) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x[0], 128 / 255, atol=1e-6)  # every channel the grey value
    np.testing.assert_allclose(x[1], 64 / 255, atol=1e-6)


def asymmetric_image() -> np.ndarray:
    """40 wide, 20 high: the left quarter white (255), the rest grey 100."""
    pixels = constant(100, 20, 40)
    pixels[:, :10] = 255
    return pixels


def test_resize_crop_and_pad_differ_as_declared(tmp_path):
    save(tmp_path / "flat" / "wide.png", asymmetric_image())
    grey = 100 / 255 * 2 - 1
    crop = np.asarray(load(tmp_path / "flat", ImageTransform((1, 10, 10), (-1.0, 1.0), "crop")).x)[0, 0]
    pad = np.asarray(load(tmp_path / "flat", ImageTransform((1, 10, 10), (-1.0, 1.0), "pad")).x)[0, 0]
    # crop: the height fits, the centre half of the width is kept: the white quarter is cut away, no border
    assert crop.min() > -1.0 + 0.5
    np.testing.assert_allclose(crop[:, 1:], grey, atol=1e-6)
    assert crop.max() < 0.5  # white would be 1.0
    # pad: the width fits (40x20 -> 10x5), centred, padded with the lower bound above and below
    rows = np.flatnonzero((pad == -1.0).all(axis=1))
    np.testing.assert_array_equal(rows, [0, 1, 7, 8, 9])
    assert (pad == -1.0).sum() == 50  # the border exactly, no more
    np.testing.assert_allclose(pad[2:7, :2], 1.0, atol=1e-6)  # the white quarter kept: 40/4 -> 2.5 columns
    np.testing.assert_allclose(pad[2:7, 3:], grey, atol=1e-6)
    assert not np.allclose(crop, pad)


def test_resize_pad_pads_with_the_lower_bound_of_the_bounds(tmp_path):
    """A tall image padded left and right, with a lower bound that is not 0."""
    save(tmp_path / "flat" / "tall.png", constant(255, 40, 20))
    pad = np.asarray(load(tmp_path / "flat", ImageTransform((1, 10, 10), (0.5, 2.5), "pad")).x)[0, 0]
    border = np.isclose(pad, 0.5, atol=1e-6).all(axis=0)
    assert border.sum() == 5 and border[0] and border[-1]
    np.testing.assert_allclose(pad[:, ~border], 2.5, atol=1e-6)


# --- flat folders and formats --------------------------------------------------------------------------------

def test_flat_folder_of_mixed_formats_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    save(root / "a.png", constant(10, 12, 10))
    save(root / "b.jpg", constant(80, 12, 10), quality=95)
    save(root / "c.webp", constant(150, 12, 10), lossless=True)
    save(root / "d.bmp", constant(220, 12, 10))
    save(root / "e.JPEG", constant((0, 0, 255), 12, 10, rgb=True), quality=95)  # suffixes of any case
    (root / "readme.txt").write_text("not an image")
    (root / "f.gif").write_bytes(b"GIF89a")  # not a declared format: not read
    images = load(root, ImageTransform((1, 6, 5)))
    assert images.y is None and images.classes is None
    assert images.source["kind"] == "folder" and images.source["images"] == 5
    means = np.asarray(images.x).reshape(5, -1).mean(axis=1) * 255
    np.testing.assert_allclose(means, [10, 80, 150, 220, 29], atol=3)  # sorted by name; JPEG within 3


def test_flat_rgb_jpegs_for_an_rgb_teacher(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    for i in range(5):
        save(root / f"{i}.jpg", rng.integers(0, 256, (36, 40, 3)), quality=90)
    images = load(root, ImageTransform((3, 16, 16)))
    x = np.asarray(images.x)
    assert x.shape == (5, 3, 16, 16) and images.y is None
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # noise stays noise


# --- arrays --------------------------------------------------------------------------------------------------

def test_npy_uint8_nchw_of_the_teacher_shape_is_taken_as_is(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    images = load(tmp_path / "x.npy", ImageTransform((1, 8, 8), (-1.0, 1.0)))
    assert isinstance(images.x, np.ndarray) and images.x.dtype == np.float32
    np.testing.assert_allclose(images.x, pixels / 255 * 2 - 1, atol=1e-6)
    assert images.y is None and images.classes is None
    assert images.source["kind"] == "arrays" and images.source["images"] == 4


def test_npy_float_nhwc_is_transposed(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((3, 8, 6, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    images = load(tmp_path / "x.npy", ImageTransform((3, 8, 6)))
    assert images.x.shape == (3, 3, 8, 6)
    np.testing.assert_allclose(images.x, np.round(x.transpose(0, 3, 1, 2) * 255) / 255, atol=1e-6)


def test_npy_without_channels_is_grey(tmp_path):
    x = np.random.default_rng(3).random((2, 8, 8))
    np.save(tmp_path / "x.npy", x)
    images = load(tmp_path / "x.npy", ImageTransform((1, 8, 8)))
    np.testing.assert_allclose(images.x[:, 0], np.round(x * 255) / 255, atol=1e-6)


def test_arrays_of_another_size_and_channels_are_converted(tmp_path):
    x = np.zeros((2, 16, 12, 3), dtype=np.uint8)  # NHWC RGB, 16 high, 12 wide
    x[0] = (255, 0, 0)
    x[1] = 200
    np.save(tmp_path / "x.npy", x)
    images = load(tmp_path / "x.npy", ImageTransform((1, 8, 8), resize="pad"))
    assert images.x.shape == (2, 1, 8, 8)
    border = images.x[0, 0, :, 0]  # 16x12 -> 8x6 padded left and right with the lower bound
    np.testing.assert_allclose(border, 0.0, atol=1e-6)
    np.testing.assert_allclose(images.x[0, 0, :, 1:7], 76 / 255, atol=1e-6)
    np.testing.assert_allclose(images.x[1, 0, :, 1:7], 200 / 255, atol=1e-6)


@pytest.mark.parametrize(("images_key", "labels_key"), [("x", "y"), ("images", "labels"), ("x", None)])
def test_npz_with_images_and_labels(tmp_path, images_key, labels_key):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    np.savez(tmp_path / "data.npz", **{images_key: x}, **({labels_key: y} if labels_key else {}))
    images = load(tmp_path / "data.npz", ImageTransform((1, 8, 8)))
    np.testing.assert_allclose(images.x, x.transpose(0, 3, 1, 2) / 255, atol=1e-6)
    if labels_key is None:
        assert images.y is None
    else:
        assert images.y.dtype == np.int64
        np.testing.assert_array_equal(images.y, y)


@pytest.mark.parametrize(("name", "make", "message"), [
    ("bad-channels.npy", lambda p: np.save(p, np.zeros((2, 5, 8, 8), np.uint8)),
     r"bad-channels\.npy: expected images \(N, C, H, W\) or \(N, H, W, C\) with 1 or 3 channels, got \(2, 5, 8, 8\)"),
    ("flat.npy", lambda p: np.save(p, np.zeros((2, 64), np.uint8)),
     r"flat\.npy: expected images .* got \(2, 64\)"),
    ("nan.npy", lambda p: np.save(p, np.array([[[[0.5, np.nan]]]], np.float32)),
     r"nan\.npy: expected uint8 images or floats in \[0, 1\], got float32"),
    ("range.npy", lambda p: np.save(p, np.full((1, 1, 2, 2), 255.0)),
     r"range\.npy: expected uint8 images or floats in \[0, 1\], got float64 in \[255\.0, 255\.0\]"),
    ("ints.npy", lambda p: np.save(p, np.zeros((1, 1, 2, 2), np.int64)),
     r"ints\.npy: expected uint8 images or floats in \[0, 1\], got int64"),
    ("labels.npz", lambda p: np.savez(p, x=np.zeros((3, 1, 8, 8), np.uint8), y=np.zeros(2, np.int64)),
     r"labels\.npz: expected one integer label per image, got labels int64 \(2,\)"),
    ("float-labels.npz", lambda p: np.savez(p, x=np.zeros((2, 1, 8, 8), np.uint8), y=np.zeros(2)),
     r"float-labels\.npz: expected one integer label per image, got labels float64"),
    ("no-images.npz", lambda p: np.savez(p, pixels=np.zeros((2, 1, 8, 8), np.uint8)),
     r"no-images\.npz holds pixels: expected images under x or images"),
    ("broken.npz", lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), r"broken\.npz is unreadable"),
    ("data.txt", lambda p: p.write_text("1 2 3"), r"data\.txt: expected a folder of images or an \.npy/\.npz"),
])
def test_bad_arrays_are_a_data_error_naming_the_file(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(DataError, match=message):
        load(tmp_path / name, ImageTransform((1, 8, 8)))


def test_a_damaged_npy_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "damaged.npy").write_bytes(b"not an array at all")
    with pytest.raises(DataError, match="damaged.npy"):
        load(tmp_path / "damaged.npy", ImageTransform((1, 8, 8)))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_arrays_of_no_images_are_refused(tmp_path, dtype):
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), dtype))
    with pytest.raises(DataError, match="empty.npy"):
        load(tmp_path / "empty.npy", ImageTransform((1, 8, 8)))


# --- folder errors -------------------------------------------------------------------------------------------

def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"nowhere not found: expected a folder of images"):
        load(tmp_path / "nowhere", ImageTransform((1, 8, 8)))


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError, match=r"empty holds no image \(\.png, \.jpg"):
        load(tmp_path / "empty", ImageTransform((1, 8, 8)))


def test_a_class_folder_without_images_is_refused(tmp_path):
    root = labelled_folder(tmp_path / "photos", {"cat": 2}, {"cat": 5})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no image")
    with pytest.raises(DataError, match=r"class folder\(s\) without images in .*photos: dog;"):
        load(root, ImageTransform((1, 8, 8)))


def test_a_folder_mixing_images_and_subfolders_is_refused(tmp_path):
    root = labelled_folder(tmp_path / "photos", {"cat": 1}, {"cat": 5})
    save(root / "stray.png", constant(1, 8, 8))
    with pytest.raises(DataError, match=r"holds both images and subfolders: .* stray\.png beside cat/"):
        load(root, ImageTransform((1, 8, 8)))


def broken_files(folder: Path) -> list[Path]:
    """Two undecodable files: one not an image at all, one a truncated PNG."""
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"this is not a PNG")
    truncated = folder / "truncated.png"
    save(truncated, np.random.default_rng(5).integers(0, 256, (32, 32)))
    truncated.write_bytes(truncated.read_bytes()[:60])
    return [garbage, truncated]


def test_undecodable_files_stop_the_load_with_their_list(tmp_path, isolated_cache):
    root = labelled_folder(tmp_path / "photos", {"a": 2, "b": 2}, {"a": 10, "b": 200})
    broken_files(root / "b")
    with pytest.raises(DataError, match=r"2 file\(s\) cannot be decoded as images \(pass --skip-bad-images") as info:
        load(root, ImageTransform((1, 8, 8)))
    message = str(info.value)
    assert str(root / "b" / "garbage.png") in message and str(root / "b" / "truncated.png") in message
    assert not list(isolated_cache.glob("images/*"))  # no half-written store left behind as the cache


def test_skip_bad_leaves_undecodable_files_out_and_lists_them(tmp_path):
    values = {"a": 10, "b": 200}
    root = labelled_folder(tmp_path / "photos", {"a": 2, "b": 2}, values)
    broken_files(root / "a")
    images = load(root, ImageTransform((1, 8, 8)), skip_bad=True)
    assert sorted(images.source["skipped"]) == ["a/garbage.png", "a/truncated.png"]
    assert images.source["images"] == 4 and len(images.x) == 4
    np.testing.assert_array_equal(images.y, [0, 0, 1, 1])  # the labels of the images kept, in step with them
    x = np.asarray(images.x)
    for row, label in enumerate(images.y):
        np.testing.assert_allclose(x[row], values[images.classes[label]] / 255, atol=1e-6)
    meta = json.loads(Path(images.source["cache"]).with_suffix(".json").read_text())
    assert meta["images"] == 4 and len(meta["errors"]) == 2
    again = load(root, ImageTransform((1, 8, 8)), skip_bad=True)  # from the cache: the same record
    assert again.source["skipped"] == images.source["skipped"]
    np.testing.assert_array_equal(again.y, images.y)


def test_skip_bad_with_a_colon_in_a_file_name(tmp_path):
    root = tmp_path / "flat"
    save(root / "ok.png", constant(1, 8, 8))
    (root / "scan: page 2.png").write_bytes(b"not a PNG")
    images = load(root, ImageTransform((1, 8, 8)), skip_bad=True)
    assert images.source["skipped"] == ["scan: page 2.png"] and len(images.x) == 1


# --- the cache and ImageStore --------------------------------------------------------------------------------

def random_folder(root: Path, n: int = 7, h: int = 6, w: int = 5, seed: int = 6) -> np.ndarray:
    """n random grey images of the transform's size (no resize): returns their pixels (n, 1, h, w)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 1, h, w), dtype=np.uint8)
    for i, p in enumerate(pixels):
        save(root / f"{i:02d}.png", p[0])
    return pixels


def test_the_cache_is_under_db3kd_cache_and_reused(tmp_path, isolated_cache, decodes):
    random_folder(tmp_path / "flat")
    transform = ImageTransform((1, 6, 5))
    first = load(tmp_path / "flat", transform)
    cache = Path(first.source["cache"])
    assert cache.parent == isolated_cache / "images" and cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = load(tmp_path / "flat", transform)
    assert decodes == [7]  # the second load decoded nothing
    assert second.source["cache"] == str(cache) and cache.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(second.x), np.asarray(first.x))


def test_an_explicit_cache_dir_is_used(tmp_path, isolated_cache):
    random_folder(tmp_path / "flat")
    images = load_images(tmp_path / "flat", ImageTransform((1, 6, 5)), cache_dir=tmp_path / "mine", progress=False)
    assert Path(images.source["cache"]).parent == tmp_path / "mine"
    assert not (isolated_cache / "images").exists()


def test_another_transform_or_skip_bad_gives_another_cache(tmp_path, decodes):
    random_folder(tmp_path / "flat")
    caches = {load(tmp_path / "flat", t, **kw).source["cache"] for t, kw in [
        (ImageTransform((1, 6, 5)), {}),
        (ImageTransform((1, 6, 5), resize="pad"), {}),
        (ImageTransform((1, 6, 5), (-1.0, 1.0)), {}),
        (ImageTransform((3, 6, 5)), {}),
        (ImageTransform((1, 6, 5)), {"skip_bad": True}),
    ]}
    assert len(caches) == 5 and decodes == [7] * 5


def test_a_changed_added_or_removed_file_gives_a_new_cache(tmp_path, decodes):
    root = tmp_path / "flat"
    pixels = random_folder(root)
    transform = ImageTransform((1, 6, 5))
    before = load(root, transform)
    changed = 255 - pixels[3, 0]
    save(root / "03.png", changed)
    os.utime(root / "03.png", ns=(1_000_000_000, 1_000_000_000))  # surely another time than the first write
    after = load(root, transform)
    assert after.source["cache"] != before.source["cache"] and decodes == [7, 7]
    np.testing.assert_allclose(after.x[3][0], changed / 255, atol=1e-6)
    np.testing.assert_allclose(before.x[3][0], pixels[3, 0] / 255, atol=1e-6)  # the old store is unchanged

    save(root / "99.png", constant(0, 6, 5))
    assert len(load(root, transform).x) == 8
    (root / "00.png").unlink()
    shrunk = load(root, transform)
    assert len(shrunk.x) == 7 and decodes == [7, 7, 8, 7]
    np.testing.assert_allclose(shrunk.x[0][0], pixels[1, 0] / 255, atol=1e-6)


def test_two_folders_alike_in_names_sizes_and_times_do_not_share_a_cache(tmp_path):
    transform = ImageTransform((1, 8, 8))
    for name, value in (("train", 10), ("test", 200)):
        path = save(tmp_path / name / "0.bmp", constant(value, 8, 8))  # BMP: the same size whatever the pixels
        os.utime(path, ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    train, test = load(tmp_path / "train", transform), load(tmp_path / "test", transform)
    np.testing.assert_allclose(train.x[0], 10 / 255, atol=1e-6)
    np.testing.assert_allclose(test.x[0], 200 / 255, atol=1e-6)


@pytest.fixture
def store(tmp_path) -> tuple[ImageStore, np.ndarray]:
    """A store of 7 random 1x6x5 images in bounds (-1, 1), with the array it must equal."""
    transform = ImageTransform((1, 6, 5), (-1.0, 1.0))
    pixels = random_folder(tmp_path / "flat")
    images = load(tmp_path / "flat", transform)
    return images.x, transform.scale(pixels)


def test_store_is_array_like(store):
    x, expected = store
    assert len(x) == 7 and x.shape == (7, 1, 6, 5) and x.ndim == 4 and x.dtype == np.float32
    full = np.asarray(x)
    assert full.dtype == np.float32
    np.testing.assert_array_equal(full, expected)
    assert np.asarray(x, dtype=np.float64).dtype == np.float64
    assert "7 images (1, 6, 5)" in repr(x)


def test_store_indexing_equals_the_array(store):
    import torch

    x, expected = store
    np.testing.assert_array_equal(x[3], expected[3])
    np.testing.assert_array_equal(x[-1], expected[-1])
    np.testing.assert_array_equal(x[np.int64(2)], expected[2])
    for key in (slice(None), slice(2, 5), slice(1, None, 3), slice(None, None, -2), slice(-3, None), slice(5, 2)):
        np.testing.assert_array_equal(x[key], expected[key])
    rows = np.array([6, 0, 3, 3, -2])  # unsorted, repeated, negative
    np.testing.assert_array_equal(x[rows], expected[rows])
    np.testing.assert_array_equal(x[[1, 2]], expected[[1, 2]])
    np.testing.assert_array_equal(x[torch.tensor([4, 1])], expected[[4, 1]])
    assert x[np.array([], dtype=np.int64)].shape == (0, 1, 6, 5)
    with pytest.raises(IndexError):
        x[np.array([0, 7])]
    with pytest.raises(IndexError):
        x[-8]


def test_store_head_and_chunks(store):
    x, expected = store
    head = x.head(4)
    assert len(head) == 4 and head.shape == (4, 1, 6, 5)
    np.testing.assert_array_equal(np.asarray(head), expected[:4])
    np.testing.assert_array_equal(head[-1], expected[3])
    with pytest.raises(IndexError):
        head[np.array([4])]
    assert len(x.head(100)) == 7
    for size in (1, 3, 7, 50, None):
        parts = list(x.chunks(size))
        assert [start for start, _ in parts] == list(range(0, 7, size or 7))
        np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), expected)
    parts = list(head.chunks(3))
    assert [start for start, _ in parts] == [0, 3]
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), expected[:4])


def test_store_pickles_as_its_file(store):
    x, expected = store
    head = pickle.loads(pickle.dumps(x.head(5)))
    assert isinstance(head, ImageStore) and len(head) == 5
    np.testing.assert_array_equal(np.asarray(head), expected[:5])


def test_a_head_of_a_head_stays_within_it(store):
    x, expected = store
    inner = x.head(3).head(5)
    assert len(inner) == 3
    np.testing.assert_array_equal(np.asarray(inner), expected[:3])


def test_a_store_of_another_transform_is_refused(store):
    x, _ = store
    with pytest.raises(DataError, match=r"not the uint8 \(N, \(3, 6, 5\)\) images of this transform; delete it"):
        ImageStore(x.path, ImageTransform((3, 6, 5)))


# --- dataset_images with a real teacher ----------------------------------------------------------------------

@pytest.fixture
def oracle():
    oracle = open_oracle(str(DIGITS_TEACHER))
    assert tuple(oracle.input_shape) == (1, 8, 8) and oracle.num_classes == 10
    assert tuple(oracle.bounds) == (0.0, 1.0)
    return oracle


def digits_folder(root: Path, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` images of each digit of a split as 8x8 PNGs in class folders 0..9; returns the
    images as the folder holds them (rounded to 8 bits, in folder order) and their labels."""
    from db3kd.data import load_split

    x, y = load_split("digits", split)
    rows = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    pixels = np.round(x[rows, 0] * 255).astype(np.uint8)
    for i, (p, label) in enumerate(zip(pixels, y[rows])):
        save(root / str(label) / f"{i:04d}.png", p)
    return pixels[:, None] / np.float32(255), y[rows]


def test_dataset_images_of_a_labelled_folder(tmp_path, oracle):
    from db3kd.transfer import dataset_images

    expected_x, expected_y = digits_folder(tmp_path / "digits", "train", 3)
    x, y, record = dataset_images(str(tmp_path / "digits"), "train", oracle, progress=False)
    assert isinstance(x, ImageStore) and x.shape == (30, 1, 8, 8)
    np.testing.assert_allclose(np.asarray(x), expected_x, atol=1e-6)
    np.testing.assert_array_equal(y, expected_y)
    assert record["dataset"] == str((tmp_path / "digits").resolve()) and record["split"] == "images"
    assert record["images"]["kind"] == "labelled folder" and record["images"]["transform"]["input_shape"] == (1, 8, 8)
    assert oracle.queries == 0  # loading images sends nothing
    labels = oracle.labels(x)  # the store is labelled chunk by chunk, counted per image
    assert oracle.queries == 30 and labels.shape == (30,)
    assert (labels == y).mean() > 0.7  # the teacher recognises the digits of the folder


def test_dataset_images_refuses_other_classes_before_any_query(tmp_path, oracle):
    from db3kd.transfer import dataset_images

    root = labelled_folder(tmp_path / "three", {"a": 2, "b": 2, "c": 2}, {"a": 1, "b": 2, "c": 3})
    with pytest.raises(DataError, match=r"has 3 class folders \(a, b, c\.\.\.\) but teacher .* answers 10 classes"):
        dataset_images(str(root), "train", oracle, progress=False)
    assert oracle.queries == 0


def test_dataset_images_of_a_flat_rgb_folder_and_of_arrays(tmp_path, oracle):
    from db3kd.transfer import dataset_images

    rng = np.random.default_rng(7)
    for i in range(4):
        save(tmp_path / "flat" / f"{i}.jpg", rng.integers(0, 256, (36, 40, 3)), quality=90)
    x, y, record = dataset_images(str(tmp_path / "flat"), "train", oracle, resize="pad", progress=False)
    assert x.shape == (4, 1, 8, 8) and y is None
    assert record["images"]["kind"] == "folder" and record["images"]["transform"]["resize"] == "pad"
    np.savez(tmp_path / "arrays.npz", images=rng.random((3, 8, 8, 1)), labels=np.array([1, 2, 3]))
    x, y, record = dataset_images(str(tmp_path / "arrays.npz"), "test", oracle)
    assert isinstance(x, np.ndarray) and x.shape == (3, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [1, 2, 3])
    assert record["images"]["kind"] == "arrays"
    assert oracle.queries == 0


def test_dataset_images_of_a_named_dataset_is_unchanged(oracle):
    from db3kd.transfer import dataset_images

    x, y, record = dataset_images("digits", "test", oracle)
    assert record == {"dataset": "digits", "split": "test"} and x.shape[1:] == (1, 8, 8) and len(y) == len(x)


def test_images_of_a_manifest_are_the_same_images_or_refused(tmp_path, oracle):
    from db3kd.transfer import dataset_images, images_of

    root = tmp_path / "digits"
    digits_folder(root, "train", 2)
    x, _, record = dataset_images(str(root), "train", oracle, progress=False)
    before = np.asarray(x)
    save(root / "0" / "0000-new.png", constant(255, 8, 8))  # sorts before the first image of class 0
    try:
        again = np.asarray(images_of(record))
    except DataError:
        return  # refusing a changed folder is fine too
    np.testing.assert_array_equal(again, before)


# --- recipes -------------------------------------------------------------------------------------------------

def recipe_dict(dataset: dict, **extra) -> dict:
    return {"name": "own", "dataset": dataset, "teacher": str(DIGITS_TEACHER),
            "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": 4}}},
            "students": {"arch": ["lenet5-fifth"], "seeds": [0], "train": {"epochs": 2}}, **extra}


def write_recipe(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_recipe_on_own_images_resolves_its_paths_against_the_recipe_file(tmp_path, monkeypatch):
    from db3kd.recipe import load_recipe

    labelled_folder(tmp_path / "exp" / "photos", {"a": 1}, {"a": 1})
    labelled_folder(tmp_path / "exp" / "photos-test", {"a": 1}, {"a": 1})
    path = write_recipe(tmp_path / "exp" / "recipe.yaml", recipe_dict(
        {"name": "photos", "test": "photos-test", "resize": "pad", "skip_bad_images": True}))
    monkeypatch.chdir(tmp_path)  # elsewhere than the recipe's folder
    recipe = load_recipe(Path("exp/recipe.yaml"))
    d = recipe.dataset
    assert d.own and d.name == str((tmp_path / "exp" / "photos").resolve())
    assert d.test == str((tmp_path / "exp" / "photos-test").resolve())
    assert d.resize == "pad" and d.skip_bad_images is True
    assert load_recipe(path).dataset.name == d.name


@pytest.mark.parametrize(("dataset", "message"), [
    ({"name": "photos"}, r"dataset\.test: expected the path of your test images"),
    ({"name": "nowhere", "test": "photos"}, r"dataset\.name: expected one of .*digits.* or the path of your images "
                                            r"\(relative to the recipe file\), got 'nowhere': not found"),
    ({"name": "photos", "test": "photos", "resize": "stretch"}, r"resize.*expected crop or pad"),
    ({"name": "digits", "test": "photos"}, r"test.*null with a named dataset"),
])
def test_a_recipe_on_own_images_refuses(tmp_path, dataset, message):
    from db3kd.recipe import load_recipe

    labelled_folder(tmp_path / "photos", {"a": 1}, {"a": 1})
    path = write_recipe(tmp_path / "recipe.yaml", recipe_dict(dataset))
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)  # the recipe is named


def test_a_recipe_refuses_a_missing_test_path(tmp_path):
    from db3kd.recipe import load_recipe

    labelled_folder(tmp_path / "photos", {"a": 1}, {"a": 1})
    path = write_recipe(tmp_path / "recipe.yaml", recipe_dict({"name": "photos", "test": "photos-tset"}))
    with pytest.raises(ConfigError, match="photos-tset"):
        load_recipe(path)


@pytest.fixture
def teacher_count(monkeypatch) -> list[int]:
    """Images the ONNX teacher itself evaluates (below the oracle, which counts on its own)."""
    from db3kd.teachers.onnx_backend import OnnxBackend

    counted, lock, original = [0], threading.Lock(), OnnxBackend.predict_labels

    def counting(self, x):
        with lock:
            counted[0] += len(x)
        return original(self, x)

    monkeypatch.setattr(OnnxBackend, "predict_labels", counting)
    return counted


def test_a_recipe_on_a_labelled_png_folder_runs_end_to_end(tmp_path, teacher_count, decodes):
    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe

    digits_folder(tmp_path / "exp" / "train", "train", 12)  # 120 transfer images
    digits_folder(tmp_path / "exp" / "test", "test", 5)  # 50 test images
    raw = recipe_dict({"name": "train", "test": "test"}, baselines=["ce"])
    raw["soft_labels"]["bd"]["params"]["queries_per_pair"] = 6
    recipe = load_recipe(write_recipe(tmp_path / "exp" / "recipe.yaml", raw))
    run_dir = tmp_path / "run"
    records = run_recipe(recipe, run_dir, progress=False)
    assert {r.name: r.status for r in records} == {
        "soft_labels/bd": "done", "students/bd-lenet5-fifth-seed0": "done", "students/ce-lenet5-fifth-seed0": "done"}
    assert decodes == [50, 120]  # each folder decoded once for the whole run, the test folder first (checked before any query)

    sent = json.loads((run_dir / "run.json").read_text())["teacher_queries_this_run"]
    assert sent == teacher_count[0] > 0  # the run's count is the teacher's own
    stages = [json.loads(p.read_text()) for p in run_dir.glob("*/*/stage.json")]
    assert sum(s["teacher_queries"]["transfer"] + s["teacher_queries"]["eval"] for s in stages) == sent

    manifest = json.loads((run_dir / "soft_labels/bd/manifest.json").read_text())
    assert manifest["images"]["kind"] == "labelled folder" and manifest["images"]["images"] == 120
    assert manifest["dataset"] == str((tmp_path / "exp" / "train").resolve())
    bd = json.loads((run_dir / "students/bd-lenet5-fifth-seed0/metrics.json").read_text())
    ce = json.loads((run_dir / "students/ce-lenet5-fifth-seed0/metrics.json").read_text())
    assert bd["teacher_queries"]["total"] == manifest["total_queries"]
    assert ce["teacher_queries"]["labels"] == 120 and ce["teacher_queries"]["total"] == 120
    assert bd["teacher_queries"]["evaluation"] == ce["teacher_queries"]["evaluation"] == 50
    assert sent == manifest["total_queries"] + 120 + 2 * 50
    for metrics in (bd, ce):  # a labelled test folder: accuracy as well as fidelity
        assert 0.0 <= metrics["test_accuracy"] <= 1.0 and 0.0 <= metrics["fidelity"] <= 1.0
    assert "labelled folder" in ce["transfer_set"]

    again = run_recipe(recipe, run_dir, progress=False)  # a rerun: nothing to do, no image read, no query
    assert {r.status for r in again} == {"skipped"} and decodes == [50, 120]
    assert json.loads((run_dir / "run.json").read_text())["teacher_queries_this_run"] == 0


def test_a_recipe_whose_test_folder_has_other_classes_is_refused_before_any_query(tmp_path, teacher_count):
    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe

    digits_folder(tmp_path / "exp" / "train", "train", 2)
    labelled_folder(tmp_path / "exp" / "test", {"cat": 2, "dog": 2}, {"cat": 10, "dog": 200})
    recipe = load_recipe(write_recipe(tmp_path / "exp" / "recipe.yaml", recipe_dict({"name": "train", "test": "test"})))
    with pytest.raises(DataError, match="2 class folders"):
        run_recipe(recipe, tmp_path / "run", progress=False)
    assert teacher_count[0] == 0


def flat_folder(root: Path, split: str, count: int) -> None:
    """The first `count` digits of a split as unlabelled 8x8 PNGs."""
    from db3kd.data import load_split

    x = load_split("digits", split)[0][:count]
    for i, image in enumerate(np.round(x[:, 0] * 255).astype(np.uint8)):
        save(root / f"{i:04d}.png", image)


def test_distill_on_own_images_with_a_labelled_then_an_unlabelled_test_folder(tmp_path, capsys):
    from db3kd.cli import main

    digits_folder(tmp_path / "train", "train", 10)
    digits_folder(tmp_path / "test", "test", 4)
    flat_folder(tmp_path / "test-flat", "test", 40)
    soft, student = tmp_path / "bd", tmp_path / "student"
    assert main(["soft-labels", "--teacher", str(DIGITS_TEACHER), "--dataset", str(tmp_path / "train"), "--method",
                 "bd", "--queries-per-pair", "6", "--out", str(soft)]) == 0
    common = ["distill", "--transfer", str(soft), "--student", "lenet5-fifth", "--epochs", "2"]
    assert main([*common, "--out", str(student)]) == 2  # your images: no test split to fall back on
    assert "--test-dataset" in capsys.readouterr().err
    assert main([*common, "--test-dataset", str(tmp_path / "test"), "--out", str(student)]) == 0
    labelled = json.loads((student / "metrics.json").read_text())
    assert labelled["test_labelled"] is True and 0 <= labelled["test_accuracy"] <= 1 and "fidelity" in labelled
    assert labelled["teacher_queries"]["evaluation"] == 40 and labelled["dataset"] == "train"
    assert main([*common, "--test-dataset", str(tmp_path / "test-flat"), "--out", str(tmp_path / "s2")]) == 0
    unlabelled = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert unlabelled["test_labelled"] is False and unlabelled["test_accuracy"] is None
    assert 0 <= unlabelled["fidelity"] <= 1 and unlabelled["teacher_queries"]["evaluation"] == 40
    assert all("test_accuracy" not in h for h in unlabelled["history"])
    assert "no test accuracy (unlabelled test images), fidelity" in capsys.readouterr().out
    assert main([*common, "--test-dataset", str(tmp_path / "test-flat"), "--no-fidelity",
                 "--out", str(tmp_path / "s3")]) == 2
    assert "fidelity is all that can be measured" in capsys.readouterr().err


def test_a_recipe_with_unlabelled_test_images_reports_fidelity_only(tmp_path):
    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe
    from db3kd.report import write_report

    digits_folder(tmp_path / "exp" / "train", "train", 8)
    flat_folder(tmp_path / "exp" / "test", "test", 30)
    recipe = load_recipe(write_recipe(tmp_path / "exp" / "recipe.yaml",
                                      recipe_dict({"name": "train", "test": "test"}, baselines=["teacher", "ce"])))
    run_recipe(recipe, tmp_path / "run", progress=False)
    report = write_report(tmp_path / "run")
    assert "have no labels: no test accuracy can be given (—), only fidelity" in report
    rows = [line for line in report.splitlines() if line.startswith("| ce ") or line.startswith("| bd ")]
    assert len(rows) == 2 and all(row.split(" | ")[4] == "—" for row in rows)  # the accuracy column
