"""Benchmark: student accuracy against total teacher queries, per way of spending them.

For each dataset (MNIST, Fashion-MNIST: the shared LeNet-5 teachers, `lenet5-half` students), each number of
real images available (all of the training split, or its first 2,000) and each budget Q, these strategies,
each a `db3kd run` recipe of its own under --run-dir (cached: a rerun adds only what is missing):

- budget: the recipe's `budget: Q` with its defaults (db3kd.budget.plan_budget: labels, student-guided BD soft
  labels on the images a selector student is least sure of, hard labels for the rest, mixtures of the images
  with what the soft labels cannot use);
- budget-plain: the same plan with BD soft labels on the first images it can pay for, unguided (the plan
  before selection and guides), to show what they buy;
- budget-half-mixtures, budget-cap20: the plan with half of the queries after the labels in mixtures before any
  soft label, and with at most 20 mixtures per image (with few images most of the budget is left unspent);
  the defaults before they were measured;
- budget-rotations: the plan with its mixtures also rotated by up to 15 degrees and zoomed by up to 10%;
- budget-rounds: the plan with its mixtures bought in 2 rounds, the second's chosen by a selector student
  trained on the first's (the candidates it is least sure of, of 4 per mixture);
- ce-only: the teacher's top-1 labels of the first min(Q, N) images;
- paper: the paper's recipe bought with Q: BD at 40 queries per pair on every pair of the first
  Q / (1 + 9 x 40) images (their labels included), nothing else.

Writes benchmarks/results/budget_frontier.json (per run: accuracy per seed at the epoch the held-out tenth chose
and at the last, mean fidelity, the queries the
student's training data cost, the wall time of the invocation that wrote it, which stages and seeds cached by an
earlier one do not count in) and budget_frontier_<dataset>.png (accuracy against queries).

    python benchmarks/budget_frontier.py [--datasets mnist fashion-mnist] [--images all 2000]
        [--budgets 60000 200000 600000 2000000 6000000 20000000] [--strategies budget ce-only paper] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from db3kd.budget import BudgetSpec, plan_budget
from db3kd.data import split_size
from db3kd.io import write_json
from db3kd.pipeline import run_recipe
from db3kd.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHERS = {"mnist": SHARED / "teachers" / "lenet5_mnist.onnx",
            "fashion-mnist": SHARED / "teachers" / "lenet5_fmnist.onnx"}
PAPER_QUERIES_PER_PAIR = 40
# Students' training per dataset (else the auto profile's 5,000 steps): LeNet-5-half on Fashion-MNIST is still
# learning at 5,000 steps (CE-only 87.5%) and gains 2.3 points at 17,200 (40 epochs of 55,000 at batch 128).
TRAIN = {"fashion-mnist": {"steps": 17_200}}
# Budget options of each plan: the defaults, and ablations of what each part of the plan buys.
STRATEGIES = {"budget": {}, "budget-plain": {"select": "first", "guide": False},
              "budget-half-mixtures": {"mixture_share": 0.5}, "budget-cap20": {"max_mixtures_per_image": 20},
              "budget-rotations": {"mixture_options": {"max_rotation": 15, "max_scale": 0.1}},
              "budget-rounds": {"mixture_options": {"rounds": 2}}}
RESULTS = ROOT / "benchmarks" / "results" / "budget_frontier.json"


def recipe(dataset: str, images: int, strategy: str, budget: int, seeds: list[int]) -> dict | None:
    """The recipe of one point of the frontier, or None when the strategy cannot spend the budget."""
    # CE-only buys min(images, budget) labels, so budgets above the images share one run.
    spent = min(images, budget) if strategy == "ce-only" else budget
    raw = {"name": f"{dataset}-{images}-{strategy}-{spent}", "teacher": str(TEACHERS[dataset]),
           "dataset": {"name": dataset, "data_dir": str(SHARED / "data")},
           "students": {"arch": ["lenet5-half"], "seeds": seeds, "train": TRAIN.get(dataset, {})}}
    if strategy in STRATEGIES:
        return {**raw, "transfer": {"split": "train", "subset": images}, "budget": {"queries": budget,
                                                                                  **STRATEGIES[strategy]}}
    if strategy == "ce-only":
        return {**raw, "transfer": {"split": "train", "subset": min(images, budget)}, "baselines": ["ce"]}
    subset = min(images, budget // (1 + 9 * PAPER_QUERIES_PER_PAIR))
    if subset < 50:
        return None
    return {**raw, "transfer": {"split": "train", "subset": subset},
            "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": PAPER_QUERIES_PER_PAIR}}}}


def run_point(raw: dict, run_dir: Path) -> dict:
    path = run_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    run_recipe(load_recipe(path), run_dir, progress=False)
    students = [json.loads(p.read_text()) for p in sorted(run_dir.glob("students/*/metrics.json"))
                if p.parent.name != "teacher"]
    accuracy = [m["test_accuracy"] for m in students]
    run = json.loads((run_dir / "run.json").read_text())
    # Seeds from the students on disk: an earlier invocation's seeds stay in the point with this one's.
    return {"queries": max(m["teacher_queries"]["total"] for m in students),
            "seeds": [m["config"]["seed"] for m in students], "test_accuracy": accuracy,
            # The last epoch's, beside the one the held-out tenth chose (200 images with 2,000: one is 0.5 points).
            "final_epoch_test_accuracy": [m["history"][-1].get("test_accuracy") for m in students], "mean_test_accuracy": statistics.mean(accuracy),
            "mean_fidelity": statistics.mean(m["fidelity"] for m in students),
            "transfer": students[0]["transfer_set"], "train_samples": students[0]["train_samples"],
            "budget": run.get("budget"), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--images", nargs="+", default=["all", "2000"])
    parser.add_argument("--budgets", type=int, nargs="+",
                        default=[60_000, 200_000, 600_000, 2_000_000, 6_000_000, 20_000_000])
    parser.add_argument("--strategies", nargs="+", default=["budget", "ce-only", "paper"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--run-dir", default="runs/bench-frontier")
    args = parser.parse_args()
    for dataset in args.datasets:
        for available in args.images:
            images = split_size(dataset, "train") if available == "all" else int(available)
            for budget in args.budgets:
                for strategy in args.strategies:
                    raw = recipe(dataset, images, strategy, budget, args.seeds)
                    if raw is None:
                        continue
                    point = run_point(raw, Path(args.run_dir) / raw["name"])
                    if strategy in STRATEGIES:
                        point["plan"] = plan_budget(BudgetSpec(budget, **STRATEGIES[strategy]), images, 10).to_dict()
                    # Read just before writing: another run of this benchmark may have added points meanwhile.
                    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"points": {}}
                    results["points"][raw["name"]] = {"dataset": dataset, "images": images, "strategy": strategy,
                                                      "budget": budget, **point}
                    print(f"{raw['name']}: {point['mean_test_accuracy']:.4f} with {point['queries']:,} queries",
                          flush=True)
                    write_json(RESULTS, results)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"points": {}}
    for dataset in {p["dataset"] for p in results["points"].values()}:
        plot(results, dataset, RESULTS.with_name(f"budget_frontier_{dataset}.png"))


def plot(results: dict, dataset: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    points = [p for p in results["points"].values() if p["dataset"] == dataset]
    for strategy, colour in zip((*STRATEGIES, "ce-only", "paper"),
                                ("tab:red", "tab:orange", "tab:pink", "tab:purple", "tab:brown", "tab:olive",
                                 "tab:blue", "tab:green")):
        for images, style in zip(sorted({p["images"] for p in points}, reverse=True), ("o-", "s--")):
            line = sorted((p["queries"], 100 * p["mean_test_accuracy"]) for p in points
                          if p["strategy"] == strategy and p["images"] == images)
            if line:
                ax.plot(*zip(*line), style, color=colour, label=f"{strategy}, {images:,} real images")
    ax.set_xscale("log")
    ax.set(xlabel="teacher queries behind the student's training data", ylabel="test accuracy (%)",
           title=f"{dataset}: lenet5-half from the LeNet-5's labels, by way of spending the queries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
