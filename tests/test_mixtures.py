"""Teacher-labelled mixtures: images rebuilt exactly from their recipes, one query each, resumable, refused
when mixed with other pseudo samples; the distillation loss gives them cross-entropy only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from db3kd import open_oracle
from db3kd.errors import BudgetExceededError, ConfigError, DataError
from db3kd.losses import KDLoss
from db3kd.jobs.mixtures import MixtureConfig, MixtureJob, draw_recipes, label_mixtures, load_mixtures, mixture_images
from db3kd.jobs.selection import margins
from db3kd.training import probabilities
from db3kd.data.rows import RowStack
from db3kd.io import save_npz
from db3kd.transfer import TransferCost, TransferSet


def recipe(**values):
    base = dict(first=[0], second=[1], weight=[1.0], dy=[0], dx=[0], brightness=[1.0])
    base.update(values)
    dtypes = dict(first=np.int64, second=np.int64, weight=np.float32, dy=np.int8, dx=np.int8, brightness=np.float32,
                  angle=np.float32, scale=np.float32)
    return {k: np.asarray(v, dtype=dtypes[k]) for k, v in base.items()}


def test_images_blend_shift_and_dim_as_their_recipe_says():
    x = np.zeros((2, 1, 5, 5), dtype=np.float32)
    x[0, 0, 2, 2] = 1.0
    x[1] += 0.5
    out = mixture_images(x, recipe(weight=[0.25]), (0.0, 1.0))
    np.testing.assert_allclose(out[0, 0, 2, 2], 0.25 + 0.75 * 0.5)
    np.testing.assert_allclose(out[0, 0, 0, 0], 0.375)
    moved = mixture_images(x, recipe(dy=[1], dx=[-2], brightness=[0.5]), (0.0, 1.0))[0, 0]
    assert moved[3, 0] == 0.5 and moved.sum() == 0.5  # pixel (2, 2) went to (3, 0), dimmed by half
    # The border the shift uncovers holds the lower bound, and dimming goes toward it.
    filled = mixture_images(x + 1, recipe(second=[0], dx=[2], brightness=[0.5]), (1.0, 2.0))[0, 0]
    np.testing.assert_array_equal(filled[:, :2], 1.0)
    assert filled[2, 4] == 1.5


def test_recipes_stay_within_their_ranges():
    config = MixtureConfig(count=1000, max_shift=2, min_brightness=0.4)
    r = draw_recipes(np.random.default_rng(0), 1000, 7, config, (8, 8))
    assert r["first"].max() == 6 and r["second"].min() == 0
    assert np.abs(r["dy"]).max() == 2 and np.abs(r["dx"]).max() == 2
    assert 0.4 <= r["brightness"].min() and r["brightness"].max() <= 1
    assert 0 <= r["weight"].min() and r["weight"].max() <= 1


def test_masks_cut_a_share_of_the_mixtures_down_to_the_lower_bound():
    x = np.random.default_rng(1).random((5, 3, 6, 6), dtype=np.float32) + 1  # colour images in [1, 2]
    plain = draw_recipes(np.random.default_rng(7), 2000, 5, MixtureConfig(count=2000), (6, 6))
    masked = draw_recipes(np.random.default_rng(7), 2000, 5, MixtureConfig(count=2000, mask=0.5), (6, 6))
    assert "mask" not in plain and masked["mask"].shape == (2000, 5)  # 36 bits packed in 5 bytes
    # The mask is drawn last: the rest of each recipe is what it was without masks.
    assert all(np.array_equal(plain[k], masked[k]) for k in plain)
    keep = np.unpackbits(masked["mask"], axis=1, count=36).astype(bool)
    cut = ~keep.all(axis=1)
    assert 0.4 < cut.mean() < 0.55  # about half are masked (a few masks keep every pixel)
    with_mask, without = mixture_images(x, masked, (1.0, 2.0)), mixture_images(x, plain, (1.0, 2.0))
    pixels = keep.reshape(2000, 1, 6, 6).repeat(3, axis=1)  # one mask for every channel
    np.testing.assert_array_equal(with_mask[pixels], without[pixels])
    assert (with_mask[~pixels] == 1.0).all() and (~pixels).any()
    # Hashed and recorded without `mask` when unused: mixtures made before masks existed are not bought again.
    assert "mask" not in MixtureConfig(count=5).params() and MixtureConfig(count=5, mask=0.5).params()["mask"] == 0.5


def test_rotations_and_zooms_turn_and_resize_about_the_centre():
    x = np.zeros((2, 1, 9, 9), dtype=np.float32)
    x[0, 0, 1, 2:7] = 1.0  # a bar across the top
    turned = mixture_images(x, recipe(angle=[90.0], scale=[1.0]), (0.0, 1.0))[0, 0]
    np.testing.assert_allclose(turned[2:7, 7], 1.0, atol=1e-5)  # now down one side
    assert turned.sum() == pytest.approx(5.0, abs=1e-4)
    assert not np.allclose(mixture_images(x, recipe(angle=[-90.0], scale=[1.0]), (0.0, 1.0))[0, 0], turned)
    zoomed = mixture_images(x, recipe(angle=[0.0], scale=[2.0]), (0.0, 1.0))[0, 0]
    assert zoomed.sum() == 0.0  # zoomed in twice: the bar, 3 pixels from the centre, leaves the frame
    x[0, 0, 0:3, 2:7] = 1.0  # a thicker bar, rows 4 to 2 above the centre
    shrunk = mixture_images(x, recipe(angle=[0.0], scale=[0.5]), (0.0, 1.0))[0, 0]
    assert shrunk[:2].sum() == 0.0 and (shrunk[2:4, 3:6] == 1.0).all()  # half as far from the centre
    # What comes in from outside the frame is the lower bound.
    assert (mixture_images(x + 1, recipe(angle=[0.0], scale=[0.5]), (1.0, 2.0))[0, 0, 0] == 1.0).all()


def test_rotated_recipes_are_drawn_last_and_rebuilt_bit_for_bit_in_any_batch():
    x = np.random.default_rng(2).random((6, 3, 7, 5), dtype=np.float32)  # colour, not square
    config = MixtureConfig(count=300, mask=0.5, max_rotation=20, max_scale=0.2)
    plain = draw_recipes(np.random.default_rng(4), 300, 6, MixtureConfig(count=300, mask=0.5), (7, 5))
    turned = draw_recipes(np.random.default_rng(4), 300, 6, config, (7, 5))
    assert all(np.array_equal(plain[k], turned[k]) for k in plain)
    assert np.abs(turned["angle"]).max() <= 20 and np.abs(turned["scale"] - 1).max() <= 0.2
    assert np.abs(turned["angle"]).max() > 15
    whole = mixture_images(x, turned, (0.0, 1.0))
    pieces = [mixture_images(x, {k: v[i:i + 7] for k, v in turned.items()}, (0.0, 1.0)) for i in range(0, 300, 7)]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))
    assert not np.array_equal(whole, mixture_images(x, plain, (0.0, 1.0)))
    # Hashed without them when unused; recorded when used.
    assert not {"max_rotation", "max_scale"} & set(MixtureConfig(count=5).params())
    assert config.params()["max_rotation"] == 20 and config.params()["max_scale"] == 0.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=0), "count must be a positive integer, got 0"),
    (dict(count=5, max_rotation=181), r"max_rotation must be a number in \[0, 180\]"),
    (dict(count=5, max_scale=1.0), r"max_scale must be a number in \[0, 1\)"),
    (dict(count=5, max_shift=-1), "max_shift must be an integer >= 0"),
    (dict(count=5, min_brightness=0), r"min_brightness must be a number in \(0, 1\]"),
    (dict(count=5, shard_size=1.5), "shard_size must be a positive integer, got 1.5"),
    (dict(count=5, mask=1.5), r"mask must be a number in \[0, 1\]"),
    (dict(count=5, rounds=6), r"rounds must be at most count \(5\)"),
    (dict(count=5, pool=0), "pool must be a positive integer, got 0"),
    (dict(count=5, rounds=2, pool=1), "pool must be at least 2 with rounds"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureConfig(**kwargs)


def test_rounds_share_the_count_and_are_hashed_only_when_used():
    assert MixtureConfig(count=10, rounds=3).round_counts() == [4, 3, 3]
    assert MixtureConfig(count=10).round_counts() == [10]
    # Without rounds, the params (and the hash of mixtures bought before rounds existed) are unchanged.
    assert not {"rounds", "pool"} & set(MixtureConfig(count=10).params())
    assert not {"rounds", "pool"} & set(MixtureConfig(count=10, pool=8).params())  # no later round to use it
    assert {k: MixtureConfig(count=10, rounds=2).params()[k] for k in ("rounds", "pool")} == {"rounds": 2, "pool": 4}


def _scorer(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


@pytest.fixture
def synthesis_dir(tmp_path):
    """A stand-in `db3kd synthesize` output: 20 images of the digits shape (the mixtures only need images)."""
    rng = np.random.default_rng(0)
    images = rng.random((20, 1, 8, 8), dtype=np.float32)
    save_npz(tmp_path / "pseudo_samples.npz", images=images, labels=np.arange(20) % 10)
    (tmp_path / "manifest.json").write_text("{}")
    return tmp_path, images


def test_each_mixture_costs_one_query_and_its_label_is_the_teachers(digits_teacher, synthesis_dir):
    out, x = synthesis_dir
    oracle = open_oracle(digits_teacher)
    manifest = label_mixtures(oracle, x, MixtureConfig(count=700, shard_size=300), out / "mixtures", {"t": 1}, progress=False)
    assert oracle.queries == manifest["total_queries"] == 700
    images, labels, _ = load_mixtures(out)
    assert images.shape == (700, 1, 8, 8) and images.dtype == np.float32
    # The rebuilt images are the ones the teacher saw: it gives them the stored labels.
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(images), labels)
    assert sum(manifest["label_counts"]) == 700 and len(np.unique(labels)) > 3


def test_masked_mixtures_are_rebuilt_as_the_teacher_saw_them(digits_teacher, synthesis_dir):
    out, x = synthesis_dir
    oracle = open_oracle(digits_teacher)
    label_mixtures(oracle, x, MixtureConfig(count=500, mask=1.0, shard_size=200), out / "mixtures", {"t": 1},
                   progress=False)
    images, labels, manifest = load_mixtures(out)
    assert oracle.queries == 500 and manifest["params"]["mask"] == 1.0
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(images), labels)
    assert ((np.asarray(images) == 0.0).mean(axis=(1, 2, 3)) > 0.2).mean() > 0.5  # most have large parts cut out


def test_rotated_mixtures_are_rebuilt_as_the_teacher_saw_them(digits_teacher, synthesis_dir):
    out, x = synthesis_dir
    oracle = open_oracle(digits_teacher)
    label_mixtures(oracle, x, MixtureConfig(count=400, max_rotation=30, max_scale=0.2, shard_size=150),
                   out / "mixtures", {"t": 1}, progress=False)
    images, labels, manifest = load_mixtures(out)
    assert oracle.queries == 400 and manifest["params"]["max_rotation"] == 30
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(images), labels)


def test_later_rounds_label_the_candidates_the_selector_is_least_sure_of(digits_teacher, synthesis_dir):
    _, x = synthesis_dir
    config, scorer = MixtureConfig(count=100, rounds=2, pool=5, shard_size=30), _scorer(0)
    oracle = open_oracle(digits_teacher)
    job = MixtureJob(x, config, 10, round=2, scorer=scorer, batch=40)  # 150 candidates scored in 4 chunks
    got = job(oracle, 0)
    assert oracle.queries == 30  # the candidates are scored by the selector, not the teacher
    candidates = [draw_recipes(np.random.default_rng([0, 0, 2, c]), m, len(x), config, (8, 8))
                  for c, m in enumerate([40, 40, 40, 30])]
    candidates = {k: np.concatenate([c[k] for c in candidates]) for k in candidates[0]}
    gaps = margins(probabilities(scorer, mixture_images(x, candidates, oracle.bounds)))
    chosen = np.flatnonzero(np.isin(candidates["weight"], got["weight"]))
    assert len(chosen) == 30 and gaps[chosen].max() <= np.delete(gaps, chosen).min()  # the least sure of 150
    for key, values in candidates.items():
        np.testing.assert_array_equal(got[key], values[chosen])
    recipes = {k: v for k, v in got.items() if k != "labels"}
    np.testing.assert_array_equal(got["labels"], open_oracle(digits_teacher).labels(mixture_images(x, recipes, oracle.bounds)))
    # Round 1 draws shard s from [seed, s]: no candidate of round 2 repeats one of round 1's (seeds never collide).
    first = MixtureJob(x, config, 10)
    drawn = np.concatenate([first(open_oracle(digits_teacher), s)["weight"] for s in range(len(first.shard_sizes()))])
    assert not np.isin(candidates["weight"], drawn).any()
    with pytest.raises(ConfigError, match="later rounds' chosen by a selector student; got round 2 without one"):
        MixtureJob(x, config, 10, round=2)


def test_mixtures_in_rounds_train_each_selector_on_the_rounds_before_and_are_merged(digits_teacher, synthesis_dir):
    out, x = synthesis_dir
    trained = []

    def selector(round, earlier):
        images, labels = earlier()
        trained.append((round, len(images), len(labels)))
        return _scorer(round)

    oracle = open_oracle(digits_teacher)
    config = MixtureConfig(count=300, rounds=3, pool=3, shard_size=60)
    manifest = label_mixtures(oracle, x, config, out / "mixtures", {}, progress=False, selector=selector)
    assert trained == [(2, 100, 100), (3, 200, 200)]
    assert oracle.queries == manifest["total_queries"] == manifest["queries_sent"] == manifest["count"] == 300
    assert manifest["shards"] == 6 and [r["count"] for r in manifest["rounds"]] == [100, 100, 100]
    assert sum(manifest["label_counts"]) == 300
    images, labels, _ = load_mixtures(out)  # the merged rounds, rebuilt as the teacher saw them
    assert len(images) == 300 and len(np.unique(np.asarray(images).reshape(300, -1), axis=0)) == 300
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(images), labels)
    again = open_oracle(digits_teacher)  # finished rounds are not bought again
    assert label_mixtures(again, x, config, out / "mixtures", {}, progress=False, selector=selector)["count"] == 300
    assert again.queries == 0
    # Round 2's shards were chosen by round 2's selector: another one is refused before any query.
    with pytest.raises(ConfigError, match="scorer_sha256"):
        label_mixtures(again, x, config, out / "mixtures", {}, progress=False, selector=lambda r, _: _scorer(r + 7))
    assert again.queries == 0
    with pytest.raises(ConfigError, match="mixtures in 3 rounds need a selector student"):
        label_mixtures(again, x, config, out / "other", {}, progress=False)


def test_a_budget_short_of_all_rounds_is_refused_before_round_1(digits_teacher, synthesis_dir):
    """The rounds' cost is known: round 1 is not bought when round 2 could not be; a resumed run needs only what
    is left (round 1 finished, one shard of round 2 written)."""
    out, x = synthesis_dir
    config = MixtureConfig(count=200, rounds=2, pool=2, shard_size=40)
    short = open_oracle(digits_teacher, budget=150)
    with pytest.raises(BudgetExceededError, match=r"needs 200 more \(150 left\).*2 rounds of mixtures still need 200"):
        label_mixtures(short, x, config, out / "mixtures", {}, progress=False, selector=lambda r, _: _scorer(r))
    assert short.queries == 0 and not (out / "mixtures" / "round1").exists()
    original, calls = MixtureJob.__call__, []

    def interrupted(self, oracle, shard):  # stops in round 2's second shard
        calls.append((self.round, shard))
        if calls[-1] == (2, 1):
            raise KeyboardInterrupt
        return original(self, oracle, shard)

    first = open_oracle(digits_teacher)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MixtureJob, "__call__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            label_mixtures(first, x, config, out / "mixtures", {}, progress=False, selector=lambda r, _: _scorer(r))
    assert first.queries == 140  # round 1's 100 and one shard of round 2
    exact = open_oracle(digits_teacher, budget=60)
    manifest = label_mixtures(exact, x, config, out / "mixtures", {}, progress=False, selector=lambda r, _: _scorer(r))
    assert exact.queries == 60 and manifest["count"] == 200


def test_an_interrupted_run_resumes_to_the_same_mixtures(digits_teacher, synthesis_dir, tmp_path):
    out, x = synthesis_dir
    config = MixtureConfig(count=700, shard_size=300, seed=3)
    label_mixtures(open_oracle(digits_teacher), x, config, out / "mixtures", {}, progress=False)
    # A budget below the known cost (700 queries) is refused before the first query.
    refused = open_oracle(digits_teacher, budget=450)
    with pytest.raises(BudgetExceededError, match=r"this call needs 700 more \(450 left\).*nothing was sent"):
        label_mixtures(refused, x, config, tmp_path / "resumed", {}, progress=False)
    assert refused.queries == 0 and not list((tmp_path / "resumed" / "shards").glob("*.npz"))
    # Interrupted in the second shard: the first is kept, the resumed run labels only the others.
    original, calls = MixtureJob.__call__, []

    def interrupted(self, oracle, shard):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, oracle, shard)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(MixtureJob, "__call__", interrupted)
        label_mixtures(open_oracle(digits_teacher), x, config, tmp_path / "resumed", {}, progress=False)
    assert (tmp_path / "resumed" / "shards" / "00000.npz").exists()
    resumed = open_oracle(digits_teacher)
    label_mixtures(resumed, x, config, tmp_path / "resumed", {}, progress=False)
    assert resumed.queries == 400  # only the two unfinished shards (300 + 100)
    with np.load(out / "mixtures" / "mixtures.npz") as a, np.load(tmp_path / "resumed" / "mixtures.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_other_parameters_or_other_pseudo_samples_are_refused(digits_teacher, synthesis_dir):
    out, x = synthesis_dir
    oracle = open_oracle(digits_teacher)
    label_mixtures(oracle, x, MixtureConfig(count=50), out / "mixtures", {}, progress=False)
    with pytest.raises(ConfigError, match="min_brightness: was 0.3, now 0.5"):
        label_mixtures(oracle, x, MixtureConfig(count=50, min_brightness=0.5), out / "mixtures", {}, progress=False)
    save_npz(out / "pseudo_samples.npz", images=x[::-1].copy(), labels=np.arange(20) % 10)
    with pytest.raises(DataError, match="made from other pseudo samples"):
        load_mixtures(out)


def test_missing_mixtures_say_which_command_makes_them(synthesis_dir):
    out, _ = synthesis_dir
    with pytest.raises(DataError, match="db3kd synthesize --mixtures N"):
        load_mixtures(out)


def test_rows_without_soft_labels_get_cross_entropy_only():
    torch.manual_seed(0)
    student, soft = torch.randn(6, 10), torch.randn(6, 10)
    labels = torch.arange(6)
    soft[4:] = float("nan")
    for reduction in ("sum", "batchmean"):
        kd = KDLoss(reduction=reduction)
        expected = kd(student[:4], labels[:4], soft[:4]) - F.cross_entropy(student[:4], labels[:4]) \
            + F.cross_entropy(student, labels)
        torch.testing.assert_close(kd(student, labels, soft), expected)
    only_hard = KDLoss()(student[4:], labels[4:], soft[4:])
    torch.testing.assert_close(only_hard, F.cross_entropy(student[4:], labels[4:]))


def test_mixtures_join_a_transfer_set_with_nan_logits_and_their_cost():
    base = TransferSet(np.zeros((3, 1, 8, 8), np.float32), np.arange(3), np.ones((3, 10), np.float32),
                       TransferCost(labels=3, soft_labels=50), "train split")
    joined = base.with_mixtures(np.ones((2, 1, 8, 8), np.float32), np.array([7, 8]), queries=2)
    assert joined.images.shape == (5, 1, 8, 8) and joined.labels.tolist() == [0, 1, 2, 7, 8]
    assert np.isfinite(joined.logits[:3]).all() and np.isnan(joined.logits[3:]).all()
    assert (joined.samples, joined.mixtures) == (3, 2)
    assert joined.cost == TransferCost(labels=3, soft_labels=50, mixtures=2) and joined.cost.total == 55
    with pytest.raises(DataError, match="expected images shaped"):
        base.with_mixtures(np.ones((2, 1, 28, 28), np.float32), np.array([7, 8]), queries=2)


def test_stored_mixtures_are_rebuilt_only_when_indexed(digits_teacher, synthesis_dir):
    """Read back, mixtures take the memory of their recipes, not of their images; indexing rebuilds exactly the
    rows asked for, and a transfer set with them stacks them instead of copying."""
    import tracemalloc

    out, x = synthesis_dir
    label_mixtures(open_oracle(digits_teacher), x, MixtureConfig(count=60_000, mask=0.5, shard_size=30_000),
                   out / "mixtures", {"t": 1}, progress=False)
    tracemalloc.start()
    images, labels, _ = load_mixtures(out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert images.shape == (60_000, 1, 8, 8) and peak < 60_000 * 64 * 4 / 2  # the images alone would take 15 MB
    whole = np.asarray(images)
    rows = np.array([59_999, 3, 3, 31_000])
    stored = np.load(out / "mixtures" / "mixtures.npz")
    recipes = {k: stored[k][rows] for k in stored.files if k != "labels"}
    np.testing.assert_array_equal(images[rows], mixture_images(x, recipes, (0.0, 1.0)))
    np.testing.assert_array_equal(whole[rows], images[rows])
    np.testing.assert_array_equal(images[10:20], whole[10:20])
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(images[:500]), labels[:500])
    base = TransferSet(x, np.arange(20) % 10, None, TransferCost(), "synthesized")
    mixed = base.with_mixtures(images, labels, 60_000)
    assert isinstance(mixed.images, RowStack) and len(mixed.images) == 60_020 and mixed.mixtures == 60_000
    np.testing.assert_array_equal(mixed.images[[0, 19, 20, 60_019]], np.concatenate([x[[0, 19]], whole[[0, 59_999]]]))
