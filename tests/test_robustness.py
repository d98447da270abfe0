"""SD, BD and MBD against a linear teacher whose boundary distances are known in closed form, and LeNet-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from db3kd.errors import ConfigError, InputError
from db3kd.oracle import LabelOracle
from db3kd.robustness import (
    BoundaryDistance, MinimalBoundaryDistance, SampleDistance, distances_to_logits, estimator_from_name,
)
from db3kd.teachers import TorchBackend

SHAPE = (1, 6, 6)
CLASSES = 4


class Linear(torch.nn.Module):
    """Scores W x + b, computed in float64 so a batch never changes a label."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double().reshape(len(x), -1) @ self.weight.T + self.bias


@pytest.fixture(scope="module")
def linear():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn((CLASSES, int(np.prod(SHAPE))), generator=gen, dtype=torch.float64)
    bias = -weight.sum(dim=1) * 0.5  # centres the classes on the middle of the box
    return Linear(weight, bias)


def fresh_oracle(module, budget=None) -> LabelOracle:
    return LabelOracle(TorchBackend(module, SHAPE, CLASSES, device="cpu"), budget=budget)


def teacher_labels(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(torch.as_tensor(x)).argmax(dim=1).numpy()


def half_space_distance(module, x, labels) -> np.ndarray:
    """(N, K) distance from x to the half-space z_t >= z_c: a lower bound of the distance to class t,
    exact when the projection onto that plane is labelled t and inside the box."""
    with torch.no_grad():
        z = module(torch.as_tensor(x)).numpy()
    w = module.weight.numpy()
    zc = z[np.arange(len(x)), labels][:, None]
    gap = zc - z  # (N, K)
    norm = np.linalg.norm(w[labels][:, None, :] - w[None, :, :], axis=2)  # (N, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 0, gap / norm, np.inf)


@pytest.fixture(scope="module")
def data(linear):
    rng = np.random.default_rng(1)
    # Samples near the middle of the box so the nearest boundary point is usually inside it.
    x = rng.uniform(0.3, 0.7, (6, *SHAPE)).astype(np.float32)
    ref = rng.uniform(0.0, 1.0, (400, *SHAPE)).astype(np.float32)
    return x, teacher_labels(linear, x), ref, teacher_labels(linear, ref)


def check_points(module, result, x, labels, bounds=(0.0, 1.0)):
    """Every finite distance comes from a point inside the box, labelled t, at exactly that distance."""
    n, k = result.distances.shape
    for i in range(n):
        for t in range(k):
            d = result.distances[i, t]
            if t == labels[i] or not np.isfinite(d):
                assert np.isnan(result.points[i, t]).all()
                continue
            p = result.points[i, t]
            assert p.min() >= bounds[0] and p.max() <= bounds[1]
            assert teacher_labels(module, p[None])[0] == t
            assert np.linalg.norm((p - x[i]).astype(np.float64)) == pytest.approx(d, rel=1e-6)


# --- SD ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3], ids=["nearest", "mean-of-3"])
def test_sd_is_the_mean_distance_to_the_k_nearest_references(linear, data, k):
    x, labels, ref, ref_y = data
    result = SampleDistance(k=k)(fresh_oracle(linear), x, labels, ref, ref_y)
    d = np.linalg.norm((x[:, None] - ref[None]).reshape(len(x), len(ref), -1).astype(np.float64), axis=2)
    for i in range(len(x)):
        for t in range(CLASSES):
            expected = np.inf if t == labels[i] else np.sort(d[i, ref_y == t])[:k].mean()
            assert result.distances[i, t] == pytest.approx(expected, rel=1e-5)
    assert (result.queries == 0).all()


# --- BD ---------------------------------------------------------------------------------------------

def test_bd_bounds_the_true_distance_from_above_with_honest_points_and_counts(linear, data):
    x, labels, ref, ref_y = data
    oracle = fresh_oracle(linear)
    bd = BoundaryDistance(max_directions=8, tolerance=0.01, queries_per_pair=40)
    result = bd(oracle, x, labels, ref, ref_y, return_points=True)
    truth = half_space_distance(linear, x, labels)
    other = np.arange(CLASSES)[None, :] != labels[:, None]
    assert np.isfinite(result.distances[other]).all() and np.isinf(result.distances[~other]).all()
    assert (result.distances[other] >= truth[other] - 1e-6).all()
    check_points(linear, result, x, labels)
    ids = np.arange(len(x) * CLASSES)
    assert (oracle.queries_for(ids) == result.queries.ravel()).all()
    assert result.queries.sum() == oracle.queries and result.queries.max() <= 40
    assert not result.budget_exhausted


def test_bd_stops_bisection_at_the_relative_tolerance(linear, data):
    """Class regions of a linear teacher are convex, so just below the found point the label is not t."""
    x, labels, ref, ref_y = data
    tol = 0.01
    result = BoundaryDistance(max_directions=1, tolerance=tol, strategy="bisect", queries_per_pair=40)(
        fresh_oracle(linear), x, labels, ref, ref_y, return_points=True)
    for i in range(len(x)):
        for t in range(CLASSES):
            if t != labels[i]:
                inside = x[i] + (1 - 1.01 * tol) * (result.points[i, t] - x[i])
                assert teacher_labels(linear, inside[None])[0] != t


def test_bd_refines_its_winner_to_the_relative_tolerance_when_the_budget_allows(linear, data):
    """With queries to spare, "descent" ends on a point labelled t within `tolerance` of a point of its own
    search path that is not: the linear teacher's class regions are convex, so half-way between the two
    (along the straight segment, when the winner is a reference) the label is not t either."""
    x, labels, ref, ref_y = data
    tol = 0.01
    bd = BoundaryDistance(max_directions=4, tolerance=tol, queries_per_pair=200)
    result = bd(fresh_oracle(linear), x, labels, ref, ref_y, return_points=True)
    assert result.queries.max() < 200  # stopped by the tolerance and the directions, not the budget
    for i in range(len(x)):
        for t in range(CLASSES):
            if t != labels[i]:
                p = result.points[i, t]
                inside = np.clip(x[i] + (1 - 2.5 * tol) * (p - x[i]), 0, 1)
                assert teacher_labels(linear, inside[None])[0] != t


@pytest.mark.parametrize("budget", [20, 40])
def test_bd_descent_keeps_its_budget_and_beats_the_previous_search(teacher_onnx, budget):
    """On LeNet-5 (references 3,000 MNIST training images labelled by the teacher, 20 samples x 9 targets), the
    default search spends at most `budget` queries per pair and its median is no larger than the previous
    search's ("bisect") at the same budget. (At twice the budget the previous search can win on so few
    references; on the benchmark's 60,000 it does not: benchmarks/results/robustness.json.)"""
    from db3kd import open_oracle
    from db3kd.data import load_split

    x_all, _ = load_split("mnist", "train", teacher_onnx.parent.parent / "data")
    x_all = x_all[:3000]
    ref_y = open_oracle(teacher_onnx).labels(x_all)
    x, labels = x_all[:20], ref_y[:20]
    oracle = open_oracle(teacher_onnx)
    new = BoundaryDistance(queries_per_pair=budget)(oracle, x, labels, x_all, ref_y, return_points=True)
    assert new.queries.max() <= budget and new.queries.sum() == oracle.queries
    finite = np.isfinite(new.distances)
    assert finite.sum() == 20 * 9
    assert (oracle.labels(new.points[finite]) == np.nonzero(finite)[1]).all()
    old = BoundaryDistance(max_directions=32, queries_per_pair=budget, strategy="bisect")(
        open_oracle(teacher_onnx), x, labels, x_all, ref_y)
    assert old.queries.max() <= budget
    assert np.median(new.distances[finite]) <= np.median(old.distances[finite])


def test_bd_restricted_targets_and_batch_invariance(linear, data):
    x, labels, ref, ref_y = data
    bd = BoundaryDistance(max_directions=6)
    batch = bd(fresh_oracle(linear), x, labels, ref, ref_y, targets=[0, 2])
    assert np.isinf(batch.distances[:, [1, 3]]).all() and (batch.queries[:, [1, 3]] == 0).all()
    for i in (0, 3):
        for t in (0, 2):
            if t == labels[i]:
                continue
            alone = bd(fresh_oracle(linear), x[i:i + 1], labels[i:i + 1], ref, ref_y, targets=[t])
            assert alone.distances[0, t] == batch.distances[i, t]
            assert alone.queries[0, t] == batch.queries[i, t]


def test_bd_stops_cleanly_when_the_budget_runs_out(linear, data):
    x, labels, ref, ref_y = data
    oracle = fresh_oracle(linear, budget=25)
    result = BoundaryDistance(batch_pairs=2)(oracle, x, labels, ref, ref_y, return_points=True)
    assert result.budget_exhausted and oracle.queries <= 25
    assert result.queries.sum() == oracle.queries
    assert np.isinf(result.distances[result.queries == 0]).all()  # pairs never started
    assert np.isfinite(result.distances).any()
    check_points(linear, result, x, labels)


def test_bd_rejects_bad_input(linear, data):
    x, labels, ref, ref_y = data
    with pytest.raises(InputError, match=r"expected x of shape \(N, 1, 6, 6\)"):
        BoundaryDistance()(fresh_oracle(linear), x[:, :, :5], labels, ref, ref_y)
    with pytest.raises(InputError, match="expected labels as 6 integers"):
        BoundaryDistance()(fresh_oracle(linear), x, labels[:3], ref, ref_y)
    with pytest.raises(InputError, match="expected targets"):
        BoundaryDistance()(fresh_oracle(linear), x, labels, ref, ref_y, targets=[7])


# --- MBD --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mbd_run(linear, data):
    x, labels, ref, ref_y = data
    oracle = fresh_oracle(linear)
    mbd = MinimalBoundaryDistance(queries_per_pair=600, checkpoints=(100, 300, 600), probes=12,
                                  bd=BoundaryDistance(max_directions=8))
    return mbd, oracle, mbd(oracle, x, labels, ref, ref_y, return_points=True)


def test_mbd_improves_on_bd_and_approaches_the_true_distance(linear, data, mbd_run):
    x, labels, ref, ref_y = data
    _, _, result = mbd_run
    bd = BoundaryDistance(max_directions=8)(fresh_oracle(linear), x, labels, ref, ref_y)
    other = np.isfinite(bd.distances)
    truth = half_space_distance(linear, x, labels)
    assert (result.distances[other] <= bd.distances[other]).all()
    assert (result.distances[other] >= truth[other] - 1e-6).all()
    # The lower bound is exact for about half of these pairs (elsewhere the box or a third class interferes);
    # 600 queries in 36 dimensions bring most pairs within a third of it, from about twice it after BD.
    assert np.median(result.distances[other] / truth[other]) < 1.35
    assert np.median(result.distances[other] / bd.distances[other]) < 0.8
    check_points(linear, result, x, labels)


def test_mbd_checkpoints_budget_and_counts(data, mbd_run):
    x, _, _, _ = data
    mbd, oracle, result = mbd_run
    assert result.checkpoints == (100, 300, 600) and result.distances_at.shape == (3, len(x), CLASSES)
    finite = np.isfinite(result.distances)
    at = result.distances_at[:, finite]
    assert (np.diff(at, axis=0) <= 0).all()  # more queries never worsen the estimate
    assert (at[-1] == result.distances[finite]).all()
    assert result.queries.max() <= mbd.queries_per_pair
    # The budget is spent: a last iteration takes as many probes as are left (at least 8), so a pair stops
    # with fewer than 8 probes + 4 step and bisection queries unused.
    assert result.queries[finite].min() > mbd.queries_per_pair - 12
    assert (oracle.queries_for(np.arange(len(x) * CLASSES)) == result.queries.ravel()).all()


def test_mbd_pair_alone_equals_pair_in_batch(linear, data, mbd_run):
    x, labels, ref, ref_y = data
    mbd, _, batch = mbd_run
    i, t = 2, (labels[2] + 1) % CLASSES
    alone = mbd(fresh_oracle(linear), x[i:i + 1], labels[i:i + 1], ref, ref_y, targets=[t])
    assert alone.distances[0, t] == batch.distances[i, t]
    assert alone.queries[0, t] == batch.queries[i, t]
    assert (alone.distances_at[:, 0, t] == batch.distances_at[:, i, t]).all()


def test_mbd_stops_cleanly_when_the_budget_runs_out(linear, data):
    x, labels, ref, ref_y = data
    oracle = fresh_oracle(linear, budget=300)
    mbd = MinimalBoundaryDistance(queries_per_pair=200, checkpoints=(100, 200), subspace=3, probes=8, batch_pairs=4)
    result = mbd(oracle, x, labels, ref, ref_y, return_points=True)
    assert result.budget_exhausted and result.queries.sum() == oracle.queries <= 300
    assert np.isinf(result.distances[result.queries == 0]).all()
    finite = np.isfinite(result.distances)
    at = result.distances_at[:, finite]
    assert (np.diff(at, axis=0) <= 0).all() and (at >= result.distances[finite]).all()
    assert (at[-1] == result.distances[finite]).all()  # the stop came before any pair passed 200 queries
    check_points(linear, result, x, labels)


# --- registry and soft labels -----------------------------------------------------------------------

def test_registry_builds_by_name_and_refuses_unknowns():
    assert isinstance(estimator_from_name("bd", max_directions=4), BoundaryDistance)
    assert isinstance(estimator_from_name("sd"), SampleDistance)
    assert estimator_from_name("mbd", queries_per_pair=100, checkpoints=(50,)).queries_per_pair == 100
    with pytest.raises(ConfigError, match="unknown robustness estimator 'hsj'"):
        estimator_from_name("hsj")
    with pytest.raises(ConfigError, match="unknown parameter\\(s\\) 'tol' for estimator 'bd'"):
        estimator_from_name("bd", tol=0.1)


@pytest.mark.parametrize("build,match", [
    (lambda: BoundaryDistance(tolerance=0), "tolerance must be a number in"),
    (lambda: BoundaryDistance(queries_per_pair=0), "queries_per_pair must be a positive integer"),
    (lambda: BoundaryDistance(strategy="nearest"), "strategy must be 'descent' or 'bisect', got 'nearest'"),
    (lambda: MinimalBoundaryDistance(momentum=-0.5), r"momentum must be a number in \[0, inf\)"),
    (lambda: SampleDistance(k=1.5), "k must be a positive integer"),
    (lambda: MinimalBoundaryDistance(queries_per_pair=100, checkpoints=(50, 200)), "checkpoints must be increasing and <= queries_per_pair"),
    (lambda: MinimalBoundaryDistance(subspace=0), r"subspace \(a grid side, .pca. or None\) must be a positive integer"),
], ids=["zero-tolerance", "zero-queries", "bad-strategy", "negative-momentum", "float-k", "checkpoint-over-budget",
        "zero-subspace"])
def test_constructors_refuse_bad_hyper_parameters(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_distances_to_logits_follows_the_paper():
    d = np.array([[np.inf, 2.0, 4.0], [1.0, np.inf, np.inf]])
    logits = distances_to_logits(d, np.array([0, 1]))
    np.testing.assert_allclose(logits, [[0.75, 0.5, 0.25], [1.0, 1.0, 0.0]])
    with pytest.raises(InputError, match="distance 0.0 of sample 0 to class 1 is not positive"):
        distances_to_logits(np.array([[np.inf, 0.0]]), np.array([0]))
    with pytest.raises(InputError, match="expected labels as 1 integers in \\[0, 2\\)"):
        distances_to_logits(np.array([[np.inf, 1.0]]), np.array([2]))


# --- the real teacher -------------------------------------------------------------------------------

def test_bd_and_mbd_on_lenet5(teacher_onnx, shared_dir):
    from db3kd.data.idx import read
    from db3kd import open_oracle

    images = read(shared_dir / "data" / "mnist" / "train-images-idx3-ubyte.gz")[:2000]
    x_all = (images.astype(np.float32) / 255.0)[:, None]
    oracle = open_oracle(teacher_onnx)
    ref_y = oracle.labels(x_all)  # references labelled by the teacher, as the estimators expect
    x, labels = x_all[:3], ref_y[:3]
    before = oracle.queries
    bd = BoundaryDistance()(oracle, x, labels, x_all, ref_y, return_points=True)
    assert np.isfinite(bd.distances[np.arange(10)[None] != labels[:, None]]).all()
    assert bd.queries.max() <= 40 and bd.queries.sum() == oracle.queries - before
    finite = np.isfinite(bd.distances)
    assert (oracle.labels(bd.points[finite]) == np.nonzero(finite)[1]).all()
    sd = SampleDistance()(oracle, x, labels, x_all, ref_y)
    assert (bd.distances[finite] <= sd.distances[finite] + 1e-6).all()  # BD may end at the reference itself
    mbd = MinimalBoundaryDistance(queries_per_pair=150, checkpoints=(150,))(oracle, x[:1], labels[:1], x_all, ref_y,
                                                                 targets=[(labels[0] + 1) % 10])
    t = (labels[0] + 1) % 10
    assert mbd.distances[0, t] <= bd.distances[0, t]
