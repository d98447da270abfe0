"""`db3kd soft-labels`: outputs, resuming after interruption, refusing mixed runs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from db3kd.cli import main


def soft_labels(teacher, out, *extra):
    return main(["soft-labels", "--teacher", str(teacher), "--dataset", "digits", "--out", str(out), *extra])


def load(out):
    with np.load(out / "soft_labels.npz") as data:
        return {k: data[k] for k in data.files}


def test_bd_writes_consistent_arrays_and_manifest(digits_teacher, tmp_path):
    out = tmp_path / "bd"
    assert soft_labels(digits_teacher, out, "--method", "bd", "--subset", "30", "--shard-size", "8", "--save-points") == 0
    r = load(out)
    n, k = 30, 10
    np.testing.assert_array_equal(r["indices"], np.arange(n))
    assert r["distances"].shape == r["queries"].shape == r["logits"].shape == (n, k)
    assert r["points"].shape == (n, k, 1, 8, 8)
    own = np.zeros((n, k), bool)
    own[np.arange(n), r["labels"]] = True
    assert np.isinf(r["distances"][own]).all() and (r["queries"][own] == 0).all()
    found = np.isfinite(r["distances"])
    # Each reported distance is the L2 distance to a stored point inside the bounds.
    diffs = (r["points"][found] - np.repeat(load_digits_x(r["indices"]), k, axis=0).reshape(n, k, 1, 8, 8)[found])
    np.testing.assert_allclose(np.linalg.norm(diffs.reshape(len(diffs), -1), axis=1), r["distances"][found], rtol=1e-4)
    assert r["points"][found].min() >= 0 and r["points"][found].max() <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "bd" and manifest["num_samples"] == n and manifest["shards"] == 4
    # Total queries = one label per reference sample (the whole split) + the estimator's per-pair queries.
    assert manifest["total_queries"] == manifest["reference_label_queries"] + int(r["queries"].sum())


def load_digits_x(indices):
    from db3kd.data import load_split

    return load_split("digits", "train")[0][indices]


def test_points_are_labelled_with_their_target(digits_teacher, tmp_path):
    from db3kd import open_oracle

    out = tmp_path / "bd"
    soft_labels(digits_teacher, out, "--method", "bd", "--subset", "6", "--save-points")
    r = load(out)
    found = np.isfinite(r["distances"])
    targets = np.broadcast_to(np.arange(10), r["distances"].shape)[found]
    assert (open_oracle(digits_teacher).labels(r["points"][found]) == targets).all()


def test_interrupted_run_resumes_without_redoing_shards(digits_teacher, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--method", "bd", "--subset", "24", "--shard-size", "8"]
    assert soft_labels(digits_teacher, full, *args) == 0
    # A total budget that runs out in the second shard stops the run; the first shard is kept.
    reference_queries = json.loads((full / "manifest.json").read_text())["reference_label_queries"]
    first_shard_queries = int(np.load(full / "shards" / "00000.npz")["shard_queries"][0])
    budget = reference_queries + first_shard_queries + 10
    assert soft_labels(digits_teacher, part, *args, "--budget-total", str(budget)) == 2
    assert (part / "shards" / "00000.npz").exists() and not (part / "soft_labels.npz").exists()
    first_shard_mtime = os.stat(part / "shards" / "00000.npz").st_mtime_ns
    assert soft_labels(digits_teacher, part, *args) == 0
    assert os.stat(part / "shards" / "00000.npz").st_mtime_ns == first_shard_mtime
    a, b = load(full), load(part)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(digits_teacher, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--method", "bd", "--subset", "60", "--shard-size", "4"]
    assert soft_labels(digits_teacher, full, *args) == 0
    cmd = [sys.executable, "-m", "db3kd", "soft-labels", "--teacher", str(digits_teacher), "--dataset", "digits",
           "--out", str(killed), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "shards" / "00001.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for a file, not sleeping to synchronise
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert soft_labels(digits_teacher, killed, *args) == 0
    a, b = load(full), load(killed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_changed_parameters_are_refused(digits_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out, "--method", "bd", "--subset", "4") == 0
    assert soft_labels(digits_teacher, out, "--method", "bd", "--subset", "4", "--seed", "1") == 2
    assert "seed: was 0, now 1" in capsys.readouterr().err


def test_sd_spends_no_estimator_queries(digits_teacher, tmp_path):
    out = tmp_path / "sd"
    assert soft_labels(digits_teacher, out, "--method", "sd", "--subset", "10") == 0
    r = load(out)
    assert (r["queries"] == 0).all() and np.isfinite(r["distances"]).sum() == 10 * 9


def test_mbd_records_checkpoints_and_improves_on_bd(digits_teacher, tmp_path):
    bd, mbd = tmp_path / "bd", tmp_path / "mbd"
    assert soft_labels(digits_teacher, bd, "--method", "bd", "--subset", "6") == 0
    assert soft_labels(digits_teacher, mbd, "--method", "mbd", "--subset", "6", "--queries-per-pair", "200",
                       "--checkpoints", "100,200") == 0
    r = load(mbd)
    assert r["distances_at"].shape == (2, 6, 10)
    np.testing.assert_array_equal(r["checkpoints"], [100, 200])
    finite = np.isfinite(r["distances"])
    assert (r["distances_at"][1][finite] <= r["distances_at"][0][finite]).all()
    assert np.median(r["distances"][finite]) <= np.median(load(bd)["distances"][finite])
    assert r["queries"].max() <= 200


@pytest.mark.parametrize("extra,message", [
    (["--method", "sd", "--queries-per-pair", "10"], "does not apply to --method sd"),
    (["--method", "bd", "--checkpoints", "10,20"], "applies to --method mbd only"),
    (["--method", "mbd", "--checkpoints", "10,x"], "expected comma-separated integers"),
    (["--method", "bd", "--subset", "0"], "--subset must be between 1 and"),
], ids=["sd-budget", "bd-checkpoints", "bad-checkpoints", "empty-subset"])
def test_bad_options_give_precise_errors(digits_teacher, tmp_path, capsys, extra, message):
    assert soft_labels(digits_teacher, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("1\n2\nfoo\n", "expected one integer dataset index per line"),
    ("1\n99999\n", "outside the split's range"),
    ("3\n3\n", "appears more than once"),
], ids=["not-integers", "out-of-range", "duplicate"])
def test_bad_indices_files(digits_teacher, tmp_path, capsys, content, message):
    path = tmp_path / "indices.txt"
    path.write_text(content)
    assert soft_labels(digits_teacher, tmp_path / "x", "--method", "sd", "--indices", str(path)) == 2
    assert message in capsys.readouterr().err


def test_indices_file_selects_samples(digits_teacher, tmp_path):
    np.save(tmp_path / "idx.npy", np.array([5, 2, 9]))
    assert soft_labels(digits_teacher, tmp_path / "run", "--method", "sd", "--indices", str(tmp_path / "idx.npy")) == 0
    np.testing.assert_array_equal(load(tmp_path / "run")["indices"], [5, 2, 9])


def test_mbd_budget_without_checkpoints_records_the_budget(digits_teacher, tmp_path):
    out = tmp_path / "mbd"
    assert soft_labels(digits_teacher, out, "--method", "mbd", "--subset", "3", "--queries-per-pair", "150") == 0
    r = load(out)
    np.testing.assert_array_equal(r["checkpoints"], [150])
    np.testing.assert_array_equal(r["distances_at"][0], r["distances"])
