"""Training, checkpoints, ONNX export and the train-teacher / train-student / demo commands."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from db3kd.checkpoint import ModelSpec, export_onnx, load_checkpoint, save_checkpoint
from db3kd.cli import main
from db3kd.errors import CheckpointError, ConfigError
from db3kd.models import build_model
from db3kd import open_oracle
from db3kd.training import TrainConfig, accuracy, augment_batch, train_classifier


def separable_data(n=256, seed=0):
    """Two classes told apart by mean brightness of the left half: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.5, (n, 1, 28, 28)).astype(np.float32)
    x[y == 1, :, :, :14] += 0.5
    return x, y.astype(np.int64)


def evaluate_on(x, y):
    return lambda model: {"test_accuracy": accuracy(model, x, y)}


def test_train_classifier_learns_and_records_history():
    x, y = separable_data()
    torch.manual_seed(0)
    model = build_model("lenet5-half", (1, 28, 28), 2)
    result = train_classifier(model, x, y, TrainConfig(epochs=4, batch_size=32, augment="none"), evaluate=evaluate_on(x, y),
                              progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.plan.holdout == 0  # 256 images: too few to hold any out, the final epoch is kept
    assert result.chosen_epoch == 4 and result.history[-1]["test_accuracy"] == result.final_accuracy
    assert result.final_accuracy == accuracy(model, x, y) and result.final_accuracy > 0.95


@pytest.mark.parametrize("samples,channels,expected", [
    (60_000, 1, {"holdout": 5000, "train": 55_000, "batch_size": 128, "epochs": 12, "augment": "shift"}),
    (6_000, 1, {"holdout": 600, "train": 5400, "batch_size": 64, "epochs": 59, "augment": "shift"}),
    (2_000, 1, {"holdout": 200, "train": 1800, "batch_size": 32, "epochs": 88, "augment": "shift"}),
    (50_000, 3, {"holdout": 5000, "train": 45_000, "batch_size": 128, "epochs": 15, "augment": "crop-flip"}),
    (300, 1, {"holdout": 0, "train": 300, "batch_size": 32, "epochs": 300, "augment": "shift"}),
    (1_000_000, 1, {"holdout": 5000, "train": 995_000, "batch_size": 128, "epochs": 3, "augment": "shift"}),
], ids=["mnist", "6k", "2k", "cifar", "tiny", "million"])
def test_auto_profile_derives_sizes_from_the_set(samples, channels, expected):
    plan = TrainConfig().plan(samples, channels)
    assert {k: getattr(plan, k) for k in expected} == expected
    steps = plan.epochs * -(-plan.train // plan.batch_size)
    assert steps >= 4690 or plan.epochs == 300  # at least the optimizer steps of 10 epochs of MNIST at batch 128
    assert plan.epochs >= 10 or steps >= 4 * 5000  # fewer than 10 epochs only for very large sets


def test_paper_profile_and_explicit_settings():
    assert TrainConfig(profile="paper").plan(60_000, 1) == \
        type(TrainConfig().plan(1, 1))(epochs=10, batch_size=512, augment="none", holdout=0, train=60_000)
    plan = TrainConfig(epochs=3, batch_size=100, augment="none", holdout=0.2).plan(6000, 3)
    assert (plan.epochs, plan.batch_size, plan.augment, plan.holdout, plan.train) == (3, 100, "none", 1200, 4800)
    assert TrainConfig(holdout=0).plan(60_000, 1).holdout == 0
    with pytest.raises(ConfigError, match="holdout: 0.1 of 100 images leaves no usable held-out set"):
        TrainConfig(holdout=0.1).plan(100, 1)


@pytest.mark.parametrize("profile", ["auto", "paper"])
def test_steps_give_the_epochs_rounded_up(profile):
    # Fashion-MNIST's 55,000 training images at batch 128 are 430 steps per epoch: 17,200 steps are 40 epochs.
    assert TrainConfig(steps=17_200, batch_size=128).plan(60_000, 1).epochs == 40
    assert TrainConfig(profile=profile, steps=17_201, batch_size=128, holdout=0.1).plan(60_000, 1).epochs == 41
    assert TrainConfig(profile=profile, steps=1, holdout=0).plan(60_000, 1).epochs == 1  # no floor when asked for
    assert TrainConfig(profile=profile).to_dict() == {k: v for k, v in asdict(TrainConfig(profile=profile)).items()
                                                      if k != "steps"}  # absent unless given: old hashes kept
    assert TrainConfig(steps=5).to_dict()["steps"] == 5
    with pytest.raises(ConfigError, match="give epochs or steps, not both"):
        TrainConfig(epochs=3, steps=100)


def test_augmentation_shifts_crops_and_flips_each_image():
    x = torch.rand(64, 3, 32, 32)
    for kind, pad in (("shift", 2), ("crop-flip", 4)):  # 32 // 14 and 32 // 8
        out = augment_batch(x, kind, torch.Generator().manual_seed(0))
        assert out.shape == x.shape
        padded = torch.nn.functional.pad(x, (pad,) * 4)
        offsets, flips = set(), 0
        for image, original in zip(out, padded):  # each output is a window of its padded input, maybe mirrored
            windows = {(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (0, 1)
                       if torch.equal(image.flip(2) if flip else image, original[:, dy:dy + 32, dx:dx + 32])}
            assert windows
            offsets |= {w[:2] for w in windows}
            flips += min(w[2] for w in windows)
        assert len(offsets) > 10  # offsets differ between images
        assert (flips > 10) == (kind == "crop-flip")  # only crop-flip mirrors, about half the images
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)
    small = torch.rand(4, 1, 8, 8)  # too small to shift: 8 // 14 pixels
    assert torch.equal(augment_batch(small, "shift", torch.Generator()), small)
    same = [augment_batch(x, "crop-flip", torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*same)


def test_holdout_chooses_the_epoch_and_its_weights_are_kept(monkeypatch):
    import db3kd.training as training

    scripted = iter([0.6, 0.9, 0.7, 0.9, 0.8, 0.5])  # the hold-out's agreement per epoch: epoch 4 is best (tie: later)
    monkeypatch.setattr(training, "accuracy", lambda model, x, y: next(scripted))
    x, y = separable_data(n=1000)
    torch.manual_seed(0)
    model = build_model("lenet5-fifth", (1, 28, 28), 2)
    weights = lambda m: {"weight_sum": float(sum(p.detach().double().sum() for p in m.parameters()))}  # noqa: E731
    result = train_classifier(model, x, y, TrainConfig(epochs=6, batch_size=32, holdout=0.2), evaluate=weights,
                              progress=False)
    assert result.plan.holdout == 200 and [h["holdout_agreement"] for h in result.history] == [0.6, 0.9, 0.7, 0.9, 0.8, 0.5]
    assert result.chosen_epoch == 4
    assert result.evaluation["weight_sum"] == result.history[3]["weight_sum"] != result.history[-1]["weight_sum"]


def test_training_resumes_from_its_last_finished_epoch(tmp_path):
    x, y = separable_data(n=600)
    config = TrainConfig(epochs=5, batch_size=32, holdout=0.1)

    def model():
        torch.manual_seed(0)
        return build_model("lenet5-fifth", (1, 28, 28), 2)

    whole = model()
    expected = train_classifier(whole, x, y, config, progress=False)

    class Killed(Exception):
        pass

    def killed_in_epoch_4(m):
        if len(seen) == 3:
            raise Killed
        seen.append(1)
        return {}

    seen, state = [], tmp_path / "train_state.pt"
    with pytest.raises(Killed):
        train_classifier(model(), x, y, config, evaluate=killed_in_epoch_4, progress=False, checkpoint=state)
    assert state.is_file()
    resumed = model()
    result = train_classifier(resumed, x, y, config, progress=False, checkpoint=state)
    assert result.resumed_from_epoch == 3 and [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.chosen_epoch == expected.chosen_epoch
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    assert not state.exists()  # removed once training ends

    # A state of another training (other settings) is not resumed from.
    with pytest.raises(Killed):
        seen.clear()
        train_classifier(model(), x, y, config, evaluate=killed_in_epoch_4, progress=False, checkpoint=state)
    other = train_classifier(model(), x, y, TrainConfig(epochs=5, batch_size=16, holdout=0.1), progress=False,
                             checkpoint=state)
    assert other.resumed_from_epoch == 0


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
    ("steps", 0, "steps must be a positive integer"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("lr", -1.0, r"lr must be a number in \(0, inf\), got -1.0"),
    ("profile", "fast", "profile must be 'auto' or 'paper', got 'fast'"),
    ("augment", "flip", "augment must be 'auto', 'none', 'shift' or 'crop-flip', got 'flip'"),
    ("holdout", 0.9, r"holdout must be a number in \[0, 0.5\), got 0.9"),
    ("weight_decay", -0.1, r"weight_decay must be a number in \[0, inf\), got -0.1"),
], ids=["zero-epochs", "zero-steps", "float-batch", "negative-lr", "bad-profile", "bad-augment", "big-holdout", "negative-decay"])
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


def test_a_student_interrupted_in_training_resumes_from_its_last_epoch(tmp_path, monkeypatch, capsys):
    import db3kd.jobs.students as students

    evaluated, real = [], students.accuracy

    def interrupted_at_epoch_3(model, x, y):
        evaluated.append(1)
        if len(evaluated) == 3:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM is turned into the same kind of exit) during epoch 3's test
        return real(model, x, y)

    monkeypatch.setattr(students, "accuracy", interrupted_at_epoch_3)
    out = tmp_path / "student"
    argv = ["train-student", "--dataset", "digits", "--arch", "lenet5-fifth", "--epochs", "5", "--out", str(out)]
    assert main(argv) == 130
    assert (out / "train_state.pt").is_file() and not (out / "metrics.json").exists()
    monkeypatch.setattr(students, "accuracy", real)
    assert main(argv) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert "resuming training after epoch 2/5" in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "whole")]) == 0  # the same training never interrupted
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert resumed["test_accuracy"] == whole["test_accuracy"] and resumed["chosen_epoch"] == whole["chosen_epoch"]
    assert not (out / "train_state.pt").exists()


def test_the_holdout_is_drawn_from_the_pool_only(monkeypatch):
    import db3kd.training as training

    held_out_labels = []
    monkeypatch.setattr(training, "accuracy", lambda model, x, y: held_out_labels.append(y.clone()) or 0.5)
    x, _ = separable_data(n=1000)
    y = np.r_[np.zeros(300, np.int64), np.ones(700, np.int64)]  # rows 300 on: e.g. mixtures, never held out
    torch.manual_seed(0)
    model = build_model("lenet5-fifth", (1, 28, 28), 2)
    result = train_classifier(model, x, y, TrainConfig(epochs=1, batch_size=64, holdout=0.2), progress=False,
                              holdout_pool=300)
    assert result.plan.holdout == 60 and result.plan.train == 940
    assert len(held_out_labels) == 1 and len(held_out_labels[0]) == 60 and not held_out_labels[0].any()
