"""The report of a `db3kd run` directory: a Markdown table (report.md) and accuracy_vs_queries.png.

One row per (method, student architecture), mean ± std over the seeds that finished: the transfer set
(a split's images, or "synthesized, N pseudo samples" for zero-shot students), test accuracy, fidelity to
the teacher, the teacher queries behind the student's training data (synthesis + mixtures + labels + soft
labels), per transfer sample and per (sample, class) pair, soft-label and training seconds. The plot shows accuracy
against those total queries. Stages the recipe declares but the run has not finished are listed, not guessed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .budget import BudgetPlan
from .errors import DataError
from .io import write_text
from .pipeline import MIXTURES, RESOLVED_RECIPE, SYNTHESIZE, Stage, plan_stages, read_stage, superseded
from .transfer import TransferCost

WHITE_BOX_NOTE = "white-box (reads logits; upper reference)"
# The DB3KD paper's figures (Wang 2021, tables 1-3), test accuracy in %, "as reported": their teachers, full
# training sets and query budgets differ from ours (see README, "The paper's benchmarks").
AS_REPORTED = {("mnist", "mbd"): 99.52, ("mnist", "standard-kd"): 99.33, ("mnist", "zero-shot"): 96.54,
               ("cifar10", "mbd"): 78.30, ("cifar10", "standard-kd"): 77.81}


def write_report(run_dir: str | Path) -> str:
    """Write run_dir/report.md and run_dir/accuracy_vs_queries.png; return the Markdown."""
    from .recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / RESOLVED_RECIPE).is_file():
        raise DataError(f"{run_dir} is not a run directory: no {RESOLVED_RECIPE} (made by `db3kd run`)")
    recipe = load_recipe(run_dir / RESOLVED_RECIPE, check_files=False)  # the teacher need not be here any more
    stages = plan_stages(recipe)
    results, missing = collect(run_dir, stages)
    rows = summarise(results)
    lines = [f"# {recipe.name}", "",
             f"Teacher `{recipe.teacher}`, dataset {recipe.dataset.name} ({_transfer_sentence(recipe, run_dir)}), "
             f"students {', '.join(recipe.students.arch)}, seeds {recipe.students.seeds}.", "",
             _table(rows), "",
             "Mean ± std over seeds. Teacher queries: every query behind the student's training data, i.e. the "
             "synthesis of the pseudo samples (zero-shot), the labels of their mixtures (if any; one query each), "
             "the transfer images' labels and the soft labels (reference labels included); per transfer sample: "
             "the same over the samples it trained on (mixtures included); "
             "evaluation queries (fidelity) are not counted. `@Q`: a student trained on MBD's distances after Q "
             "queries per pair.", ""]
    if recipe.budget is not None:
        lines += _budget_lines(run_dir)
    if any(r.get("test_labelled") is False for r in results):
        lines += [f"The test images ({recipe.dataset.test}) have no labels: no test accuracy can be given (—), only "
                  "fidelity, the students' agreement with the teacher's labels of them.", ""]
    if missing:
        lines += ["## Missing", "", *[f"- `{name}`: {why}" for name, why in missing], ""]
    aside = superseded(run_dir)
    if aside:
        lines += ["## Superseded", "", "Results of configurations the recipe no longer asks for, kept because their "
                  "queries were paid for (a rerun of that configuration reuses them; delete them to free the space):",
                  "", *[f"- `{s['path']}`: {s.get('status', '?')}, teacher queries {s.get('teacher_queries', {})}"
                        for s in aside], ""]
    plot = plot_accuracy_vs_queries(rows, run_dir / "accuracy_vs_queries.png")
    if plot is not None:
        lines += [f"![accuracy against teacher queries]({plot.name})", ""]
    text = "\n".join(lines)
    write_text(run_dir / "report.md", text)
    return text


def write_combined_report(run_dirs: list[str | Path], out: str | Path | None = None) -> str:
    """One table over several run directories, a column per dataset: each (method, student) row gives mean test
    accuracy ± std and the teacher queries behind it, with the paper's figure beside ours where it has one
    (marked "as reported"). Written to `out` if given; returned as Markdown."""
    from .recipe import load_recipe

    cells: dict[tuple[str, str], dict[str, str]] = {}
    datasets: list[str] = []
    for run_dir in map(Path, run_dirs):
        if not (run_dir / RESOLVED_RECIPE).is_file():
            raise DataError(f"{run_dir} is not a run directory: no {RESOLVED_RECIPE} (made by `db3kd run`)")
        recipe = load_recipe(run_dir / RESOLVED_RECIPE, check_files=False)
        dataset = Path(recipe.dataset.name).name
        datasets += [] if dataset in datasets else [dataset]
        for row in summarise(collect(run_dir, plan_stages(recipe))[0]):
            method = ("zero-shot " if row["zero_shot"] else "") + row["label"]
            paper = AS_REPORTED.get((dataset, "zero-shot" if row["zero_shot"] else row["label"].split(" @")[0]))
            ours = f"{_pm(row['accuracy'], 4)} ({_num(row['queries'], 0)} queries)" if row["accuracy"] else "—"
            cells.setdefault((method, row["arch"]), {})[dataset] = ours + (f"; {paper:.2f}% as reported" if paper else "")
    header = ["method", "student", *datasets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([method, arch, *(row.get(d, "—") for d in datasets)]) + " |"
              for (method, arch), row in cells.items()]
    text = "\n".join(["# DB3KD across datasets", "", *lines, "",
                      "Test accuracy, mean ± std over seeds, and the teacher queries behind each student's training data. "
                      "\"As reported\": the DB3KD paper's figure for that setting (its teachers, transfer sets and "
                      "budgets differ from ours).", ""])
    if out is not None:
        write_text(out, text)
    return text


def _budget_lines(run_dir: Path) -> list[str]:
    """The budget's plan and what its stages spent (run.json), as a report section."""
    try:
        budget = json.loads((run_dir / "run.json").read_text())["budget"]
    except (OSError, ValueError, KeyError):
        return ["## Budget", "", "_Not run yet: no run.json with the budget's spending._", ""]
    spent = ", ".join(f"`{name}` {queries:,}" for name, queries in budget["spent"].items()) or "nothing yet"
    return ["## Budget", "",
            f"{BudgetPlan.from_dict(budget).describe()}. Spent: {spent}; "
            f"{budget['spent_total']:,} in all, {'within' if budget['within_budget'] else 'OVER'} the budget.", ""]


def _transfer_sentence(recipe, run_dir: Path) -> str:
    """The report's words for the transfer set, e.g. 'train split, first 500 as transfer set'."""
    if not recipe.transfer.zero_shot:
        subset = "" if recipe.transfer.subset is None else f", first {recipe.transfer.subset}"
        mixed = "" if recipe.transfer.mixtures is None else \
            f", plus {recipe.transfer.mixtures.count:,} teacher-labelled mixtures of them (one query each; not for standard-kd)"
        return f"{recipe.transfer.split} split{subset} as transfer set{mixed}"
    try:
        manifest = json.loads((run_dir / SYNTHESIZE / "manifest.json").read_text())
        made = (f"{manifest['num_samples']:,} pseudo samples synthesized with {manifest['total_queries']:,} "
                "teacher queries")
    except (OSError, ValueError, KeyError):
        made = f"{recipe.transfer.synthesize.per_class} pseudo samples per class to synthesize"
    if recipe.transfer.mixtures is not None:
        try:
            mixed = json.loads((run_dir / MIXTURES / "manifest.json").read_text())["total_queries"]
        except (OSError, ValueError, KeyError):
            mixed = recipe.transfer.mixtures.count
        made += f", plus {mixed:,} teacher-labelled mixtures of them (one query each; not for standard-kd)"
    return f"zero-shot: no real training image; {made} as transfer set; the test split for evaluation only"


def collect(run_dir: Path, stages: list[Stage]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Finished students' metrics (with their stage) and the stages not finished, with the reason."""
    results, missing = [], []
    for stage in stages:
        state = read_stage(run_dir / stage.name)
        if state is None:
            missing.append((stage.name, "not run"))
        elif state.get("status") != "done":
            missing.append((stage.name, f"unfinished ({state.get('status')})"))
        elif stage.kind == "soft_labels" and (run_dir / stage.name / "selector" / "metrics.json").is_file():
            # The student that chose the pairs: CE on the teacher's labels the stage bought, a point of the frontier.
            metrics = json.loads((run_dir / stage.name / "selector" / "metrics.json").read_text())
            results.append({"label": f"ce (selector of {stage.name.split('/', 1)[1]})", "kind": "ce",
                            "arch": metrics["arch"], **metrics})
        elif stage.kind not in ("soft_labels", "synthesize", "mixtures"):
            try:
                metrics = json.loads((run_dir / stage.name / "metrics.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                missing.append((stage.name, f"metrics.json unreadable ({e})"))
                continue
            results.append({"label": stage.label, "kind": stage.kind, "arch": stage.config.get("arch", "teacher"),
                            **metrics})
    return results, missing


def summarise(results: list[dict]) -> list[dict]:
    """One row per (label, arch), in first-seen order, with mean and std over seeds (and `per_seed`: each
    seed's test accuracy, fidelity and training seconds, in stage order)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[r["label"], r["arch"]].append(r)
    order = {"teacher": 0, "student-alone": 1, "ce": 2, "distill": 3, "standard-kd": 4}  # white-box last
    rows = []
    for (label, arch), runs in sorted(groups.items(), key=lambda g: order[g[1][0]["kind"]]):
        first = runs[0]
        samples, mixtures, hard = first["transfer_samples"], first["mixture_samples"], first.get("hard_labelled_samples", 0)
        queries = None if first["kind"] == "teacher" else TransferCost.from_dict(first["teacher_queries"]).total
        rows.append({
            "label": label, "kind": first["kind"], "arch": arch, "seeds": len(runs),
            "transfer": _transfer_cell(first["transfer_set"], samples, mixtures, hard),
            "zero_shot": first["transfer_set"] == "synthesized",
            "queries": queries,
            "accuracy": _stats([r["test_accuracy"] for r in runs]),
            "fidelity": _stats([r.get("fidelity") for r in runs]),
            "queries_per_sample": None if first["white_box"] or not samples else queries / (samples + mixtures),
            "queries_per_pair": first["queries_per_pair"],
            "soft_label_seconds": first.get("soft_label_seconds"),
            "train_seconds": _stats([r.get("seconds") for r in runs]),
            "per_seed": {key: [r.get(key) for r in runs] for key in ("test_accuracy", "fidelity", "seconds")},
        })
    return rows


def _transfer_cell(kind: str, samples: int, mixtures: int = 0, hard_labelled: int = 0) -> str:
    if not samples:
        return kind
    mixed = f" + {mixtures:,} mixtures" if mixtures else ""
    if kind != "synthesized":
        soft = f" ({samples - hard_labelled:,} with soft labels)" if hard_labelled else ""
        return f"{kind}, {samples:,} images{soft}{mixed}"
    return f"synthesized, {samples:,} pseudo samples{mixed}"


def _stats(values: list) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_No student has finished yet._"
    header = ["method", "student", "transfer set", "seeds", "test accuracy", "fidelity", "teacher queries",
              "queries / transfer sample", "queries / pair", "soft-label time (s)", "training time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = f"{row['label']} — {WHITE_BOX_NOTE}" if row["kind"] == "standard-kd" else row["label"]
        cells = [label, row["arch"], row["transfer"], str(row["seeds"]), _pm(row["accuracy"], 4),
                 _pm(row["fidelity"], 4), _num(row["queries"], 0), _num(row["queries_per_sample"], 1),
                 _num(row["queries_per_pair"], 1), _num(row["soft_label_seconds"], 1), _pm(row["train_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(stats, digits: int) -> str:
    return "—" if stats is None else f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def plot_accuracy_vs_queries(rows: list[dict], path: Path) -> Path | None:
    """Student accuracy against the teacher queries behind its training data, one colour per architecture.

    Those queries are the synthesis's and the mixtures' (zero-shot), the labels' and the soft labels'
    (`TransferCost.total`), so zero-shot and data-based students sit on one axis. The white-box standard-KD reference, which sends
    no label query for its labels, is a horizontal line.
    """
    if not rows:
        return None
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    metric = "accuracy" if any(r["accuracy"] for r in rows if r["kind"] != "teacher") else "fidelity"  # unlabelled tests
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    plotted = []
    for colour, arch in zip(rcParams["axes.prop_cycle"].by_key()["color"], dict.fromkeys(r["arch"] for r in rows)):
        points = sorted((r for r in rows if r["arch"] == arch and r["kind"] in ("distill", "ce") and r["queries"]
                         and r[metric]),
                        key=lambda r: r["queries"])
        for r in points:
            ax.errorbar(r["queries"], r[metric][0], yerr=r[metric][1], fmt="s" if r["kind"] == "ce" else "o",
                        color=colour, capsize=3, mfc="none" if r["zero_shot"] else colour)
            name = "CE on top-1 labels" if r["kind"] == "ce" else r["label"]
            ax.annotate(name + (" (zero-shot)" if r["zero_shot"] else ""), (r["queries"], r[metric][0]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        plotted += points
        if points:
            ax.plot([], [], "o", color=colour, label=arch)
        distilled = [r for r in points if r["kind"] == "distill"]
        for stage in dict.fromkeys(r["label"].split(" @")[0] for r in distilled):  # mbd and its checkpoints: a curve
            curve = [r for r in distilled if r["label"].split(" @")[0] == stage]
            if len(curve) > 1:
                ax.plot([r["queries"] for r in curve], [r[metric][0] for r in curve], "-", color=colour, alpha=0.5)
        for r in rows:
            if r["arch"] == arch and r["kind"] == "standard-kd" and r[metric]:
                ax.axhline(r[metric][0], linestyle=":", color=colour, linewidth=1,
                           label=f"{arch}: standard KD (white-box)")
    if plotted:
        ax.set_xscale("log")
    if any(r["zero_shot"] for r in plotted):
        ax.plot([], [], "o", color="gray", mfc="none", label="hollow: zero-shot (pseudo samples)")
    ax.set(xlabel="teacher queries behind the training data (synthesis + mixtures + labels + soft labels)",
           ylabel=f"student {'test accuracy' if metric == 'accuracy' else 'fidelity (unlabelled test images)'}",
           title=f"Student {metric} against teacher queries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
