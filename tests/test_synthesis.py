"""`db3kd synthesize` and the zero-shot path: pseudo samples keep their class, move away from the boundary,
spend exactly the queries counted, resume, refuse mixed runs; soft labels and distillation on them touch
no real training image."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from db3kd import open_oracle
from db3kd.cli import main
from db3kd.errors import BudgetExceededError, ConfigError, DataError
from db3kd.jobs.synthesis import SynthesisConfig, rejection_sample, synthesize

SMALL = dict(per_class=2, queries_per_sample=300, rounds=2, shard_size=10, draw_batch=200, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def small_run(digits_teacher, tmp_path_factory):
    """One small synthesis with the digits teacher (20 samples, 2 rounds), and the oracle that made it."""
    out = tmp_path_factory.mktemp("synth")
    oracle = open_oracle(digits_teacher)
    manifest = synthesize(oracle, SynthesisConfig(**SMALL), out, {"teacher": str(digits_teacher)}, progress=False)
    return out, oracle, manifest


def test_samples_keep_their_class_and_move_away_from_the_boundary(small_run, digits_teacher):
    out, _, manifest = small_run
    r = load(out / "pseudo_samples.npz")
    n = 2 * 10
    assert r["images"].shape == (n, 1, 8, 8) and r["images"].dtype == np.float32
    np.testing.assert_array_equal(r["labels"], np.tile(np.arange(10), 2))
    assert r["distances"].shape == (2, n)
    assert r["images"].min() >= 0 and r["images"].max() <= 1
    # The teacher labels every final image with its label.
    np.testing.assert_array_equal(open_oracle(digits_teacher).labels(r["images"]), r["labels"])
    mean = r["distances"].mean(axis=1)
    assert mean[-1] > r["initial_distances"].mean() * 1.2
    assert (np.diff(np.concatenate([[r["initial_distances"].mean()], mean])) > -0.05 * mean.max()).all()
    assert (out / "samples.png").stat().st_size > 0
    assert set(manifest["acceptance_rates"]) == {str(c) for c in range(10)}
    assert all(0 < a <= 1 for a in manifest["acceptance_rates"].values())


def test_queries_are_exactly_the_oracles_and_within_the_budget(small_run):
    out, oracle, manifest = small_run
    r = load(out / "pseudo_samples.npz")
    ids = np.arange(len(r["labels"]))
    np.testing.assert_array_equal(r["queries"], oracle.queries_for(ids))
    assert r["queries"].max() <= SMALL["queries_per_sample"]
    assert manifest["total_queries"] == oracle.queries
    assert manifest["total_queries"] == manifest["rejection_sampling_queries"] + manifest["round_queries"]
    assert manifest["round_queries"] == r["queries"].sum()
    assert manifest["noise_draws"] == manifest["rejection_sampling_queries"]


def test_resume_after_interruption_gives_the_same_result(small_run, digits_teacher, tmp_path):
    out, _, manifest = small_run
    stopped = tmp_path / "resumed"
    oracle = open_oracle(digits_teacher, budget=manifest["total_queries"] - 1)  # dies in the last of 2 shards
    with pytest.raises(BudgetExceededError):
        synthesize(oracle, SynthesisConfig(**SMALL), stopped, {"teacher": str(digits_teacher)}, progress=False)
    assert len(list((stopped / "shards").glob("*.npz"))) == 1
    synthesize(open_oracle(digits_teacher), SynthesisConfig(**SMALL), stopped, {"teacher": str(digits_teacher)}, progress=False)
    first, again = load(out / "pseudo_samples.npz"), load(stopped / "pseudo_samples.npz")
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)


def test_changed_parameters_are_refused(small_run, digits_teacher, tmp_path):
    out, _, _ = small_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ConfigError, match="rounds: was 2, now 3"):
        synthesize(open_oracle(digits_teacher), SynthesisConfig(**{**SMALL, "rounds": 3}), copy,
                   {"teacher": str(digits_teacher)}, progress=False)


def test_a_class_never_hit_raises_instead_of_looping(digits_teacher):
    oracle = open_oracle(digits_teacher)
    config = SynthesisConfig(per_class=1, max_draws=50, draw_batch=20)
    # Asking 100 samples of one class from 50 draws cannot succeed; the error names the class and the draws.
    with pytest.raises(DataError, match=r"class 3 was labelled \d+ times in 50 noise images, fewer than the 100"):
        rejection_sample(oracle, np.full(100, 3), config, np.random.default_rng(0))
    assert oracle.queries == 50


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_class=0), r"per_class must be a positive integer, got 0"),
    (dict(per_class=2, rounds=-1), r"rounds must be a positive integer, got -1"),
    (dict(per_class=2, step=0), r"step must be a number in \(0, 4\]"),
    (dict(per_class=2, seed=1.5), r"seed must be an integer, got 1.5"),
    (dict(per_class=2, queries_per_sample=True), r"queries_per_sample must be a positive integer, got True"),
], ids=["per-class", "rounds", "step", "seed", "bool-budget"])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SynthesisConfig(**kwargs)


@pytest.mark.parametrize("extra, message", [
    (["--shard-size", "4"], r"shard_size must be at least the number of classes \(10\)"),
    (["--queries-per-sample", "20"], r"queries_per_sample must be at least 113 for 8 rounds and 10 classes"),
], ids=["shard-size", "budget"])
def test_bad_arguments_fail_before_any_query(digits_teacher, tmp_path, capsys, extra, message):
    code = main(["synthesize", "--teacher", str(digits_teacher), "--per-class", "2", *extra, "--out", str(tmp_path / "o")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_soft_labels_needs_exactly_one_source(digits_teacher, tmp_path, capsys):
    code = main(["soft-labels", "--teacher", str(digits_teacher), "--method", "bd", "--out", str(tmp_path / "o")])
    assert code == 2 and "expected exactly one of --dataset" in capsys.readouterr().err


def test_zero_shot_path_touches_no_training_image(teacher_onnx, shared_dir, tmp_path, monkeypatch):
    """synthesize -> soft-labels --pseudo -> distill with a data dir holding only MNIST's test files."""
    from db3kd.data import mnist

    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_dir / "data" / "mnist" / name, data / name)
    splits = []
    real_load_split = mnist.load_split

    def test_split_only(name, split, root, *, download):
        splits.append(split)
        if split != "test":
            raise AssertionError(f"the zero-shot path loaded the {split} split")
        return real_load_split(name, split, root, download=False)

    monkeypatch.setattr(mnist, "load_split", test_split_only)
    synth, soft, student = tmp_path / "synth", tmp_path / "soft", tmp_path / "student"
    teacher = str(teacher_onnx)
    assert main(["synthesize", "--teacher", teacher, "--per-class", "2", "--queries-per-sample", "120", "--rounds", "1",
                 "--shard-size", "20", "--mixtures", "300", "--out", str(synth)]) == 0
    oracle_before = json.loads((synth / "manifest.json").read_text())["total_queries"]
    assert main(["soft-labels", "--teacher", teacher, "--pseudo", str(synth), "--method", "bd", "--queries-per-pair", "10",
                 "--out", str(soft)]) == 0
    r = load(soft / "soft_labels.npz")
    pseudo = load(synth / "pseudo_samples.npz")
    np.testing.assert_array_equal(r["images"], pseudo["images"])
    np.testing.assert_array_equal(r["labels"], pseudo["labels"])
    manifest = json.loads((soft / "manifest.json").read_text())
    # The synthesis labels are the teacher's: no labelling queries, only the estimator's.
    assert manifest["reference_label_queries"] == 0 and manifest["total_queries"] == r["queries"].sum()
    assert oracle_before > 0
    assert main(["distill", "--transfer", str(soft), "--mixtures", str(synth), "--student", "lenet5-fifth", "--dataset",
                 "mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--no-fidelity", "--out", str(student)]) == 0
    assert splits and set(splits) == {"test"}
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["train_samples"] == 20 + 300 and metrics["teacher_queries"]["mixtures"] == 300
