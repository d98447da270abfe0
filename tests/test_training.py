"""Training, checkpoints, ONNX export and the train-teacher / train-student / demo commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from db3kd.checkpoint import ModelSpec, export_onnx, load_checkpoint, save_checkpoint
from db3kd.cli import main
from db3kd.errors import CheckpointError, ConfigError
from db3kd.models import build_model
from db3kd import open_oracle
from db3kd.training import TrainConfig, accuracy, train_classifier


def separable_data(n=256, seed=0):
    """Two classes told apart by mean brightness of the left half: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.5, (n, 1, 28, 28)).astype(np.float32)
    x[y == 1, :, :, :14] += 0.5
    return x, y.astype(np.int64)


def test_train_classifier_learns_and_records_history():
    x, y = separable_data()
    torch.manual_seed(0)
    model = build_model("lenet5-half", (1, 28, 28), 2)
    result = train_classifier(model, x, y, TrainConfig(epochs=4, batch_size=32), eval_set=(x, y), progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.final_accuracy == accuracy(model, x, y) and result.final_accuracy > 0.95


def test_training_is_reproducible_with_a_seed():
    x, y = separable_data()
    torch.manual_seed(0)
    a = build_model("lenet5-half", (1, 28, 28), 2)
    b = build_model("lenet5-half", (1, 28, 28), 2)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        train_classifier(m, x, y, TrainConfig(epochs=1, batch_size=32, seed=3), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "epochs must be a positive integer"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("lr", -1.0, r"lr must be a number in \(0, inf\), got -1.0"),
    ("weight_decay", -0.1, r"weight_decay must be a number in \[0, inf\), got -0.1"),
], ids=["zero-epochs", "float-batch", "negative-lr", "negative-decay"])
def test_train_config_rejects_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value})


def test_checkpoint_roundtrip_and_onnx_export_agree(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(arch="lenet5-half", input_shape=(1, 28, 28), num_classes=10, dataset="mnist")
    model = spec.build().eval()
    save_checkpoint(tmp_path / "model.pt", model, spec)
    loaded, loaded_spec = load_checkpoint(tmp_path / "model.pt")
    assert loaded_spec == spec
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    export_onnx(model, spec, tmp_path / "model.onnx")
    oracle = open_oracle(tmp_path / "model.onnx")
    assert oracle.num_classes == 10 and oracle.input_shape == (1, 28, 28)
    assert torch.equal(oracle.labels(x), model(x).argmax(1))


def test_load_checkpoint_errors_are_precise(tmp_path):
    with pytest.raises(CheckpointError, match="model file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a db3kd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_train_teacher_then_student_from_teacher_labels(tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert main(["train-teacher", "--dataset", "digits", "--arch", "lenet5-half", "--epochs", "6", "--lr", "3e-3",
                 "--batch-size", "64", "--out", str(teacher_dir)]) == 0
    metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.85 and metrics["epochs"] == 6 and metrics["seconds"] > 0
    assert metrics["onnx_argmax_agreement"] == 1.0
    assert all((teacher_dir / f).is_file() for f in ("model.pt", "model.onnx", "curve.png"))

    assert main(["train-student", "--dataset", "digits", "--arch", "lenet5-fifth", "--epochs", "3",
                 "--labels", "teacher", "--teacher", str(teacher_dir / "model.onnx"), "--out", str(student_dir)]) == 0
    student = json.loads((student_dir / "metrics.json").read_text())
    from db3kd.data import load_dataset

    digits = load_dataset("digits")
    # Every training image was labelled once by the teacher, every test image once for fidelity.
    assert student["teacher_queries"]["total"] == len(digits.x_train)
    assert student["teacher_queries"]["evaluation"] == len(digits.x_test)
    assert 0.0 < student["fidelity"] <= 1.0
    assert "fidelity" in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    code = main(["train-student", "--dataset", "digits", "--labels", "teacher", "--out", str(tmp_path)])
    assert code == 2
    assert "--labels teacher needs --teacher" in capsys.readouterr().err
    code = main(["train-teacher", "--dataset", "digits", "--arch", "nonesuch", "--epochs", "1", "--out", str(tmp_path)])
    assert code == 2
    assert "nonesuch" in capsys.readouterr().err


def test_demo_runs_the_whole_path(tmp_path, capsys, monkeypatch):
    from db3kd import demo

    # A smaller zero-shot synthesis than the demo's (30 pseudo samples): the same path, in seconds.
    monkeypatch.setattr(demo, "DEMO_SYNTHESIS", {"per_class": 3, "queries_per_sample": 200, "rounds": 2, "shard_size": 10})
    monkeypatch.setattr(demo, "DEMO_MIXTURES", {"count": 300, "max_shift": 1})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_accuracy"] > 0.5 and summary["run_dirs"] == [str(out / "data"), str(out / "zero-shot")]

    def metrics(path: str) -> dict:
        return json.loads((out / path / "metrics.json").read_text())

    ce, bd = metrics("data/students/ce-lenet5-half-seed0"), metrics("data/students/bd-lenet5-half-seed0")
    assert ce["teacher_queries"]["total"] == ce["teacher_queries"]["labels"] == summary["train_samples"]
    manifest = json.loads((out / "data" / "soft_labels" / "bd" / "manifest.json").read_text())
    assert bd["teacher_queries"]["total"] == manifest["total_queries"] > summary["train_samples"]
    assert 0 < bd["fidelity"] <= 1 and 0 < ce["fidelity"] <= 1
    # Zero-shot: the student's queries are the synthesis's, the soft labels' (which label nothing again) and
    # the mixtures' (one each).
    zero_shot = metrics("zero-shot/students/bd-lenet5-half-seed0")
    synth = json.loads((out / "zero-shot" / "synthesize" / "manifest.json").read_text())
    soft = json.loads((out / "zero-shot" / "soft_labels" / "bd" / "manifest.json").read_text())
    assert synth["num_samples"] == 30 and soft["reference_label_queries"] == 0
    assert zero_shot["teacher_queries"] == {"synthesis": synth["total_queries"], "labels": 0,
                                            "soft_labels": soft["estimator_queries"], "mixtures": 300,
                                            "evaluation": 359, "total": synth["total_queries"] + soft["total_queries"] + 300}
    assert zero_shot["train_samples"] == 30 + 300 and zero_shot["transfer_set"] == "synthesized"
    printed = capsys.readouterr().out
    assert "| ce | lenet5-half | train split, 1,438 images" in printed and "| bd | lenet5-half | synthesized, 30 pseudo " \
        "samples + 300 mixtures" in printed
    assert (out / "data" / "report.md").is_file() and (out / "zero-shot" / "accuracy_vs_queries.png").is_file()


def test_standard_kd_baseline_reads_logits_and_says_so(digits_teacher, tmp_path, monkeypatch):
    from db3kd.whitebox import WhiteBoxTeacher

    calls = []
    original = WhiteBoxTeacher.logits
    monkeypatch.setattr(WhiteBoxTeacher, "logits", lambda self, x: calls.append(len(x)) or original(self, x))
    out = tmp_path / "kd"
    assert main(["train-student", "--dataset", "digits", "--arch", "lenet5-fifth", "--epochs", "2", "--labels",
                 "whitebox-logits", "--teacher", str(digits_teacher), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(calls) == metrics["train_samples"]  # logits of every training image, read in batches
    assert metrics["labels"] == "whitebox-logits"
    assert metrics["white_box"] is True and metrics["loss"]["temperature"] == 20.0


def test_standard_kd_refuses_a_label_service(tmp_path, capsys):
    assert main(["train-student", "--dataset", "digits", "--labels", "whitebox-logits", "--teacher",
                 "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    assert "a label service does not give" in capsys.readouterr().err
