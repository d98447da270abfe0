"""Recipes and `db3kd run` / `db3kd report`: schema errors, stage caching, the white-box boundary."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from db3kd.errors import ConfigError
from db3kd.pipeline import plan_stages, run_recipe
from db3kd.recipe import load_recipe, parse_recipe
from db3kd.report import WHITE_BOX_NOTE, write_report

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def tiny_recipe(teacher: Path) -> dict:
    """Seconds of work: 120 transfer images, three soft-label methods, one student, both baselines."""
    return {
        "name": "tiny",
        "dataset": {"name": "digits"},
        "teacher": str(teacher),
        "transfer": {"split": "train", "subset": 120},
        "soft_labels": {
            "sd": {"method": "sd"},
            "bd": {"method": "bd", "params": {"queries_per_pair": 12}},
            "mbd": {"method": "mbd", "params": {"queries_per_pair": 40, "checkpoints": [20, 40], "probes": 8},
                    "subset": 40, "checkpoint_students": True},
        },
        "students": {"arch": ["lenet5-fifth"], "seeds": [0], "train": {"epochs": 1, "batch_size": 64, "lr": 0.003}},
        "baselines": ["teacher", "student-alone", "ce", "standard-kd"],
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # keep the recipe's order: it is the report's
    return path


def run(raw: dict, tmp: Path, run_dir: Path) -> dict[str, str]:
    records = run_recipe(load_recipe(write_recipe(tmp / "recipe.yaml", raw)), run_dir, progress=False)
    return {r.name: r.status for r in records}


def stage_mtimes(run_dir: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.glob("*/*/stage.json")}


@pytest.fixture(scope="module")
def base_run(digits_teacher, tmp_path_factory):
    """The tiny recipe run once, counting which stages read the teacher's logits."""
    from db3kd.whitebox import WhiteBoxTeacher

    tmp = tmp_path_factory.mktemp("recipe")
    callers = []
    original = WhiteBoxTeacher.logits

    def counting_logits(self, x):
        import inspect

        callers.append([frame.function for frame in inspect.stack()])
        return original(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WhiteBoxTeacher, "logits", counting_logits)
        statuses = run(tiny_recipe(digits_teacher), tmp, tmp / "run")
    return tmp, tmp / "run", statuses, callers


@pytest.fixture
def copied_run(base_run, tmp_path):
    """A private copy of the base run directory, for tests that edit the recipe."""
    _, run_dir, _, _ = base_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_recipe_runs_end_to_end_and_reports(base_run):
    _, run_dir, statuses, _ = base_run
    assert set(statuses.values()) == {"done"}
    assert set(statuses) == {
        "soft_labels/sd", "soft_labels/bd", "soft_labels/mbd",
        "students/sd-lenet5-fifth-seed0", "students/bd-lenet5-fifth-seed0", "students/mbd-lenet5-fifth-seed0",
        "students/mbd-q20-lenet5-fifth-seed0",  # the checkpoint below the budget; q40 is mbd itself
        "students/ce-lenet5-fifth-seed0", "students/standard-kd-lenet5-fifth-seed0",
        "students/teacher", "students/student-alone-lenet5-fifth-seed0"}
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["students"]["loss"]["temperature"] == 20.0 and resolved["run_dir"] == str(run_dir)
    ce = json.loads((run_dir / "students/ce-lenet5-fifth-seed0/stage.json").read_text())
    assert ce["teacher_queries"]["transfer"] == 120 and ce["teacher_queries"]["eval"] == 359

    text = write_report(run_dir)
    assert text == (run_dir / "report.md").read_text()
    assert (run_dir / "accuracy_vs_queries.png").stat().st_size > 0
    rows = [line for line in text.splitlines() if line.startswith("| ") and "lenet5-fifth" in line]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [
        "student-alone", "ce", "sd", "bd", "mbd", "mbd @20", f"standard-kd — {WHITE_BOX_NOTE}"]
    alone = json.loads((run_dir / "students/student-alone-lenet5-fifth-seed0/metrics.json").read_text())
    assert alone["teacher_queries"]["total"] == 0 and alone["transfer_set"] == "train split (true labels)"
    teacher = json.loads((run_dir / "students/teacher/metrics.json").read_text())
    assert 0.5 < teacher["test_accuracy"] <= 1 and teacher["teacher_queries"]["evaluation"] == 359
    assert next(line for line in text.splitlines() if line.startswith("| teacher | teacher |"))
    ce_row = rows[1].split(" | ")
    assert ce_row[2] == "train split, 120 images" and ce_row[6] == "120"
    assert ce_row[7] == "1.0"  # one label query per transfer sample
    assert "Missing" not in text


def test_only_standard_kd_reads_teacher_logits(base_run):
    *_, callers = base_run
    assert callers, "the standard-kd baseline never read the teacher's logits"
    assert all("_standard_kd_stage" in stack for stack in callers)


def test_one_student_shows_one_cost_in_the_cli_the_recipe_and_the_report(base_run, tmp_path):
    """The teacher queries behind a student are computed once (TransferCost.total): `db3kd distill` on a
    recipe's soft labels, the recipe's own student and the report's row agree."""
    from db3kd.cli import main
    from db3kd.report import collect, summarise

    _, run_dir, _, _ = base_run
    assert main(["distill", "--transfer", str(run_dir / "soft_labels/bd"), "--student", "lenet5-fifth", "--dataset",
                 "digits", "--epochs", "1", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli/metrics.json").read_text())["teacher_queries"]
    recipe = json.loads((run_dir / "students/bd-lenet5-fifth-seed0/metrics.json").read_text())["teacher_queries"]
    manifest = json.loads((run_dir / "soft_labels/bd/manifest.json").read_text())
    rows = summarise(collect(run_dir, plan_stages(load_recipe(run_dir / "recipe.resolved.yaml", check_files=False)))[0])
    row = next(r for r in rows if r["label"] == "bd")
    assert cli == recipe and cli["total"] == row["queries"] == manifest["total_queries"]
    assert cli["labels"] == 120 and cli["soft_labels"] == manifest["estimator_queries"] and cli["evaluation"] == 359


def test_rerun_skips_every_stage(tmp_path, copied_run):
    before = stage_mtimes(copied_run)
    statuses = run(tiny_recipe_from(copied_run), tmp_path, copied_run)
    assert set(statuses.values()) == {"skipped"}
    assert stage_mtimes(copied_run) == before


def tiny_recipe_from(run_dir: Path) -> dict:
    """The recipe a run directory was made with (resolved), as raw YAML data to edit."""
    raw = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    raw.pop("run_dir")
    return copy.deepcopy(raw)


def test_editing_epochs_retrains_students_only(tmp_path, copied_run):
    raw = tiny_recipe_from(copied_run)
    raw["students"]["train"]["epochs"] = 2
    statuses = run(raw, tmp_path, copied_run)
    students = {n for n in statuses if n.startswith("students/") and n != "students/teacher"}
    assert {name for name, s in statuses.items() if s == "done"} == students  # the teacher's row trains nothing
    assert all(statuses[f"soft_labels/{m}"] == "skipped" for m in ("sd", "bd", "mbd"))
    metrics = json.loads((copied_run / "students/bd-lenet5-fifth-seed0/metrics.json").read_text())
    assert metrics["epochs"] == 2


def test_editing_soft_label_params_recomputes_that_stage_and_its_students(tmp_path, copied_run):
    raw = tiny_recipe_from(copied_run)
    raw["soft_labels"]["bd"]["params"]["queries_per_pair"] = 10
    statuses = run(raw, tmp_path, copied_run)
    assert {name for name, s in statuses.items() if s == "done"} == {
        "soft_labels/bd", "students/bd-lenet5-fifth-seed0"}
    manifest = json.loads((copied_run / "soft_labels/bd/manifest.json").read_text())
    assert manifest["params"] == {"queries_per_pair": 10}


def test_report_lists_missing_stages(tmp_path, copied_run):
    shutil.rmtree(copied_run / "students/sd-lenet5-fifth-seed0")
    state = json.loads((copied_run / "soft_labels/mbd/stage.json").read_text())
    (copied_run / "soft_labels/mbd/stage.json").write_text(json.dumps({**state, "status": "running"}))
    text = write_report(copied_run)
    assert "`students/sd-lenet5-fifth-seed0`: not run" in text
    assert "`soft_labels/mbd`: unfinished (running)" in text
    assert "| bd | lenet5-fifth | train split, 120 images |" in text


def test_cli_run_and_report(digits_teacher, tmp_path, capsys):
    from db3kd.cli import main

    raw = tiny_recipe(digits_teacher)
    raw["soft_labels"] = {"sd": {"method": "sd"}}
    raw["baselines"] = []
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "[1/2] soft_labels/sd: done" in capsys.readouterr().out
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "[2/2] students/sd-lenet5-fifth-seed0: skipped" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "| sd | lenet5-fifth | train split, 120 images | 1 |" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def _edit(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    ("students.trian", {}, r"^students\.trian: unknown key; expected one of arch, seeds, train, loss$"),
    ("colour", "red", r"^colour: unknown key; expected one of name, dataset, teacher, students"),
    ("soft_labels.bd.param", {}, r"^soft_labels\.bd\.param: unknown key; expected one of method, params"),
    ("students.train.epochs", -1, r"^students\.train\.epochs: must be a positive integer, got -1$"),
    ("students.train.epochs", "ten", r"^students\.train\.epochs: expected int, got 'ten'$"),
    ("students.train.lr", True, r"^students\.train\.lr: expected a number, got True$"),
    ("students.arch", ["lenet6"], r"^students\.arch: expected models from .*lenet5-half.*, got 'lenet6'$"),
    ("students.arch", "lenet5", r"^students\.arch: expected a list, got 'lenet5'$"),
    ("dataset.name", "imagenet", r"^dataset\.name: expected one of mnist, .*digits or the path of your images \(relative to the recipe file\), got 'imagenet': not found$"),
    ("soft_labels.bd.method", "xd", r"^soft_labels\.bd\.method: unknown robustness estimator 'xd'; expected one of 'sd', 'bd', 'mbd'$"),
    ("soft_labels.bd.params", {"budget": 5}, r"^soft_labels\.bd\.params: unknown parameter\(s\) 'budget'"),
    ("soft_labels.bd.checkpoint_students", True, r"^soft_labels\.bd\.checkpoint_students: expected false unless"),
    ("soft_labels.Bad-Name", {"method": "sd"}, r"^soft_labels\.Bad-Name: expected a stage name"),
    ("soft_labels.mbd.subset", 500, r"^soft_labels\.mbd\.subset: expected at most transfer\.subset = 120, got 500$"),
    ("transfer.split", "val", r"^transfer\.split: expected 'train' or 'test', got 'val'$"),
    ("transfer.mixtures", {"count": 0}, r"^transfer\.mixtures\.count: must be a positive integer, got 0$"),
    ("baselines", ["ce", "kd"], r"^baselines: expected names from teacher, student-alone, ce, standard-kd, got 'kd'$"),
    ("teacher", "http://localhost:1", r"^baselines: expected no standard-kd with a teacher behind a URL"),
    ("students.train.batch_size", 0, r"^students\.train\.batch_size: must be a positive integer, got 0$"),
    ("students.train.profile", "fast", r"^students\.train\.profile: must be 'auto' or 'paper', got 'fast'$"),
    ("soft_labels.bd.hard_labels_for_rest", True, r"^soft_labels\.bd\.hard_labels_for_rest: expected false unless subset"),
    ("students.loss", {"reduction": "mean"}, r"^students\.loss\.reduction: must be 'sum' or 'batchmean', got 'mean'$"),
    ("executor", "ray", r"^executor: expected a mapping of ExecutorConfig settings, got .ray.$"),
    ("executor", {"kind": "dask"}, r"^executor\.kind: expected one of local, ray, got 'dask'$"),
    ("executor", {"kind": "ray", "worker": 2},
     r"^executor\.worker: unknown key; expected one of kind, address, workers, max_retries$"),
    ("executor", {"kind": "ray", "workers": 0}, r"^executor\.workers: expected a positive integer or null, got 0$"),
    ("executor", {"kind": "ray", "workers": "all"}, r"^executor\.workers: expected int, got 'all'$"),
    ("executor", {"kind": "ray", "max_retries": -1}, r"^executor\.max_retries: expected an integer >= 0, got -1$"),
    ("executor", {"kind": "ray", "address": 6379}, r"^executor\.address: expected str, got 6379$"),
    ("executor", {"workers": 2}, r"^executor\.workers: expected null unless kind is ray, got 2$"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else None)
def test_bad_recipes_are_refused_precisely(digits_teacher, path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(_edit(tiny_recipe(digits_teacher), path, value))


def test_missing_fields_and_files_are_refused(digits_teacher, tmp_path):
    raw = tiny_recipe(digits_teacher)
    del raw["teacher"]
    with pytest.raises(ConfigError, match=r"^teacher: missing; Recipe needs teacher$"):
        parse_recipe(raw)
    with pytest.raises(ConfigError, match=r"teacher: file not found: .*nowhere\.onnx \(relative paths are relative"):
        load_recipe(write_recipe(tmp_path / "r.yaml", {**tiny_recipe(digits_teacher), "teacher": "nowhere.onnx"}))
    with pytest.raises(ConfigError, match=r"recipe file not found: .*absent\.yaml"):
        load_recipe(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_transfer_subset_larger_than_split_is_refused(digits_teacher, tmp_path):
    raw = _edit(tiny_recipe(digits_teacher), "transfer.subset", 10_000)
    with pytest.raises(ConfigError, match=r"^transfer\.subset: expected at most 1438 .*, got 10000$"):
        run(raw, tmp_path, tmp_path / "run")


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(RECIPES / name, check_files=False)  # the teachers may not be made yet
    stages = plan_stages(recipe)
    assert any(s.kind == "standard-kd" for s in stages)
    assert Path(recipe.teacher).is_absolute()


def test_soft_labels_on_a_subset_and_the_teachers_hard_labels_for_the_rest(digits_teacher, tmp_path):
    raw = tiny_recipe(digits_teacher)
    raw.update(transfer={"split": "train", "subset": None}, baselines=[],
               soft_labels={"bd": {"method": "bd", "params": {"queries_per_pair": 6}, "subset": 100,
                                   "hard_labels_for_rest": True}})
    run(raw, tmp_path, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "soft_labels" / "bd" / "manifest.json").read_text())
    student = json.loads((tmp_path / "run" / "students" / "bd-lenet5-fifth-seed0" / "metrics.json").read_text())
    assert manifest["num_samples"] == 100 and manifest["reference_label_queries"] == 1438
    # every training image of the split; the rest's labels were paid for by the reference labelling
    assert student["train_samples"] == 1438 and student["hard_labelled_samples"] == 1338
    assert student["teacher_queries"]["total"] == manifest["total_queries"]
    assert "train split, 1,438 images (100 with soft labels)" in write_report(tmp_path / "run")
    with pytest.raises(ConfigError, match="hard_labels_for_rest: expected false with zero-shot transfer"):
        parse_recipe({**raw, "transfer": {"synthesize": {"per_class": 20}}})


# --- the executor: where shards run, never part of a stage's hash --------------------------------------------


def test_executor_is_parsed_with_defaults_and_kept_out_of_stage_hashes(digits_teacher):
    from db3kd.executors import ExecutorConfig

    local = parse_recipe(tiny_recipe(digits_teacher))
    assert local.executor == ExecutorConfig("local", None, None, 3)
    ray = parse_recipe({**tiny_recipe(digits_teacher), "executor": {"kind": "ray", "address": "auto", "workers": 2}})
    assert ray.executor == ExecutorConfig("ray", "auto", 2, 3)
    assert [(s.name, s.hash) for s in plan_stages(ray, "t")] == [(s.name, s.hash) for s in plan_stages(local, "t")]


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError


def test_switching_executor_recomputes_nothing_and_needs_no_ray(tmp_path, copied_run, no_ray):
    before = stage_mtimes(copied_run)
    raw = {**tiny_recipe_from(copied_run), "executor": {"kind": "ray", "workers": 2}}
    statuses = run(raw, tmp_path, copied_run)
    assert set(statuses.values()) == {"skipped"} and stage_mtimes(copied_run) == before
    assert yaml.safe_load((copied_run / "recipe.resolved.yaml").read_text())["executor"] == {
        "kind": "ray", "address": None, "workers": 2, "max_retries": 3}
    assert json.loads((copied_run / "run.json").read_text())["executor"]["kind"] == "ray"

    # A soft-label stage with work to do: the missing Ray is found before any stage starts.
    raw["soft_labels"]["bd"]["params"]["queries_per_pair"] = 10
    with pytest.raises(ConfigError, match=r"needs Ray.*pip install 'db3kd\[ray\]'"):
        run(raw, tmp_path, copied_run)
    assert stage_mtimes(copied_run) == before


def test_cli_executor_options_override_the_recipes(tmp_path, copied_run, no_ray, capsys):
    from db3kd.cli import main

    raw = {**tiny_recipe_from(copied_run), "executor": {"kind": "ray", "address": "auto", "workers": 2}}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    args = ["run", str(recipe), "--out", str(copied_run), "--quiet"]
    assert main([*args, "--executor", "ray", "--workers", "0"]) == 2
    assert "--workers: expected a positive integer or null, got 0" in capsys.readouterr().err
    assert main([*args, "--executor", "local", "--max-retries", "1"]) == 2
    assert "--max-retries applies to --executor ray only" in capsys.readouterr().err

    # --executor local drops the recipe's Ray settings: an edited stage is recomputed here, without Ray.
    raw["soft_labels"]["sd"]["shard_size"] = 60
    write_recipe(recipe, raw)
    assert main([*args, "--executor", "local"]) == 0
    assert "soft_labels/sd: done" in capsys.readouterr().out
    manifest = json.loads((copied_run / "soft_labels/sd/manifest.json").read_text())
    assert manifest["executor"]["name"] == "local" and len(manifest["shard_queries"]) == 2
    assert json.loads((copied_run / "run.json").read_text())["executor"] == {
        "kind": "local", "address": None, "workers": None, "max_retries": 3}


def test_teacher_labelled_mixtures_of_real_images(digits_teacher, tmp_path):
    raw = tiny_recipe(digits_teacher)
    raw["transfer"]["mixtures"] = {"count": 200, "max_shift": 1}
    raw.update(soft_labels={"bd": {"method": "bd", "params": {"queries_per_pair": 4}}},
               baselines=["student-alone", "ce", "standard-kd"])
    statuses = run(raw, tmp_path, tmp_path / "run")
    assert statuses["mixtures"] == "done"
    mixed = json.loads((tmp_path / "run" / "mixtures" / "manifest.json").read_text())
    assert mixed["total_queries"] == mixed["count"] == 200

    def metrics(name):
        return json.loads((tmp_path / "run" / "students" / f"{name}-lenet5-fifth-seed0" / "metrics.json").read_text())

    bd, ce = metrics("bd"), metrics("ce")
    assert bd["mixture_samples"] == ce["mixture_samples"] == 200 and bd["train_samples"] == 120 + 200
    assert ce["teacher_queries"]["total"] == 120 + 200 and bd["teacher_queries"]["mixtures"] == 200
    assert metrics("student-alone")["mixture_samples"] == metrics("standard-kd")["mixture_samples"] == 0
    report = write_report(tmp_path / "run")
    assert "train split, 120 images + 200 mixtures" in report and "plus 200 teacher-labelled mixtures" in report


def test_students_steps_change_only_the_students_hashes(digits_teacher):
    raw = tiny_recipe(digits_teacher)
    before = {s.name: s for s in plan_stages(parse_recipe(raw))}
    assert all("steps" not in s.config["train"] for s in before.values() if "train" in s.config)
    after = {s.name: s for s in plan_stages(parse_recipe(_edit(raw, "students.train", {"steps": 300})))}
    changed = {name for name in before if before[name].hash != after[name].hash}
    assert changed and all(name.startswith("students/") for name in changed)
    assert all(after[name].config["train"]["steps"] == 300 for name in changed)
    with pytest.raises(ConfigError, match="give epochs or steps, not both"):
        parse_recipe(_edit(raw, "students.train", {"steps": 300, "epochs": 2}))


def test_a_soft_label_stage_is_hashed_on_its_estimator_with_every_default(digits_teacher):
    recipe = parse_recipe(tiny_recipe(digits_teacher))
    before = {s.name: s.hash for s in plan_stages(recipe)}
    recipe.soft_labels["bd"].estimator.max_directions += 1  # as a new default of the estimator would
    after = {s.name: s.hash for s in plan_stages(recipe)}
    changed = {name for name in before if before[name] != after[name]}
    assert "soft_labels/bd" in changed and "soft_labels/sd" not in changed
    assert changed == {"soft_labels/bd"} | {n for n in before if n.startswith("students/bd-")}
