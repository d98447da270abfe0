"""Soft labels where they pay: pairs chosen by a selector student, the others filled with free sample distances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from db3kd.data import load_split
from db3kd.errors import ConfigError, InputError
from db3kd.jobs.selection import select_pairs
from db3kd.jobs.soft_labels import SoftLabelConfig, compute_soft_labels
from db3kd.oracle import open_oracle
from db3kd.pipeline import run_recipe
from db3kd.recipe import load_recipe, parse_recipe
from db3kd.robustness import BoundaryDistance, SampleDistance
from db3kd.robustness.base import make_pairs

from test_recipes import tiny_recipe, write_recipe


def test_make_pairs_takes_a_per_sample_mask_and_never_the_own_class():
    labels = torch.tensor([0, 2])
    mask = np.array([[True, True, False], [False, False, True]])
    pairs = make_pairs(labels, 3, mask)
    assert list(zip(pairs.sample.tolist(), pairs.target.tolist())) == [(0, 1)]  # (1, 2) is sample 1's own class
    with pytest.raises(InputError, match=r"targets mask of shape \(2, 3\)"):
        make_pairs(labels, 3, np.ones((3, 3), dtype=bool))


def test_uncertain_selection_takes_the_smallest_margins_and_the_most_plausible_other_classes():
    probs = np.array([[0.90, 0.05, 0.05], [0.50, 0.45, 0.05], [0.10, 0.35, 0.55], [0.98, 0.01, 0.01]])
    labels = np.array([0, 0, 2, 0])
    indices, targets = select_pairs(labels, 2, "uncertain", None, probs)
    assert indices.tolist() == [1, 2] and targets is None  # margins 0.05 and 0.20, in index order
    indices, targets = select_pairs(labels, 2, "uncertain", 1, probs)
    assert targets.tolist() == [[False, True, False], [False, True, False]]  # the own class is never a target
    indices, targets = select_pairs(labels, 3, "first", 2, probs)
    assert indices.tolist() == [0, 1, 2] and targets.sum(axis=1).tolist() == [2, 2, 2]
    assert not targets[np.arange(3), labels[:3]].any()
    assert select_pairs(labels, 3)[0].tolist() == [0, 1, 2]  # no selector: the first ones, every class
    with pytest.raises(ConfigError, match="needs a selector's probabilities"):
        select_pairs(labels, 2, "uncertain")
    with pytest.raises(ConfigError, match="classes_per_image must be between 1 and 2"):
        select_pairs(labels, 2, "first", 3, probs)


def test_pairs_outside_the_mask_cost_nothing_and_get_their_sample_distance(digits_teacher, tmp_path):
    x, _ = load_split("digits", "train")
    x = x[:300]
    oracle = open_oracle(digits_teacher)
    labels = oracle.labels(x)
    before = oracle.queries
    indices = np.arange(20)
    targets = np.zeros((20, oracle.num_classes), dtype=bool)
    targets[np.arange(20), (labels[:20] + 1) % oracle.num_classes] = True  # one class per image
    config = SoftLabelConfig("bd", {"queries_per_pair": 10})
    manifest = compute_soft_labels(oracle, x, indices, config, tmp_path / "masked", {"teacher": "t"},
                                   progress=False, targets=targets)
    arrays = np.load(tmp_path / "masked" / "soft_labels.npz")
    spent = arrays["queries"]
    assert (spent[~targets] == 0).all() and (spent[targets] > 0).all()
    assert manifest["estimator_queries"] == spent.sum() == oracle.queries - before - manifest["reference_label_queries"]
    sd = SampleDistance()(oracle, x[:20], labels[:20], x, labels).distances
    bd = BoundaryDistance(queries_per_pair=10)(oracle, x[:20], labels[:20], x, labels, targets=targets).distances
    np.testing.assert_array_equal(arrays["distances"][~targets], sd[~targets])  # inf for the own class
    np.testing.assert_array_equal(arrays["distances"][targets], bd[targets])
    assert (arrays["distances"][targets] <= sd[targets]).all()  # a search never ends farther than its start


def guided_recipe(teacher, **stage) -> dict:
    raw = tiny_recipe(teacher)
    raw["transfer"] = {"split": "train", "subset": 200}
    raw["soft_labels"] = {"bd": {"method": "bd", "params": {"queries_per_pair": 8}, "subset": 30,
                                 "hard_labels_for_rest": True, **stage}}
    raw["baselines"] = []
    return raw


def test_a_guided_stage_searches_the_images_its_selector_is_least_sure_of(digits_teacher, tmp_path):
    raw = guided_recipe(digits_teacher, select="uncertain", classes_per_image=2)
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", raw)), run_dir, progress=False)
    stage = run_dir / "soft_labels" / "bd"
    arrays = np.load(stage / "soft_labels.npz")
    selector = json.loads((stage / "selector" / "metrics.json").read_text())
    assert selector["method"] == "selector" and selector["teacher_queries"]["total"] == 200  # the stage's labels
    # The 30 images of smallest margin under the selector, searched toward 2 classes each.
    from db3kd.checkpoint import load_checkpoint
    from db3kd.training import probabilities

    x, _ = load_split("digits", "train")
    probs = np.sort(probabilities(load_checkpoint(stage / "selector" / "model.pt")[0], x[:200]), axis=1)
    margins = probs[:, -1] - probs[:, -2]
    assert sorted(arrays["indices"].tolist()) == sorted(np.argsort(margins, kind="stable")[:30].tolist())
    assert ((arrays["queries"] > 0).sum(axis=1) <= 2).all()
    assert arrays["queries"].sum() <= 30 * 2 * 8
    done = json.loads((stage / "stage.json").read_text())
    assert 0 <= done["selector_test_accuracy"] <= 1
    student = json.loads((run_dir / "students" / "bd-lenet5-fifth-seed0" / "metrics.json").read_text())
    assert student["hard_labelled_samples"] == 170 and student["train_samples"] == 200
    assert student["teacher_queries"]["total"] == 200 + arrays["queries"].sum()  # the selector costs no query
    from db3kd.report import write_report

    assert "| ce (selector of bd) | lenet5-fifth | teacher's labels, 200 images |" in write_report(run_dir)
    # A rerun reuses everything; another selection is another stage.
    assert {r.status for r in run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir, progress=False)} == {"skipped"}
    other = write_recipe(tmp_path / "r2.yaml", guided_recipe(digits_teacher, select="uncertain"))
    statuses = {r.name: r.status for r in run_recipe(load_recipe(other), run_dir, progress=False)}
    assert statuses["soft_labels/bd"] == "done"


@pytest.mark.parametrize("stage,message", [
    ({"select": "random"}, r"soft_labels\.bd\.select: expected first or uncertain"),
    ({"select": "uncertain", "subset": None, "hard_labels_for_rest": False},
     r"soft_labels\.bd\.select: expected first unless subset is given"),
    ({"classes_per_image": 10}, r"soft_labels\.bd\.classes_per_image: expected at most 9"),
    ({"classes_per_image": 0}, r"soft_labels\.bd\.classes_per_image: expected a positive integer"),
])
def test_bad_selections_are_refused(digits_teacher, stage, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(guided_recipe(digits_teacher, **stage))


def test_a_guide_that_imitates_the_teacher_finds_nearer_boundaries_for_the_same_queries(digits_teacher):
    from db3kd.checkpoint import load_checkpoint

    x, _ = load_split("digits", "train")
    oracle = open_oracle(digits_teacher)
    labels = oracle.labels(x)
    guide, _ = load_checkpoint(digits_teacher.parent / "model.pt")  # the teacher's own weights: a perfect student
    bd = BoundaryDistance(queries_per_pair=10)
    plain = bd(oracle, x[:60], labels[:60], x, labels)
    guided = bd(oracle, x[:60], labels[:60], x, labels, guide=guide)
    assert guided.queries.sum() <= plain.queries.sum() == 60 * 9 * 10
    finite = np.isfinite(plain.distances)
    assert (np.isfinite(guided.distances) == finite).all()
    assert np.median(guided.distances[finite]) < 0.9 * np.median(plain.distances[finite])
    with pytest.raises(InputError, match="expected 3, one per teacher class"):
        from db3kd.robustness.guide import check_guide

        check_guide(guide, (1, 8, 8), 3)
    with pytest.raises(InputError, match="expected the guide as a torch.nn.Module"):
        bd(oracle, x[:2], labels[:2], x, labels, guide="teacher.onnx")


def test_a_stage_guided_by_its_selector_records_it_and_stays_within_its_caps(digits_teacher, tmp_path):
    raw = guided_recipe(digits_teacher, guide=True)
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", raw)), run_dir, progress=False)
    stage = run_dir / "soft_labels" / "bd"
    arrays = np.load(stage / "soft_labels.npz")
    assert arrays["indices"].tolist() == list(range(30))  # select: first
    assert (arrays["queries"].sum(axis=1) <= 9 * 8).all()
    assert json.loads((stage / "stage.json").read_text())["config"]["guide"] is True
    assert (stage / "selector" / "model.pt").is_file()
    with pytest.raises(ConfigError, match=r"soft_labels\.bd\.guide: expected false with sd"):
        parse_recipe(guided_recipe(digits_teacher, method="sd", params={}, guide=True))


def test_soft_labels_cli_takes_a_guide_and_refuses_one_of_other_classes(digits_teacher, tmp_path, capsys):
    from db3kd.checkpoint import ModelSpec, save_checkpoint
    from db3kd.cli import main

    common = ["soft-labels", "--teacher", str(digits_teacher), "--dataset", "digits", "--subset", "5",
              "--method", "bd", "--queries-per-pair", "6"]
    assert main([*common, "--guide", str(digits_teacher.parent / "model.pt"), "--out", str(tmp_path / "g")]) == 0
    assert np.load(tmp_path / "g" / "soft_labels.npz")["queries"].sum() <= 5 * 9 * 6
    spec = ModelSpec(arch="lenet5-fifth", input_shape=(1, 8, 8), num_classes=3, dataset="digits")
    save_checkpoint(tmp_path / "three.pt", spec.build(), spec)
    capsys.readouterr()
    assert main([*common, "--guide", str(tmp_path / "three.pt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "db3kd: error:" in err and "expected 10, one per teacher class" in err
    assert not (tmp_path / "bad" / "reference_labels.npz").exists()  # refused before any query
    assert main([*common[:-4], "--method", "sd", "--guide", str(tmp_path / "three.pt"), "--out", str(tmp_path / "sd")]) == 2
    assert "--guide applies to --method bd or mbd" in capsys.readouterr().err
