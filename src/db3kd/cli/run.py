"""`db3kd run`: run a recipe's stages (soft labels, students, baselines), skipping those already done."""

from __future__ import annotations

import os

from .common import add_executor_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a recipe: synthesis (zero-shot), soft labels, students and baselines, cached per stage",
        description="Run the experiment declared in a YAML recipe (see db3kd.recipe). Each stage is cached in the "
                    "run directory: a rerun skips finished stages and recomputes only those whose config changed.")
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: the recipe's run_dir)")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token for a label-service teacher (default: $DB3KD_API_KEY; never in the recipe)")
    parser.add_argument("--report", action="store_true", help="write and print the report when done")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (stage lines only)")
    add_executor_args(parser, default=None, default_note="default, unless the recipe's executor says ray")
    parser.set_defaults(run=run)


def executor_override(recipe, args):
    """`recipe` with its `executor` overridden by the command line's --executor and Ray options.

    --executor local drops the recipe's Ray settings; the Ray options apply to a ray executor only (the
    recipe's or --executor ray's).
    """
    import dataclasses

    from ..errors import ConfigError
    from ..recipe import ExecutorSpec, _FieldError

    flags = {"address": ("--ray-address", args.ray_address), "workers": ("--workers", args.workers),
             "max_retries": ("--max-retries", args.max_retries)}
    given = {key: value for key, (_, value) in flags.items() if value is not None}
    if args.executor is None and not given:
        return recipe
    base = recipe.executor if args.executor in (None, recipe.executor.kind) else ExecutorSpec()
    kind = args.executor or recipe.executor.kind
    if kind == "local" and given:
        flag = flags[next(iter(given))][0]
        raise ConfigError(f"{flag} applies to --executor ray only (the recipe's executor is local)")
    try:
        spec = dataclasses.replace(base, kind=kind, **given)
    except _FieldError as e:
        raise ConfigError(f"{flags[e.name][0]}: {e.message}") from None
    return dataclasses.replace(recipe, executor=spec)


def run(args) -> int:
    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    recipe = executor_override(load_recipe(args.recipe), args)
    records = run_recipe(recipe, args.out, api_key=args.api_key, progress=not args.quiet)
    run_dir = args.out or recipe.run_dir
    done = sum(r.status == "done" for r in records)
    print(f"{recipe.name}: {done} stage(s) run, {len(records) - done} up to date; results in {run_dir}")
    if args.report:
        from ..report import write_report

        print(write_report(run_dir))
    return 0
