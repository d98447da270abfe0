"""Zero-shot recipes (`transfer.synthesize`): a synthesize stage, soft labels and students on its pseudo samples,
no training image read, every teacher query of the path counted in the report and its plot. (The demo's
zero-shot row: tests/test_training.py.)"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from db3kd.errors import ConfigError
from db3kd.jobs.mixtures import MixtureConfig
from db3kd.pipeline import plan_stages, run_recipe
from db3kd.recipe import load_recipe, parse_recipe
from db3kd.report import write_report

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SYNTHESIS = {"per_class": 3, "queries_per_sample": 200, "rounds": 2, "shard_size": 10, "draw_batch": 200}
STAGES = {"synthesize", "soft_labels/bd", "soft_labels/mbd", "students/bd-lenet5-fifth-seed0",
          "students/mbd-lenet5-fifth-seed0", "students/mbd-q20-lenet5-fifth-seed0", "students/ce-lenet5-fifth-seed0",
          "students/standard-kd-lenet5-fifth-seed0"}


def zero_shot_recipe(teacher: Path) -> dict:
    """Seconds of work: 30 pseudo samples (3 shards), BD on all, MBD with a checkpoint on 20, both baselines."""
    return {
        "name": "tiny-zs",
        "dataset": {"name": "digits"},
        "teacher": str(teacher),
        "transfer": {"synthesize": dict(SYNTHESIS)},
        "soft_labels": {
            "bd": {"method": "bd", "params": {"queries_per_pair": 10}},
            "mbd": {"method": "mbd", "params": {"queries_per_pair": 40, "checkpoints": [20, 40], "probes": 8},
                    "subset": 20, "checkpoint_students": True},
        },
        "students": {"arch": ["lenet5-fifth"], "seeds": [0], "train": {"epochs": 1, "batch_size": 64, "lr": 0.003}},
        "baselines": ["ce", "standard-kd"],
    }


def run(raw: dict, tmp: Path, run_dir: Path) -> dict[str, str]:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {r.name: r.status for r in run_recipe(load_recipe(path), run_dir, progress=False)}


def load(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def test_split_only(monkeypatch):
    """The dataset readers refuse any split but 'test'; returns the splits asked for."""
    from db3kd.data import digits, mnist

    splits = []

    def guard(read_split, position: int):
        def load_split(*args, **kwargs):
            splits.append(args[position])
            if args[position] != "test":
                raise AssertionError(f"the zero-shot path read the {args[position]} split")
            return read_split(*args, **kwargs)
        return load_split

    monkeypatch.setattr(digits, "load_split", guard(digits.load_split, 0))  # load_split(split)
    monkeypatch.setattr(mnist, "load_split", guard(mnist.load_split, 1))  # load_split(name, split, root, ...)
    return splits


@pytest.fixture(scope="module")
def zs_run(digits_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zs-recipe")
    with pytest.MonkeyPatch.context() as mp:
        from db3kd.data import digits

        splits, read_split = [], digits.load_split
        mp.setattr(digits, "load_split", lambda split: splits.append(split) or read_split(split))
        statuses = run(zero_shot_recipe(digits_teacher), tmp, tmp / "run")
    return tmp / "run", statuses, splits


@pytest.fixture
def copied_zs_run(zs_run, tmp_path):
    shutil.copytree(zs_run[0], tmp_path / "run")
    return tmp_path / "run"


def resolved(run_dir: Path) -> dict:
    raw = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    raw.pop("run_dir")
    return copy.deepcopy(raw)


def test_zero_shot_recipe_reads_only_the_test_split(zs_run):
    run_dir, statuses, splits = zs_run
    assert statuses == dict.fromkeys(statuses, "done") and set(statuses) == STAGES
    assert list(statuses)[0] == "synthesize"  # before anything that reads the transfer set
    assert splits and set(splits) == {"test"}
    pseudo = load(run_dir / "synthesize/pseudo_samples.npz")
    assert pseudo["images"].shape == (30, 1, 8, 8)
    soft = load(run_dir / "soft_labels/bd/soft_labels.npz")
    np.testing.assert_array_equal(soft["images"], pseudo["images"])  # the students' images are the pseudo samples
    np.testing.assert_array_equal(soft["labels"], pseudo["labels"])
    np.testing.assert_array_equal(load(run_dir / "soft_labels/mbd/soft_labels.npz")["images"], pseudo["images"][:20])
    resolved_synthesis = resolved(run_dir)["transfer"]["synthesize"]
    assert resolved_synthesis["per_class"] == 3 and "step" in resolved_synthesis  # defaults filled in


def test_every_query_behind_a_student_is_counted(zs_run):
    run_dir, _, _ = zs_run
    synthesis = read(run_dir / "synthesize/manifest.json")["total_queries"]
    bd = read(run_dir / "soft_labels/bd/manifest.json")
    assert synthesis > 0 and bd["reference_label_queries"] == 0  # synthesis labelled the pseudo samples already
    assert read(run_dir / "synthesize/stage.json")["teacher_queries"]["transfer"] == synthesis
    student = read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")
    assert student["teacher_queries"]["total"] == synthesis + bd["total_queries"]
    assert student["transfer_set"] == "synthesized" and student["transfer_samples"] == 30
    mbd = load(run_dir / "soft_labels/mbd/soft_labels.npz")
    at_20 = read(run_dir / "students/mbd-q20-lenet5-fifth-seed0/metrics.json")
    assert at_20["teacher_queries"]["total"] == synthesis + np.minimum(mbd["queries"], 20).sum()
    ce = read(run_dir / "students/ce-lenet5-fifth-seed0/metrics.json")
    assert ce["teacher_queries"]["total"] == synthesis and ce["teacher_queries"]["labels"] == 0
    assert read(run_dir / "students/ce-lenet5-fifth-seed0/stage.json")["teacher_queries"]["transfer"] == 0


def test_report_marks_zero_shot_students_and_plots_total_queries(zs_run, monkeypatch):
    import matplotlib.axes

    run_dir, _, _ = zs_run
    plotted = {}
    original = matplotlib.axes.Axes.errorbar

    def recording_errorbar(self, x, y, *args, **kwargs):
        plotted[x] = y
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recording_errorbar)
    text = write_report(run_dir)
    synthesis = read(run_dir / "synthesize/manifest.json")["total_queries"]
    assert f"30 pseudo samples synthesized with {synthesis:,} teacher queries" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "lenet5-fifth" in line}
    assert list(rows)[:4] == ["ce", "bd", "mbd", "mbd @20"] and list(rows)[4].startswith("standard-kd") and len(rows) == 5
    assert {r[2] for r in rows.values()} == {"synthesized, 30 pseudo samples", "synthesized, 20 pseudo samples"}
    bd_total = synthesis + read(run_dir / "soft_labels/bd/manifest.json")["total_queries"]
    assert rows["bd"][6] == f"{bd_total:,}" and rows["ce"][6] == f"{synthesis:,}"
    accuracy = read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")["test_accuracy"]
    assert plotted[bd_total] == pytest.approx(accuracy)  # the plot's x: synthesis + soft-label queries
    assert plotted[synthesis] is not None and len(plotted) == 4  # ce, bd, mbd, mbd @20; standard-kd is a line


def test_rerun_skips_and_editing_synthesis_recomputes_everything_downstream(tmp_path, copied_zs_run):
    raw = resolved(copied_zs_run)
    assert set(run(raw, tmp_path, copied_zs_run).values()) == {"skipped"}
    raw["students"]["train"]["epochs"] = 2
    statuses = run(raw, tmp_path, copied_zs_run)
    assert {n for n, s in statuses.items() if s == "done"} == {n for n in STAGES if n.startswith("students/")}
    raw["transfer"]["synthesize"]["rounds"] = 1
    assert set(run(raw, tmp_path, copied_zs_run).values()) == {"done"}  # every stage reads the pseudo samples
    assert len(read(copied_zs_run / "synthesize/manifest.json")["mean_distance_per_round"]) == 1


def test_interrupted_synthesis_resumes_to_the_same_samples(digits_teacher, zs_run, tmp_path, monkeypatch):
    import db3kd.jobs.synthesis as synthesis

    raw = zero_shot_recipe(digits_teacher)
    raw["soft_labels"] = {"bd": raw["soft_labels"]["bd"]}
    raw["baselines"] = []
    original, shards = synthesis.SynthesisJob.__call__, []

    def dies_in_second_shard(self, oracle, shard):
        shards.append(shard)
        if len(shards) == 2:
            raise KeyboardInterrupt
        return original(self, oracle, shard)

    monkeypatch.setattr(synthesis.SynthesisJob, "__call__", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(raw, tmp_path, tmp_path / "run")
    assert read(tmp_path / "run/synthesize/stage.json")["status"] == "running"
    monkeypatch.setattr(synthesis.SynthesisJob, "__call__", original)
    statuses = run(raw, tmp_path, tmp_path / "run")
    assert statuses["synthesize"] == "done" and read(tmp_path / "run/synthesize/stage.json")["resumed"] is True
    first, again = load(zs_run[0] / "synthesize/pseudo_samples.npz"), load(tmp_path / "run/synthesize/pseudo_samples.npz")
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)


def _edit(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    ("transfer.synthesize.per_clas", 3, r"^transfer\.synthesize\.per_clas: unknown key; expected one of per_class, "),
    ("transfer.synthesize.per_class", KeyError, r"^transfer\.synthesize\.per_class: missing; SynthesisConfig needs per_class$"),
    ("transfer.synthesize.per_class", 0, r"^transfer\.synthesize\.per_class: must be a positive integer, got 0$"),
    ("transfer.synthesize.queries_per_sample", 20,
     r"^transfer\.synthesize\.queries_per_sample: must be at least \d+ for 2 rounds and 10 classes"),
    ("transfer.synthesize.shard_size", 4, r"^transfer\.synthesize\.shard_size: must be at least the number of classes"),
    ("transfer.synthesize", [1], r"^transfer\.synthesize: expected a mapping of SynthesisConfig settings, got \[1\]$"),
    ("transfer.split", "train", r"^transfer\.split: expected no split with synthesize \(zero-shot reads no real image\)"),
    ("transfer.subset", 100, r"^transfer\.subset: expected no subset with synthesize"),
    ("soft_labels.mbd.subset", 31,
     r"^soft_labels\.mbd\.subset: expected at most transfer\.synthesize\.per_class x 10 classes = 30, got 31$"),
    ("transfer.mixtures", {"count": 0}, r"^transfer\.mixtures\.count: must be a positive integer, got 0$"),
    ("transfer.mixtures", {"max_shift": 1}, r"^transfer\.mixtures\.count: missing; MixtureConfig needs count$"),
    ("transfer.mixtures", {"count": 5, "max_shfit": 1},
     r"^transfer\.mixtures\.max_shfit: unknown key; expected one of count, max_shift, min_brightness, mask, max_rotation, max_scale, rounds, pool, seed, shard_size$"),
    ("transfer.mixtures", {"count": 5, "min_brightness": 1.5},
     r"^transfer\.mixtures\.min_brightness: must be a number in \(0, 1\], got 1\.5$"),
    ("transfer.mixtures", {"count": 5, "max_shift": 1.5}, r"^transfer\.mixtures\.max_shift: expected int, got 1\.5$"),
    ("transfer.mixtures", 400, r"^transfer\.mixtures: expected a mapping of MixtureConfig settings, got 400$"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else None)
def test_bad_zero_shot_recipes_are_refused_precisely(digits_teacher, path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(_edit(zero_shot_recipe(digits_teacher), path, value))


def test_shipped_zero_shot_recipe_is_valid():
    recipe = load_recipe(RECIPES / "mnist-zsdb3kd.yaml", check_files=False)
    assert recipe.transfer.zero_shot and recipe.transfer.split is None
    assert recipe.transfer.synthesize.per_class == 500 and recipe.transfer.synthesize.rounds == 6
    assert recipe.transfer.mixtures == MixtureConfig(count=400_000, max_shift=3, min_brightness=0.3, seed=0,
                                                     shard_size=50_000)
    assert (recipe.students.train.epochs, recipe.students.train.batch_size) == (6, 128)
    assert recipe.teacher.endswith("shared/teachers/lenet5_mnist.onnx") and Path(recipe.teacher).is_absolute()
    stages = plan_stages(recipe)
    assert [s.kind for s in stages[:2]] == ["synthesize", "mixtures"] and recipe.students.arch == ["lenet5-half"]
    assert {s.name: s.inputs for s in stages if s.kind == "soft_labels"} == {"soft_labels/bd": ["synthesize"]}
    inputs = {s.kind: s.inputs for s in stages if s.name.startswith("students/")}
    assert inputs == {"distill": ["soft_labels/bd", "mixtures"], "ce": ["synthesize", "mixtures"],
                      "standard-kd": ["synthesize"]}


def test_mnist_zero_shot_recipe_runs_without_training_files(teacher_onnx, shared_dir, tmp_path, test_split_only):
    """The real case: a data directory holding MNIST's test files only, and the shared teacher."""
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_dir / "data" / "mnist" / name, data / name)
    raw = {"name": "mnist-zs", "dataset": {"name": "mnist", "data_dir": str(tmp_path / "data")},
           "teacher": str(teacher_onnx),
           "transfer": {"synthesize": {"per_class": 2, "queries_per_sample": 120, "rounds": 1, "shard_size": 20},
                        "mixtures": {"count": 100, "shard_size": 60}},
           "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": 10}}},
           "students": {"arch": ["lenet5-fifth"], "train": {"epochs": 1, "batch_size": 64}}}
    statuses = run(raw, tmp_path, tmp_path / "run")
    assert set(statuses.values()) == {"done"} and set(test_split_only) == {"test"}
    assert not list((tmp_path / "data" / "mnist").glob("train-*"))  # nothing was downloaded either
    metrics = read(tmp_path / "run/students/bd-lenet5-fifth-seed0/metrics.json")
    assert metrics["transfer_set"] == "synthesized" and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["train_samples"] == 20 + 100 and metrics["teacher_queries"]["mixtures"] == 100  # pseudo + mixtures


# --- teacher-labelled mixtures of the pseudo samples (transfer.mixtures) --------------------------------------

MIXTURES = {"count": 200, "max_shift": 1, "shard_size": 120}
MIX_STAGES = {"synthesize", "mixtures", "soft_labels/bd", "students/bd-lenet5-fifth-seed0",
              "students/ce-lenet5-fifth-seed0", "students/standard-kd-lenet5-fifth-seed0"}


def mixture_recipe(teacher: Path) -> dict:
    """Seconds of work: 30 pseudo samples, 200 mixtures of them (2 shards), BD on the samples, both baselines."""
    raw = zero_shot_recipe(teacher)
    raw["name"] = "tiny-zs-mix"
    raw["transfer"]["mixtures"] = dict(MIXTURES)
    raw["soft_labels"] = {"bd": raw["soft_labels"]["bd"]}
    return raw


@pytest.fixture(scope="module")
def mix_run(digits_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zs-mix-recipe")
    return tmp / "run", run(mixture_recipe(digits_teacher), tmp, tmp / "run")


def test_mixtures_are_parsed_with_their_defaults(digits_teacher, mix_run):
    recipe = parse_recipe(mixture_recipe(digits_teacher))
    assert recipe.transfer.mixtures == MixtureConfig(**MIXTURES)  # with its defaults
    assert resolved(mix_run[0])["transfer"]["mixtures"] == {**MIXTURES, "min_brightness": 0.3, "mask": 0.0,
                                                           "max_rotation": 0.0, "max_scale": 0.0, "rounds": 1,
                                                           "pool": 4, "seed": 0}
    assert parse_recipe(zero_shot_recipe(digits_teacher)).transfer.mixtures is None  # optional
    real = {**mixture_recipe(digits_teacher), "transfer": {"split": "train", "mixtures": {"count": 5}}}
    assert parse_recipe(real).transfer.mixtures.count == 5  # of real images too (tests/test_recipes.py runs one)


def test_zero_shot_students_train_on_the_mixtures_and_count_their_queries(mix_run):
    run_dir, statuses = mix_run
    assert statuses == dict.fromkeys(MIX_STAGES, "done") and list(statuses)[:2] == ["synthesize", "mixtures"]
    synthesis = read(run_dir / "synthesize/manifest.json")["total_queries"]
    mixed = read(run_dir / "mixtures/manifest.json")
    assert mixed["total_queries"] == mixed["count"] == 200 and sum(mixed["label_counts"]) == 200
    assert read(run_dir / "mixtures/stage.json")["teacher_queries"]["transfer"] == 200
    bd = read(run_dir / "soft_labels/bd/manifest.json")["total_queries"]
    student = read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")
    assert student["teacher_queries"]["total"] == synthesis + bd + 200 and student["teacher_queries"]["mixtures"] == 200
    assert student["train_samples"] == 30 + 200 and student["transfer_samples"] == 30
    ce = read(run_dir / "students/ce-lenet5-fifth-seed0/metrics.json")
    assert ce["teacher_queries"]["total"] == synthesis + 200 and ce["teacher_queries"]["mixtures"] == 200
    assert ce["train_samples"] == 230 and ce["teacher_queries"]["labels"] == 0
    assert read(run_dir / "students/ce-lenet5-fifth-seed0/stage.json")["teacher_queries"]["transfer"] == 0
    kd = read(run_dir / "students/standard-kd-lenet5-fifth-seed0/metrics.json")  # white-box: the pseudo samples only
    assert kd["train_samples"] == 30 and kd["teacher_queries"]["total"] == synthesis
    assert kd["teacher_queries"]["mixtures"] == 0


def test_mixtures_in_rounds_are_chosen_by_a_selector_student_and_counted_once(digits_teacher, tmp_path):
    raw = mixture_recipe(digits_teacher)
    raw["transfer"]["mixtures"] = {**MIXTURES, "rounds": 2, "pool": 3}
    run_dir = tmp_path / "run"
    assert run(raw, tmp_path, run_dir) == dict.fromkeys(MIX_STAGES, "done")
    mixed = read(run_dir / "mixtures/manifest.json")
    assert mixed["total_queries"] == mixed["count"] == 200 and [r["count"] for r in mixed["rounds"]] == [100, 100]
    assert read(run_dir / "mixtures/stage.json")["config"]["selector"]["arch"] == "lenet5-fifth"
    selector = read(run_dir / "mixtures/selector2/metrics.json")  # the pseudo samples and round 1's mixtures
    assert selector["method"] == "selector" and selector["train_samples"] == 30 + 100
    assert selector["mixture_samples"] == selector["teacher_queries"]["mixtures"] == 100
    student = read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")
    assert student["train_samples"] == 230 and student["teacher_queries"]["mixtures"] == 200
    assert set(run(raw, tmp_path, run_dir).values()) == {"skipped"}


def test_report_counts_the_mixtures_in_the_total_queries(mix_run, monkeypatch):
    import matplotlib.axes

    run_dir, _ = mix_run
    plotted = {}
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, *a, **k: plotted.__setitem__(x, y) or original(self, x, y, *a, **k))
    text = write_report(run_dir)
    assert "plus 200 teacher-labelled mixtures of them" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "lenet5-fifth" in line}
    synthesis = read(run_dir / "synthesize/manifest.json")["total_queries"]
    bd_total = synthesis + read(run_dir / "soft_labels/bd/manifest.json")["total_queries"] + 200
    assert rows["bd"][2] == rows["ce"][2] == "synthesized, 30 pseudo samples + 200 mixtures"
    assert rows["bd"][6] == f"{bd_total:,}" and rows["ce"][6] == f"{synthesis + 200:,}"
    assert rows["bd"][7] == f"{bd_total / 230:,.1f}"  # per sample trained on, mixtures included
    assert set(plotted) == {bd_total, synthesis + 200}


def test_editing_mixtures_keeps_the_pseudo_samples_and_editing_synthesis_redoes_the_mixtures(tmp_path, mix_run):
    shutil.copytree(mix_run[0], tmp_path / "run")
    run_dir, raw = tmp_path / "run", resolved(mix_run[0])
    assert set(run(raw, tmp_path, run_dir).values()) == {"skipped"}
    raw["transfer"]["mixtures"]["count"] = 150
    statuses = run(raw, tmp_path, run_dir)
    assert {n for n, s in statuses.items() if s == "done"} == {
        "mixtures", "students/bd-lenet5-fifth-seed0", "students/ce-lenet5-fifth-seed0"}  # not the samples, nor KD
    assert read(run_dir / "mixtures/manifest.json")["count"] == 150
    assert read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")["train_samples"] == 30 + 150
    raw["transfer"]["synthesize"]["rounds"] = 1
    assert set(run(raw, tmp_path, run_dir).values()) == {"done"}  # new pseudo samples: new mixtures of them
    assert read(run_dir / "mixtures/stage.json")["inputs"] == {"synthesize": read(run_dir / "synthesize/stage.json")["hash"]}
    del raw["transfer"]["mixtures"]
    statuses = run(raw, tmp_path, run_dir)
    assert "mixtures" not in statuses and statuses["students/standard-kd-lenet5-fifth-seed0"] == "skipped"
    assert read(run_dir / "students/bd-lenet5-fifth-seed0/metrics.json")["train_samples"] == 30


def test_a_combined_report_has_a_column_per_dataset_and_the_papers_figures(zs_run, mix_run, tmp_path, monkeypatch,
                                                                            capsys):
    import db3kd.report as report
    from db3kd.cli import main

    monkeypatch.setitem(report.AS_REPORTED, ("digits", "zero-shot"), 90.0)
    assert main(["report", str(zs_run[0]), str(mix_run[0]), "--out", str(tmp_path / "all.md")]) == 0
    text = (tmp_path / "all.md").read_text()
    assert text.strip() in capsys.readouterr().out
    assert "| method | student | digits |" in text
    row = next(line for line in text.splitlines() if line.startswith("| zero-shot bd | lenet5-fifth |"))
    assert "queries" in row and "90.00% as reported" in row
    assert next(line for line in text.splitlines() if line.startswith("| zero-shot ce |"))
