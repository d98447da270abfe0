"""Benchmark: the paper's tables on Fashion-MNIST and CIFAR-10, from the recipes in recipes/, and their targets.

Each recipe is a `db3kd run` (cached and resumable: a rerun only adds what is missing); `--collect-only` reads
what the run directories hold without running anything (a long recipe may be run stage by stage, over several
sessions, with `db3kd run`). For every run directory: one row per (method, student) with each seed's test
accuracy (at the epoch chosen on held-out transfer data), fidelity, the teacher queries behind the training
data, training and soft-label seconds; the recipe's wall time (the sum of its stages' seconds, as each stage
recorded it); and the issue's targets where the rows they need are there:

- fmnist-db3kd: DB3KD-BD >= CE-only (lenet5-half, mean of 2 seeds, the same 60,000 images); the whole recipe
  in <= 90 minutes;
- fmnist-zsdb3kd: a zero-shot student >= 85% test accuracy with <= 10M teacher queries;
- cifar10-db3kd: DB3KD (BD or MBD) alexnet-half >= CE-only + 1 point (mean of 2 seeds) and >= 78.3%.

Writes benchmarks/results/paper_tables.json and paper_tables.md (`db3kd report`'s table over all of them, a
column per dataset, with the paper's figures as reported).

    python benchmarks/paper_tables.py [--recipes fmnist-db3kd fmnist-zsdb3kd cifar10-db3kd] [--collect-only]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from db3kd.io import write_json
from db3kd.pipeline import RESOLVED_RECIPE, plan_stages, read_stage, run_recipe
from db3kd.recipe import load_recipe
from db3kd.report import collect, summarise, write_combined_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("fmnist-db3kd", "fmnist-zsdb3kd", "cifar10-db3kd", "cifar10-zsdb3kd")


def rows(recipe, run_dir: Path) -> tuple[list[dict], float, list[str]]:
    """`db3kd report`'s rows of `recipe` (per method and student, with each seed's figures); its wall time so far
    (s); its stages not finished."""
    stages = plan_stages(recipe)
    results, missing = collect(run_dir, stages)
    table = [{"method": r["label"], "kind": r["kind"], "arch": r["arch"], "seeds": r["seeds"],
              "mean_test_accuracy": r["accuracy"][0], **r["per_seed"], "teacher_queries": r["queries"],
              "zero_shot": r["zero_shot"], "soft_label_seconds": r["soft_label_seconds"]} for r in summarise(results)]
    seconds = sum((read_stage(run_dir / s.name) or {}).get("seconds", 0) for s in stages)
    return table, seconds, [name for name, _ in missing]


def _row(table: list[dict], method: str, arch: str) -> dict | None:
    return next((r for r in table if r["method"] == method and r["arch"] == arch), None)


def targets(name: str, table: list[dict], seconds: float, missing: list[str]) -> dict:
    """The issue's targets for this recipe: met, missed, or None where a row they need is not there yet."""
    if name == "fmnist-db3kd":
        bd, ce = _row(table, "bd", "lenet5-half"), _row(table, "ce", "lenet5-half")
        two = bd and ce and bd["seeds"] >= 2 and ce["seeds"] >= 2
        return {"bd_at_least_ce_mean_of_2_seeds": (bd["mean_test_accuracy"] >= ce["mean_test_accuracy"]) if two else None,
                "recipe_at_most_90_minutes": None if missing else seconds <= 90 * 60}
    if name == "fmnist-zsdb3kd":
        ok = [r for r in table if r["zero_shot"] and r["kind"] != "standard-kd" and r["teacher_queries"] <= 10_000_000]
        return {"zero_shot_at_least_85_percent_within_10M_queries":
                max(r["mean_test_accuracy"] for r in ok) >= 0.85 if ok else None}
    if name == "cifar10-db3kd":
        ce = _row(table, "ce", "alexnet-half")
        db3kd = [r for r in table if r["arch"] == "alexnet-half" and r["method"].split(" @")[0] in ("bd", "mbd")
                 and r["seeds"] >= 2]
        if not (ce and ce["seeds"] >= 2 and db3kd):
            return {"db3kd_at_least_ce_plus_1_point_and_78_3_percent": None}
        best = max(r["mean_test_accuracy"] for r in db3kd)
        return {"db3kd_at_least_ce_plus_1_point_and_78_3_percent":
                best >= ce["mean_test_accuracy"] + 0.01 and best >= 0.783}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--collect-only", action="store_true", help="read the run directories; run nothing")
    args = parser.parse_args()
    out, dirs = {"benchmark": "paper_tables", "recipes": {}}, []
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        run_dir = ROOT / recipe.run_dir
        if not args.collect_only:
            run_recipe(recipe, run_dir)
        if not (run_dir / RESOLVED_RECIPE).is_file():
            out["recipes"][name] = {"run_dir": str(run_dir.relative_to(ROOT)), "status": "not run"}
            continue
        table, seconds, missing = rows(recipe, run_dir)
        out["recipes"][name] = {"run_dir": str(run_dir.relative_to(ROOT)), "rows": table,
                                "recipe_seconds": round(seconds, 1), "stages_not_finished": missing,
                                "targets": targets(name, table, seconds, missing)}
        dirs.append(run_dir)
        print(f"{name}: {len(table)} rows, {len(missing)} stages not finished, targets {out['recipes'][name]['targets']}")
    if dirs:
        write_combined_report(dirs, RESULTS / "paper_tables.md")
    write_json(RESULTS / "paper_tables.json", out)
    print(json.dumps({k: v.get("targets") for k, v in out["recipes"].items()}, indent=1))


if __name__ == "__main__":
    main()
