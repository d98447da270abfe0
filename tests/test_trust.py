"""Runs that cannot be silently corrupted and never lose a paid query: teacher identity, contracts checked before
any query, one writer per directory, SIGTERM and a full disk, known costs up front, superseded stage results,
clean errors. (The label service's and client's own defences: tests/test_http_client.py, test_http_service.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from db3kd.checkpoint import ModelSpec, export_onnx
from db3kd.cli import main
from db3kd.errors import TeacherError
from db3kd.oracle import LabelOracle
from db3kd.teachers import TorchBackend

BD = ["--method", "bd", "--subset", "24", "--shard-size", "8"]  # 3 shards


def soft_labels(teacher, out, *extra) -> int:
    return main(["soft-labels", "--teacher", str(teacher), "--dataset", "digits", "--out", str(out), *BD, *extra])


def attempts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]


def constant_teacher(path: Path, num_classes: int = 10, label: int | None = 3) -> Path:
    """An ONNX teacher of 8x8 images answering `label` for everything (or, with None, an untrained net)."""
    spec = ModelSpec("lenet5-fifth", (1, 8, 8), num_classes, dataset="digits")
    torch.manual_seed(0)
    model = spec.build()
    if label is not None:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[label] = 1.0
    return export_onnx(model, spec, path)


# --- the teacher is identified by what it is, not where it lies ---------------------------------------------------

def test_a_teacher_replaced_at_the_same_path_is_refused_on_resume(digits_teacher, tmp_path, capsys):
    teacher = tmp_path / "teacher.onnx"
    shutil.copy(digits_teacher, teacher)
    out = tmp_path / "run"
    assert soft_labels(teacher, out, "--budget-total", str(1438 + 3000)) == 2  # stopped in the second shard
    assert list((out / "shards").glob("*.npz"))
    constant_teacher(teacher, label=None)  # retrained in place between the crash and the resume
    assert soft_labels(teacher, out) == 2
    assert "holds shards of a different run (teacher_identity: was 'sha256:" in capsys.readouterr().err


def test_the_same_teacher_under_another_path_resumes(digits_teacher, tmp_path):
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out, "--budget-total", str(1438 + 3000)) == 2
    assert list((out / "shards").glob("*.npz"))  # stopped after a finished shard
    moved = tmp_path / "moved.onnx"
    shutil.copy(digits_teacher, moved)
    assert soft_labels(moved, out) == 0
    assert json.loads((out / "manifest.json").read_text())["teacher_identity"].startswith("sha256:")


# --- mismatches are caught before any query -----------------------------------------------------------------------

def test_a_teacher_of_other_classes_is_refused_before_any_query(tmp_path, capsys):
    seven = constant_teacher(tmp_path / "seven.onnx", num_classes=7, label=None)
    assert soft_labels(seven, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "answers 7 classes, but the digits dataset has images (1, 8, 8) in 10 classes" in err
    assert not (tmp_path / "run").exists()  # nothing sent, nothing written


@pytest.mark.parametrize("classes", [10 ** 12, 1])
def test_an_absurd_class_count_is_refused_when_the_teacher_opens(classes):
    backend = TorchBackend(torch.nn.Flatten(), (1, 2, 2), 4, device="cpu")
    backend.num_classes = classes
    with pytest.raises(TeacherError, match=f"declares {classes} classes; expected between 2 and 100,000"):
        LabelOracle(backend)


def test_a_teacher_that_labels_everything_one_class_is_refused_with_its_queries_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert soft_labels(constant_teacher(tmp_path / "one.onnx"), out) == 2
    assert "labels all 1,438 reference images class 3: no other class has a sample" in capsys.readouterr().err
    assert attempts(out) == [{**attempts(out)[0], "queries": 1438, "kept": True}]  # paid for, and on record


def test_distill_refuses_soft_labels_of_another_dataset(digits_teacher, tmp_path, capsys):
    assert soft_labels(digits_teacher, tmp_path / "bd") == 0
    assert main(["distill", "--transfer", str(tmp_path / "bd"), "--student", "lenet5-fifth", "--dataset",
                 "fashion-mnist", "--out", str(tmp_path / "student")]) == 2
    assert "is not the data of" in (err := capsys.readouterr().err) and "pass --dataset digits" in err


# --- one writer per directory -------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_first(digits_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from db3kd.io import exclusive\n"
         f"with exclusive({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert soft_labels(digits_teacher, out) == 2
        err = capsys.readouterr().err
        assert f"is in use by another db3kd process (pid {holder.pid} on host {os.uname().nodename}" in err
        assert not (out / "shards").exists()
    finally:
        holder.communicate("")
    assert soft_labels(digits_teacher, out) == 0  # the lock died with its holder


# --- paid queries are never lost ----------------------------------------------------------------------------------

def test_sigterm_stops_like_ctrl_c_with_the_shard_in_flight_on_record(digits_teacher, tmp_path, monkeypatch, capsys):
    from db3kd.jobs.soft_labels import SoftLabelJob

    original = SoftLabelJob.__call__

    def terminated_in_second_shard(self, oracle, shard):
        arrays = original(self, oracle, shard)
        if shard == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler or `docker stop` would, mid-run
        return arrays

    monkeypatch.setattr(SoftLabelJob, "__call__", terminated_in_second_shard)
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out) == 143
    assert "terminated (SIGTERM); finished shards and every query sent are recorded" in capsys.readouterr().err
    lost = [a for a in attempts(out) if a["shard"] == 1]
    assert lost and lost[0]["kept"] is False and lost[0]["queries"] > 0 and "Terminated" in lost[0]["error"]
    monkeypatch.undo()
    assert soft_labels(digits_teacher, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["queries_discarded"] == lost[0]["queries"]
    assert manifest["queries_sent"] == manifest["total_queries"] + lost[0]["queries"]


def test_a_full_disk_keeps_the_reference_label_queries_on_record(digits_teacher, tmp_path, monkeypatch, capsys):
    import db3kd.jobs.soft_labels as job

    def no_space(path, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(job, "save_npz", no_space)
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device" in err and "1,438 queries" in err
    assert "Traceback" not in err
    assert attempts(out)[0]["queries"] == 1438 and attempts(out)[0]["kept"] is False


def test_a_full_disk_keeps_a_shards_queries_on_record(digits_teacher, tmp_path, monkeypatch, capsys):
    from db3kd.shards import ShardStore

    original = ShardStore.write

    def full_at_second(self, shard, **arrays):
        if shard == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path(shard)))
        return original(self, shard, **arrays)

    monkeypatch.setattr(ShardStore, "write", full_at_second)
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out) == 2
    assert "cannot write shard 1" in capsys.readouterr().err
    lost = [a for a in attempts(out) if a["shard"] == 1]
    assert lost[0]["kept"] is False and lost[0]["queries"] > 0


def test_known_costs_above_the_budget_are_refused_before_the_first_query(digits_teacher, tmp_path, capsys):
    # The split's reference labels (1,438 queries) do not fit in 1,000.
    assert soft_labels(digits_teacher, tmp_path / "run", "--budget-total", "1000") == 2
    err = capsys.readouterr().err
    assert "this call needs 1438 more (1000 left)" in err and "Labelling the split's 1,438 reference images" in err
    assert not (tmp_path / "run" / "attempts.jsonl").exists()  # nothing was sent
    # Mixtures cost one query each: 30 pseudo samples' synthesis fits, 30,000 mixtures do not; refused up front.
    out = tmp_path / "pseudo"
    assert main(["synthesize", "--teacher", str(digits_teacher), "--per-class", "3", "--queries-per-sample", "120",
                 "--rounds", "1", "--shard-size", "30", "--out", str(out)]) == 0
    assert main(["synthesize", "--teacher", str(digits_teacher), "--per-class", "3", "--queries-per-sample", "120",
                 "--rounds", "1", "--shard-size", "30", "--mixtures", "30000", "--budget-total", "10000",
                 "--out", str(out)]) == 2
    assert "this call needs 30000 more (10000 left)" in capsys.readouterr().err
    assert not list((out / "mixtures" / "shards").glob("*.npz"))


def test_a_budget_stop_says_what_the_refused_batch_needed(digits_teacher, tmp_path, capsys):
    assert soft_labels(digits_teacher, tmp_path / "run", "--budget-total", str(1438 + 100)) == 2
    err = capsys.readouterr().err
    needed = int(err.split("this call needs ")[1].split(" more")[0])
    assert needed > 1 and f"({100 - 0} left)" not in err  # the batch the budget refused, not a placeholder
    assert "It ran out during shard 0" in err


# --- edits do not destroy paid results ----------------------------------------------------------------------------

def test_editing_a_recipe_sets_old_results_aside_and_going_back_reuses_them(digits_teacher, tmp_path):
    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe
    from db3kd.report import write_report

    raw = {"name": "edit", "dataset": {"name": "digits"}, "teacher": str(digits_teacher),
           "transfer": {"split": "train", "subset": 40},
           "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": 10}}},
           "students": {"arch": ["lenet5-fifth"], "train": {"epochs": 1, "batch_size": 64}}}
    path, run_dir = tmp_path / "recipe.yaml", tmp_path / "run"

    def run(queries: int) -> dict:
        raw["soft_labels"]["bd"]["params"]["queries_per_pair"] = queries
        path.write_text(yaml.safe_dump(raw))
        return {r.name: r.status for r in run_recipe(load_recipe(path), run_dir, progress=False)}

    run(10)
    first = json.loads((run_dir / "soft_labels/bd/stage.json").read_text())
    assert run(12)["soft_labels/bd"] == "done"
    aside = run_dir / "superseded" / "soft_labels" / "bd" / first["hash"]
    assert (aside / "soft_labels.npz").is_file()  # the 10-query results, paid for, kept
    assert f"superseded/soft_labels/bd/{first['hash']}" in write_report(run_dir)
    assert run(10) == {"soft_labels/bd": "skipped", "students/bd-lenet5-fifth-seed0": "skipped"}
    assert json.loads((run_dir / "soft_labels/bd/stage.json").read_text())["hash"] == first["hash"]


# --- clean errors --------------------------------------------------------------------------------------------------

def test_out_naming_a_file_is_a_clean_error(digits_teacher, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert soft_labels(digits_teacher, tmp_path / "file") == 2
    assert "file is a file; expected a directory" in capsys.readouterr().err


def test_corrupt_result_files_are_clean_errors(digits_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert soft_labels(digits_teacher, out) == 0
    (out / "soft_labels.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["distill", "--transfer", str(out), "--student", "lenet5-fifth", "--dataset", "digits",
                 "--out", str(tmp_path / "student")]) == 2
    assert "soft_labels.npz is unreadable (BadZipFile" in capsys.readouterr().err
    (out / "reference_labels.npz").write_bytes(b"garbage")
    shutil.rmtree(out / "shards")
    assert soft_labels(digits_teacher, out) == 2
    err = capsys.readouterr().err
    assert "reference_labels.npz is unreadable" in err and "delete it and rerun" in err and "Traceback" not in err


def test_a_recipe_with_a_key_said_twice_is_refused(digits_teacher, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: twice\ndataset: {{name: digits}}\nteacher: {digits_teacher}\nbaselines: [ce]\n"
                      "students:\n  arch: [lenet5-fifth]\n  seeds: [0]\n  seeds: [1]\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "line 6: key 'seeds' appears twice in one mapping" in capsys.readouterr().err
