"""The DB3KD loss and `db3kd distill` on a transfer set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from db3kd.cli import main
from db3kd.errors import ConfigError
from db3kd.losses import KDLoss
from db3kd.transfer import load_transfer_set


def manual_kd(s, y, z, t, ce_weight, kd_weight, t2, reduction):
    p = F.softmax(z / t, dim=1)
    kl = (p * (p.log() - F.log_softmax(s / t, dim=1))).sum(dim=1)
    kl = kl.sum() if reduction == "sum" else kl.mean()
    return ce_weight * F.cross_entropy(s, y) + kd_weight * kl * (t * t if t2 else 1)


@pytest.mark.parametrize("kwargs", [
    {},
    {"temperature": 4.0, "t2_scaling": True, "reduction": "batchmean"},
    {"ce_weight": 0.0, "kd_weight": 2.0},
], ids=["paper-defaults", "hinton-style", "kd-only"])
def test_kd_loss_matches_its_formula(kwargs):
    torch.manual_seed(0)
    s, z, y = torch.randn(16, 10), torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    loss = KDLoss(**kwargs)
    full = {"temperature": 20.0, "ce_weight": 1.0, "kd_weight": 1.0, "t2_scaling": False, "reduction": "sum", **kwargs}
    expected = manual_kd(s, y, z, full["temperature"], full["ce_weight"], full["kd_weight"], full["t2_scaling"], full["reduction"])
    torch.testing.assert_close(loss(s, y, z), expected)


def test_kd_loss_is_minimised_by_matching_the_soft_targets():
    z, y = torch.tensor([[4.0, 1.0, 0.5]]), torch.tensor([0])
    kd_only = KDLoss(ce_weight=0.0)
    assert kd_only(z.clone(), y, z) < 1e-6 < kd_only(torch.tensor([[0.5, 1.0, 4.0]]), y, z)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"ce_weight": 0, "kd_weight": 0}, "not both 0"),
    ({"reduction": "mean"}, "reduction must be 'sum' or 'batchmean'"),
], ids=["zero-temperature", "zero-weights", "bad-reduction"])
def test_kd_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KDLoss(**kwargs)


def test_distill_trains_a_student_on_bd_soft_labels(digits_teacher, tmp_path, capsys):
    transfer, student = tmp_path / "bd", tmp_path / "student"
    assert main(["soft-labels", "--teacher", str(digits_teacher), "--dataset", "digits", "--method", "bd",
                 "--subset", "300", "--out", str(transfer)]) == 0
    assert main(["distill", "--transfer", str(transfer), "--student", "lenet5-half", "--dataset", "digits",
                 "--epochs", "15", "--batch-size", "64", "--lr", "3e-3", "--out", str(student)]) == 0
    metrics = json.loads((student / "metrics.json").read_text())
    manifest = json.loads((transfer / "manifest.json").read_text())
    assert metrics["train_samples"] == 300 and metrics["method"] == "bd"
    assert metrics["teacher_queries"]["total"] == manifest["total_queries"]
    assert metrics["teacher_queries"]["evaluation"] == 359  # the digits test split, once
    assert metrics["test_accuracy"] > 0.6 and metrics["fidelity"] > 0.6
    assert metrics["loss"] == {"temperature": 20.0, "ce_weight": 1.0, "kd_weight": 1.0, "t2_scaling": False,
                               "reduction": "sum"}
    assert all((student / f).is_file() for f in ("model.pt", "model.onnx", "curve.png"))
    assert "fidelity" in capsys.readouterr().out


def test_transfer_set_errors_name_the_problem(tmp_path):
    from db3kd.errors import DataError

    with pytest.raises(DataError, match="manifest.json not found; expected the output directory of `db3kd soft-labels"):
        load_transfer_set(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "digits", "split": "train"}))
    np.savez(tmp_path / "soft_labels.npz", indices=np.arange(2), labels=np.zeros(2, np.int64), logits=np.zeros((2, 10)))
    with pytest.raises(DataError, match="lacks reference_label_queries, estimator_queries"):
        load_transfer_set(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "digits", "split": "train",
                                                       "reference_label_queries": 0, "estimator_queries": 0}))
    np.savez(tmp_path / "soft_labels.npz", labels=np.zeros(2, np.int64), logits=np.zeros((2, 10)))
    with pytest.raises(DataError, match="lacks indices"):
        load_transfer_set(tmp_path)
    np.savez(tmp_path / "soft_labels.npz", indices=np.arange(2), labels=np.zeros(2, np.int64),
             logits=np.full((2, 10), np.nan))
    with pytest.raises(DataError, match="NaN or inf"):
        load_transfer_set(tmp_path)


def test_distill_with_hard_labels_for_the_images_without_soft_labels(digits_teacher, tmp_path):
    transfer, student = tmp_path / "bd", tmp_path / "student"
    assert main(["soft-labels", "--teacher", str(digits_teacher), "--dataset", "digits", "--method", "bd",
                 "--queries-per-pair", "5", "--subset", "60", "--out", str(transfer)]) == 0
    # --no-fidelity on a dataset's test split never opens the teacher: one moved away since is no obstacle.
    assert main(["distill", "--transfer", str(transfer), "--student", "lenet5-fifth", "--dataset", "digits",
                 "--teacher", str(tmp_path / "moved.onnx"), "--epochs", "1", "--hard-labels-for-rest",
                 "--no-fidelity", "--out", str(student)]) == 0
    metrics = json.loads((student / "metrics.json").read_text())
    manifest = json.loads((transfer / "manifest.json").read_text())
    assert metrics["train_samples"] == 1438 and metrics["hard_labelled_samples"] == 1378
    assert metrics["teacher_queries"]["total"] == manifest["total_queries"]  # the rest's labels cost nothing more
    soft = load_transfer_set(transfer, hard_labels_for_rest=True)
    reference = np.load(transfer / "reference_labels.npz")["labels"]
    np.testing.assert_array_equal(soft.labels[60:], reference[60:])  # the images outside the subset, in order
    assert np.isnan(soft.logits[60:]).all() and np.isfinite(soft.logits[:60]).all()
