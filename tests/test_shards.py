"""The shard store behind resumable runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from db3kd.errors import ConfigError, DataError
from db3kd.shards import ShardStore


def test_shards_are_written_read_and_merged_in_order(tmp_path):
    store = ShardStore(tmp_path, {"method": "bd", "seed": 0})
    store.write(1, a=np.array([3, 4]), b=np.ones((2, 2)))
    store.write(0, a=np.array([1, 2]), b=np.zeros((2, 2)))
    assert store.done(0) and store.done(1) and not store.done(2)
    merged = store.merge(range(2))
    np.testing.assert_array_equal(merged["a"], [1, 2, 3, 4])
    assert merged["b"].shape == (4, 2)


def test_reopening_with_the_same_fingerprint_resumes(tmp_path):
    ShardStore(tmp_path, {"method": "bd", "shape": (1, 2)}).write(0, a=np.arange(3))
    store = ShardStore(tmp_path, {"shape": [1, 2], "method": "bd"})  # same content, other order and types
    assert store.done(0)
    np.testing.assert_array_equal(store.read(0)["a"], np.arange(3))


def test_a_different_fingerprint_is_refused_with_the_difference(tmp_path):
    ShardStore(tmp_path, {"method": "bd", "seed": 0}).write(0, a=np.arange(3))
    with pytest.raises(ConfigError, match=r"seed: was 0, now 1.*another --out"):
        ShardStore(tmp_path, {"method": "bd", "seed": 1})


def test_a_directory_without_finished_shards_is_taken_over(tmp_path):
    """A run that failed before its first shard (a wrong teacher) must not block the corrected rerun."""
    ShardStore(tmp_path, {"teacher": "wrong", "seed": 0})
    store = ShardStore(tmp_path, {"teacher": "right", "seed": 0})
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"seed": 0, "teacher": "right"}
    store.write(0, a=np.arange(3))
    with pytest.raises(ConfigError, match="teacher: was 'right', now 'wrong'"):
        ShardStore(tmp_path, {"teacher": "wrong", "seed": 0})


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(DataError, match=r"out is a file; expected a directory"):
        ShardStore(tmp_path / "out", {"k": 1})


def test_half_written_and_corrupt_shards(tmp_path):
    store = ShardStore(tmp_path, {"k": 1})
    (store.shard_dir / "00003.npz.tmp").write_bytes(b"partial")  # what a kill during a write leaves
    store = ShardStore(tmp_path, {"k": 1})
    assert not list(store.shard_dir.glob("*.tmp")) and not store.done(3)
    store.path(4).write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable.*delete it and rerun"):
        store.read(4)
