"""Image sets built when indexed (db3kd.data.rows): they index like the arrays they stand for, and training on
them is training on those arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from db3kd.data.rows import RowStack, row_indices
from db3kd.models import build_model
from db3kd.training import TrainConfig, predict, train_classifier


def _parts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((n, 1, 4, 4), dtype=np.float32) for n in (5, 3, 7)]


@pytest.mark.parametrize("key", [3, -1, 12, slice(None), slice(2, 11), slice(None, None, 3), slice(14, 1, -2),
                                 np.array([14, 0, 5, 5, 7, -15]), torch.tensor([8, 4, 13]), np.zeros(0, dtype=int),
                                 np.array([[1, 9], [6, 0]])],
                         ids=["int", "negative", "last-part", "all", "range", "step", "reverse", "rows", "tensor",
                              "none", "2-d"])
def test_a_stack_indexes_like_the_concatenated_array(key):
    parts = _parts()
    whole = np.concatenate(parts)
    stack = RowStack([parts[0], RowStack(parts[1:])])  # nested stacks are flattened
    assert len(stack) == 15 and stack.shape == whole.shape and stack.ndim == 4 and stack.lazy
    np.testing.assert_array_equal(stack[key], whole[key.numpy() if hasattr(key, "numpy") else key])
    np.testing.assert_array_equal(np.asarray(stack), whole)
    assert [start for start, _ in stack.chunks(4)] == [0, 4, 8, 12]


def test_out_of_range_rows_and_mixed_shapes_are_refused():
    stack = RowStack(_parts())
    with pytest.raises(IndexError, match="rows out of range for 15 images"):
        stack[np.array([0, 15])]
    with pytest.raises(IndexError, match="expected integer rows"):
        stack[np.array([0.5])]
    with pytest.raises(ValueError, match="one shape"):
        RowStack([np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 3, 4, 4), np.float32)])
    with pytest.raises(IndexError, match="not a tuple"):
        stack[1, 2]
    assert row_indices(slice(3, None), 5).tolist() == [3, 4] and stack[[]].shape == (0, 1, 4, 4)


class _NeverWhole(RowStack):
    """A stack that fails if anything builds it whole."""

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("built whole")


def test_training_on_a_stack_is_training_on_its_array():
    """A lazily indexed set gives the same weights, hold-out and history as the array it stands for, and is never
    built whole (training, hold-out, fingerprint and predictions index it)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    x = rng.uniform(0, 0.5, (1000, 1, 28, 28)).astype(np.float32)
    x[y == 1, :, :, :14] += 0.5
    stack = _NeverWhole([x[:800], x[800:]])
    torch.manual_seed(0)
    a = build_model("lenet5-half", (1, 28, 28), 2)
    b = build_model("lenet5-half", (1, 28, 28), 2)
    b.load_state_dict(a.state_dict())
    config = TrainConfig(epochs=2, batch_size=64, seed=1)  # shifts and a held-out tenth drawn from the first 800
    results = [train_classifier(m, data, y, config, progress=False, holdout_pool=800) for m, data in ((a, x), (b, stack))]
    assert results[0].plan.holdout == 80
    assert [h["holdout_agreement"] for h in results[0].history] == [h["holdout_agreement"] for h in results[1].history]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    np.testing.assert_array_equal(predict(b, stack, batch_size=300), predict(a, x))
