"""`db3kd run`: run a recipe's stages (soft labels, students, baselines), skipping those already done.

Run the experiment declared in a YAML recipe (see db3kd.recipe). Each stage is cached in the run directory: a
rerun skips finished stages and recomputes only those whose config changed.
"""

from __future__ import annotations

import dataclasses
import os

from .common import add_executor_args, command, executor_config


def register(subparsers) -> None:
    parser = command(subparsers, "run", run, "run a recipe: synthesis (zero-shot), soft labels, students and baselines, cached per stage")
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: the recipe's run_dir)")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token for a label-service teacher (default: $DB3KD_API_KEY; never in the recipe)")
    parser.add_argument("--budget", type=int, metavar="Q",
                        help="spend at most Q teacher queries on the students' training data, planned by db3kd "
                             "(labels, mixtures of the images, soft labels on a subset); sets the recipe's budget")
    parser.add_argument("--report", action="store_true", help="write and print the report when done")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (stage lines only)")
    add_executor_args(parser, default=None, default_note="default, unless the recipe's executor says ray")


def run(args) -> int:
    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, budget=args.budget)
    recipe = dataclasses.replace(recipe, executor=executor_config(args, recipe.executor))

    def show(i: int, n: int, record) -> None:
        took = "" if record.status == "skipped" else f" ({record.seconds:.1f} s)"
        print(f"[{i}/{n}] {record.name}: {record.status}{took}", flush=True)

    records = run_recipe(recipe, args.out, api_key=args.api_key, progress=not args.quiet, on_stage=show)
    run_dir = args.out or recipe.run_dir
    done = sum(r.status == "done" for r in records)
    print(f"{recipe.name}: {done} stage(s) run, {len(records) - done} up to date; results in {run_dir}")
    if recipe.budget_plan is not None:
        import json
        from pathlib import Path

        spent = json.loads((Path(run_dir) / "run.json").read_text())["budget"]
        print(f"{recipe.budget_plan.describe()}; spent {spent['spent_total']:,}")
    if args.report:
        from ..report import write_report

        print(write_report(run_dir))
    return 0
