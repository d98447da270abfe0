"""A recipe's total query budget: the plan, its stages, and a run that stays within it."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from db3kd.budget import BudgetSpec, plan_budget
from db3kd.errors import ConfigError
from db3kd.pipeline import run_recipe
from db3kd.recipe import load_recipe, parse_recipe

from test_recipes import tiny_recipe, write_recipe


@pytest.mark.parametrize("queries,images,expected", [
    (500, 1438, (500, 0, 0)),  # fewer queries than images: labels for the first 500, nothing else
    (1_000_000, 60_000, (60_000, 40, 5222)),  # MNIST at 1M: the rest in BD soft labels, 40 left for mixtures
    (1_000_000, 2_000, (2_000, 600_000, 2_000)),  # few images: every image soft-labelled, mixtures up to their cap
])
def test_the_plan_never_costs_more_than_the_budget(queries, images, expected):
    plan = plan_budget(BudgetSpec(queries), images, 10)
    assert (plan.labelled, plan.mixtures, plan.soft_labelled) == expected
    assert plan.at_most <= queries
    if images == 2_000:  # what cannot buy anything useful is left unspent
        assert plan.at_most == 2_000 + 600_000 + 2_000 * 9 * 20 < queries
    else:
        assert plan.at_most == queries


def test_mixtures_first_spends_what_the_soft_labels_leave_on_mixtures():
    # mixture_share 1: mixtures up to their cap first, then soft labels with what is left, then mixtures again.
    plan = plan_budget(BudgetSpec(1_000_000, mixture_share=1.0, max_mixtures_per_image=100), 2_000, 10)
    assert (plan.labelled, plan.mixtures, plan.soft_labelled) == (2_000, 200_000, 2_000)
    plan = plan_budget(BudgetSpec(1_000_000, mixture_share=1.0), 60_000, 10)
    assert (plan.labelled, plan.mixtures, plan.soft_labelled, plan.at_most) == (60_000, 940_000, 0, 1_000_000)
    with pytest.raises(ConfigError, match=r"mixture_share must be a number in \[0, 1\], got 1.5"):
        BudgetSpec(1_000_000, mixture_share=1.5)


def budget_recipe(teacher, queries: int, **extra) -> dict:
    raw = tiny_recipe(teacher)
    raw.update(transfer={"split": "train"}, soft_labels={}, baselines=["teacher"], budget={"queries": queries, **extra})
    return raw


def test_a_budgeted_run_spends_within_its_budget_and_records_the_plan(digits_teacher, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", budget_recipe(digits_teacher, 3000)))
    assert recipe.transfer.mixtures.count == 122 and recipe.soft_labels["budget"].subset == 8
    assert recipe.soft_labels["budget"].hard_labels_for_rest
    run_recipe(recipe, tmp_path / "run", progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    budget = run["budget"]
    assert budget["at_most"] == 3000 and budget["within_budget"]
    assert budget["spent"] == {"mixtures": 122, "soft_labels/budget": budget["spent_total"] - 122}
    evaluation = 359 + 359  # the teacher baseline and the student's fidelity, each once over the test split
    assert run["teacher_queries_this_run"] - evaluation == budget["spent_total"] <= 3000
    student = json.loads((tmp_path / "run" / "students" / "budget-lenet5-fifth-seed0" / "metrics.json").read_text())
    assert student["train_samples"] == 1438 + 122 and student["hard_labelled_samples"] == 1430
    assert student["teacher_queries"]["total"] == budget["spent_total"]
    from db3kd.report import write_report

    assert (f"3,000 teacher queries planned as: labels for 1,438 images, 122 mixtures of them, BD soft labels for the 8 "
            f"of them a selector student is least sure of, toward every other class, at <= 20 queries per pair, the "
            f"selector's adversarial direction searched first (at most 3,000 in all). Spent: `mixtures` 122, `soft_labels/budget` "
            f"{budget['spent_total'] - 122:,}; {budget['spent_total']:,} in all, within the budget.") in write_report(tmp_path / "run")
    # The resolved recipe holds the plan and reads back as the same stages: a rerun does nothing.
    again = load_recipe(tmp_path / "run" / "recipe.resolved.yaml")
    assert again.budget_plan == recipe.budget_plan
    assert {r.status for r in run_recipe(again, tmp_path / "run", progress=False)} == {"skipped"}


def test_a_budget_below_the_images_buys_labels_only(digits_teacher, tmp_path):
    recipe = parse_recipe(budget_recipe(digits_teacher, 500))
    assert recipe.transfer.subset == 500 and recipe.transfer.mixtures is None and not recipe.soft_labels
    assert recipe.baselines == ["ce", "teacher"]


def test_the_budget_draws_its_mixtures_as_its_mixture_options_say(digits_teacher, tmp_path):
    raw = budget_recipe(digits_teacher, 3000, mixture_options={"max_rotation": 15, "max_scale": 0.1, "rounds": 2})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    mixtures = recipe.transfer.mixtures
    assert (mixtures.count, mixtures.max_rotation, mixtures.max_scale, mixtures.max_shift) == (122, 15, 0.1, 3)
    assert (mixtures.rounds, mixtures.pool) == (2, 4)
    # The resolved recipe (mixtures written out beside the budget) reads back as the same plan.
    again = parse_recipe(dataclasses.asdict(recipe))
    assert again.transfer.mixtures == mixtures and again.budget_plan == recipe.budget_plan


@pytest.mark.parametrize("change,message", [
    ({"soft_labels": {"bd": {"method": "bd"}}}, "budget: expected no soft_labels or transfer.mixtures beside it"),
    ({"budget": {"queries": 3000, "mixture_options": {"count": 5}}},
     r"budget\.mixture_options: unknown option 'count'; expected some of max_shift, min_brightness"),
    ({"budget": {"queries": 3000, "mixture_options": {"max_scale": 2}}},
     r"budget\.mixture_options: max_scale must be a number in \[0, 1\), got 2"),
    ({"baselines": ["ce"]}, "baselines: expected no ce beside a budget that buys soft labels"),
    ({"transfer": {"synthesize": {"per_class": 2}}}, "budget: expected a budget over real images"),
    ({"budget": {"queries": 0}}, r"budget\.queries: must be a positive integer, got 0"),
])
def test_budget_conflicts_are_refused(digits_teacher, change, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe({**budget_recipe(digits_teacher, 3000), **change})


def test_db3kd_run_takes_a_budget_on_the_command_line(digits_teacher, tmp_path, capsys):
    from db3kd.cli import main

    raw = budget_recipe(digits_teacher, 10**9)
    del raw["budget"]
    raw["soft_labels"] = {}
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["run", str(path), "--budget", "700", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("700 teacher queries planned as: labels for 700 images, 0 mixtures of them, no soft labels (at most 700 "
            "in all); spent 700") in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["budget"]["spent"] == {"students/ce-lenet5-fifth-seed0": 700} and run["budget"]["within_budget"]


def test_a_budgeted_run_killed_midway_resumes_to_the_same_purchases(digits_teacher, tmp_path):
    # Killed once the images' labels are bought (before its selector, guide and BD): the rerun reuses them and
    # buys the same as an uninterrupted run.
    raw = budget_recipe(digits_teacher, 3000)
    raw["students"]["seeds"] = [0]
    path = write_recipe(tmp_path / "r.yaml", raw)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_recipe(load_recipe(path), full, progress=False)
    cmd = [sys.executable, "-m", "db3kd", "run", str(path), "--out", str(killed), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        labels = killed / "soft_labels" / "budget" / "reference_labels.npz"
        while not labels.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for a file, not sleeping to synchronise
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "run.json").exists()
    run_recipe(load_recipe(path), killed, progress=False)
    a, b = (np.load(d / "soft_labels" / "budget" / "soft_labels.npz") for d in (full, killed))
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    spent = [json.loads((d / "run.json").read_text())["budget"] for d in (full, killed)]
    assert spent[0]["spent"] == spent[1]["spent"] and spent[1]["within_budget"]
