"""Run a recipe (`db3kd.recipe`) as cached stages under a run directory.

    RUN_DIR/recipe.resolved.yaml                      the recipe with every default and path resolved
    RUN_DIR/synthesize/                               zero-shot: the pseudo samples (db3kd.synthesis.synthesize)
    RUN_DIR/mixtures/                                 optional: teacher-labelled mixtures of the transfer images
    RUN_DIR/mixtures/round<r>/, selector<r>/          ... bought in rounds: each round's, and the student choosing it
    RUN_DIR/soft_labels/<name>/                       a soft-label stage (compute_soft_labels: npz + manifest)
    RUN_DIR/students/<name>-<arch>-seed<k>/           a student distilled on stage <name>'s soft labels
    RUN_DIR/students/<name>-q<Q>-<arch>-seed<k>/      ... on an mbd stage's distances at Q queries per pair
    RUN_DIR/students/ce-<arch>-seed<k>/               baseline: cross-entropy on the teacher's top-1 labels
    RUN_DIR/students/standard-kd-<arch>-seed<k>/      baseline: white-box KD on the teacher's logits
    RUN_DIR/run.json                                  what the last `db3kd run` did, stage by stage

Zero-shot (`transfer.synthesize`), the synthesize stage's pseudo samples are the transfer set of every other
stage; with `transfer.mixtures`, every student but `standard-kd` also trains on the mixtures stage's images.
Mixtures in rounds are chosen by selector students trained like the recipe's first student, so editing
`students.train` or the first architecture buys them again.

Every stage directory holds a `stage.json` with the hash of its resolved config and of its inputs (whose
hashes hold their own inputs'). It says "running" while the stage works and "done" once its results are
complete. A rerun skips a stage "done" with the same hash, resumes one left "running" with the same hash
(its shards survive), and clears and recomputes any other: editing a recipe recomputes exactly the stages
whose config or inputs changed. The recipe's `executor` is in no stage's hash (results are equal bit for bit
whichever made them); it is built before the first stage runs, if a sharded stage has work to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .io import exclusive, write_json, write_text
from .recipe import Recipe
from .teachers import TeacherSpec
from .data.images import ImageStore
from .transfer import TransferCost, TransferSet

STAGE_FILE = "stage.json"
SYNTHESIZE = "synthesize"  # the zero-shot synthesis stage's directory
MIXTURES = "mixtures"  # the zero-shot mixtures stage's directory (transfer.mixtures)
RESOLVED_RECIPE = "recipe.resolved.yaml"
SUPERSEDED = "superseded"  # results of stages whose config the recipe no longer asks for


@dataclass
class Stage:
    """One unit of cached work: its directory (relative to the run directory), kind and resolved config."""

    name: str  # e.g. "soft_labels/bd", "students/bd-lenet5-half-seed0"
    kind: str  # synthesize | mixtures | soft_labels | distill | ce | standard-kd
    config: dict  # everything that determines its results (hashed)
    inputs: list[str] = field(default_factory=list)  # names of the stages it reads
    hash: str = ""  # of config and the inputs' hashes; set by plan_stages
    input_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The report's method label: the soft-label stage (with @Q for a checkpoint) or the baseline."""
        if self.kind == "distill":
            q = self.config["checkpoint"]
            return self.config["soft_labels"] + (f" @{q}" if q is not None else "")
        return self.kind


@dataclass
class StageRecord:
    """What a run did with one stage."""

    name: str
    status: str  # done | skipped
    seconds: float


def plan_stages(recipe: Recipe, teacher_id: str = "") -> list[Stage]:
    """Every stage of `recipe` in run order, with hashes (synthesis, mixtures and soft labels first, then
    students, then baselines)."""
    stages: list[Stage] = []
    mixtures: list[str] = []  # what students that also train on the mixtures read besides their own inputs
    train = {k: v for k, v in recipe.students.train.to_dict().items() if k != "seed"}  # seeds: per student
    if recipe.transfer.mixtures is not None:
        mixture_config = {"kind": "mixtures", "params": recipe.transfer.mixtures.params()}
        if recipe.transfer.mixtures.rounds > 1:  # later rounds are chosen by a student like the recipe's first
            mixture_config["selector"] = {"arch": recipe.students.arch[0], "train": train}
    if recipe.transfer.zero_shot:
        data = {"teacher": teacher_id, "dataset": recipe.dataset.name, "split": "pseudo"}
        stages.append(Stage(SYNTHESIZE, "synthesize", {**data, "kind": "synthesize",
                                                       "params": dataclasses.asdict(recipe.transfer.synthesize)}))
        transfer_inputs = [SYNTHESIZE]  # every stage that reads the transfer images depends on them
        if recipe.transfer.mixtures is not None:
            # Its own stage, hashed on the synthesize stage's: new mixture parameters never recompute the pseudo
            # samples, and new pseudo samples always recompute the mixtures.
            stages.append(Stage(MIXTURES, "mixtures", {**data, **mixture_config}, [SYNTHESIZE]))
            mixtures = [MIXTURES]
    else:
        data = {"teacher": teacher_id, "dataset": recipe.dataset.name, "split": recipe.transfer.split,
                "transfer_subset": recipe.transfer.subset}
        transfer_inputs = []
        if recipe.transfer.mixtures is not None:  # mixtures of the real transfer images
            stages.append(Stage(MIXTURES, "mixtures", {**data, **mixture_config}))
            mixtures = [MIXTURES]
    loss = dataclasses.asdict(recipe.students.loss)
    for name, spec in recipe.soft_labels.items():
        # The estimator with every default filled in: new defaults (a new search) give new results, not stale ones.
        config = {**data, "kind": "soft_labels", "method": spec.method, "params": spec.params, "seed": spec.seed,
                  "shard_size": spec.shard_size, "subset": spec.subset, "estimator": repr(spec.estimator)}
        if spec.uses_selector:  # the pairs or the search depend on the selector student too
            config.update(select=spec.select, classes_per_image=spec.classes_per_image, guide=spec.guide,
                          selector={"arch": recipe.students.arch[0], "train": train, "seed": spec.seed})
        stages.append(Stage(f"soft_labels/{name}", "soft_labels", config, list(transfer_inputs)))
    students = recipe.students
    for name, spec in recipe.soft_labels.items():
        for checkpoint in [None, *spec.checkpoints()]:
            tag = name if checkpoint is None else f"{name}-q{checkpoint}"
            for arch in students.arch:
                for seed in students.seeds:
                    config = {**data, "kind": "distill", "soft_labels": name, "checkpoint": checkpoint, "arch": arch,
                              "seed": seed, "train": train, "loss": loss,
                              **({"hard_labels_for_rest": True} if spec.hard_labels_for_rest else {})}
                    stages.append(Stage(f"students/{tag}-{arch}-seed{seed}", "distill", config,
                                        [f"soft_labels/{name}", *mixtures]))  # the soft labels first
    if "teacher" in recipe.baselines:  # one row, whatever the students
        stages.append(Stage("students/teacher", "teacher", {**data, "kind": "teacher"}))
    for baseline in (b for b in recipe.baselines if b != "teacher"):
        for arch in students.arch:
            for seed in students.seeds:
                config = {**data, "kind": baseline, "arch": arch, "seed": seed, "train": train,
                          **({"loss": loss} if baseline == "standard-kd" else {})}
                extra = mixtures if baseline == "ce" else []  # standard-kd: the pseudo samples' logits only
                stages.append(Stage(f"students/{baseline}-{arch}-seed{seed}", baseline, config,
                                    [*transfer_inputs, *extra]))
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in by_name:  # e.g. a soft-label stage named like a baseline
            raise ConfigError(f"two stages would share the directory {stage.name}; rename a soft_labels entry")
        stage.input_hashes = {i: by_name[i].hash for i in stage.inputs}
        payload = {"config": stage.config, "inputs": stage.input_hashes}
        stage.hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        by_name[stage.name] = stage
    return stages


def read_stage(directory: Path) -> dict | None:
    """A stage directory's stage.json, or None if absent or unreadable."""
    try:
        return json.loads((directory / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _Context:
    """What stages share, loaded on first use: a rerun with nothing to do opens no data and no teacher."""

    def __init__(self, recipe: Recipe, run_dir: Path, api_key: str | None, progress: bool):
        self.recipe, self.run_dir, self.progress, self._data = recipe, run_dir, progress, {}
        self.teacher = TeacherSpec.parse(recipe.teacher, api_key)

    @cached_property
    def transfer_x(self):
        """The transfer images: the pseudo samples (zero-shot), else the first transfer.subset of the split (or
        of the user's images, an `ImageStore` for a folder)."""
        if self.recipe.transfer.zero_shot:
            return self.pseudo[0]
        x, subset = self.data(self.recipe.transfer.split)[0], self.recipe.transfer.subset
        if subset is not None and subset > len(x):
            raise ConfigError(f"transfer.subset: expected at most {len(x)} (the {self.recipe.transfer.split} "
                              f"split's size), got {subset}")
        return x if subset is None else x.head(subset) if isinstance(x, ImageStore) else x[:subset]

    def data(self, split: str) -> tuple:
        """(x, y or None, what manifests record) of a split (read once; zero-shot never reads "train"); the
        user's images through the teacher's contract."""
        from .transfer import dataset_images

        if split not in self._data:
            d = self.recipe.dataset
            path = d.name if not d.own or split == "train" else d.test
            self._data[split] = dataset_images(path, split, self.oracle, d.data_dir, d.resize, d.skip_bad_images,
                                               self.progress)
        return self._data[split]

    @cached_property
    def mixture_pool(self) -> np.ndarray:
        """The images mixtures are made of: the pseudo samples (zero-shot), else the real transfer images."""
        return self.pseudo[0] if self.recipe.transfer.zero_shot else np.asarray(self.transfer_x)

    @cached_property
    def pseudo(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The synthesize stage's pseudo samples, their labels (the teacher's) and its manifest."""
        from .jobs.synthesis import load_pseudo_samples

        return load_pseudo_samples(self.run_dir / SYNTHESIZE)

    def synthesis_queries(self) -> int:
        """Teacher queries that made the transfer images: the synthesis's (zero-shot), else none."""
        return int(self.pseudo[2]["total_queries"]) if self.recipe.transfer.zero_shot else 0

    @property
    def source(self) -> str:
        """Where the transfer images come from, as students record it."""
        if self.recipe.transfer.zero_shot:
            return "synthesized"
        if self.recipe.dataset.own:  # "labelled folder", "folder" or "arrays"
            return self.data(self.recipe.transfer.split)[2]["images"]["kind"]
        return f"{self.recipe.transfer.split} split"

    def with_mixtures(self, transfer: TransferSet, stage: Stage) -> TransferSet:
        """`transfer` plus the mixtures stage's images (rebuilt from the pseudo samples), if `stage` reads them."""
        if MIXTURES not in stage.inputs:
            return transfer
        from .jobs.mixtures import read_mixtures

        images, labels, manifest = read_mixtures(self.run_dir / MIXTURES, self.mixture_pool,
                                                 source="the transfer images", remake="rerun")
        return transfer.with_mixtures(images, labels, manifest["total_queries"])

    @cached_property
    def test(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The test images (in memory) and their labels (None: unlabelled, fidelity only)."""
        x, y, _ = self.data("test")
        return np.asarray(x), y

    @cached_property
    def info(self):
        from .data import DatasetInfo, dataset_info

        if not self.recipe.dataset.own:
            return dataset_info(self.recipe.dataset.name)
        oracle = self.oracle
        return DatasetInfo(Path(self.recipe.dataset.name).name, tuple(oracle.input_shape), oracle.num_classes,
                           tuple(str(c) for c in range(oracle.num_classes)))

    @cached_property
    def oracle(self):
        from .oracle import open_oracle

        oracle = open_oracle(self.teacher)
        if not self.recipe.dataset.own:  # the user's images are converted to the teacher's contract instead
            oracle.check_fits(self.info.input_shape, self.info.num_classes, f"the recipe's dataset {self.info.name}")
        return oracle

    @cached_property
    def executor(self):
        """Where shards run: one executor, reused by every stage."""
        return self.recipe.executor.build(self.teacher)


def run_recipe(recipe: Recipe, run_dir: str | os.PathLike | None = None, api_key: str | None = None,
               progress: bool = True,
               on_stage: Callable[[int, int, StageRecord], None] | None = None) -> list[StageRecord]:
    """Run every stage of `recipe` that is not already done with the same config; return what happened.

    `on_stage(i, n, record)` is called after each of the n stages (the CLI prints a line).
    """
    with exclusive(run_dir if run_dir is not None else recipe.run_dir) as run_dir:  # one `db3kd run` at a time
        return _run_stages(recipe, run_dir, api_key, progress, on_stage)


def _run_stages(recipe: Recipe, run_dir: Path, api_key: str | None, progress: bool, on_stage) -> list[StageRecord]:
    import yaml

    resolved = dataclasses.asdict(dataclasses.replace(recipe, run_dir=str(run_dir)))  # every default filled in
    write_text(run_dir / RESOLVED_RECIPE, yaml.safe_dump(resolved, sort_keys=False))
    context = _Context(recipe, run_dir, api_key, progress)
    stages = plan_stages(recipe, context.teacher.identity())
    runners = {"synthesize": _synthesize_stage, "mixtures": _mixtures_stage, "soft_labels": _soft_label_stage,
               "distill": _distill_stage, "ce": _ce_stage, "standard-kd": _standard_kd_stage,
               "student-alone": _student_alone_stage, "teacher": _teacher_stage}
    if any(stage.kind in SHARDED and _status(run_dir / stage.name, stage) != "done" for stage in stages):
        context.executor  # noqa: B018 - made now, so a missing Ray or a bad address fails before any query
    if recipe.dataset.own and any(_status(run_dir / s.name, s) != "done" for s in stages):
        context.test  # noqa: B018 - read (and checked against the teacher's classes) before any query
    records = []
    for i, stage in enumerate(stages, 1):
        out = run_dir / stage.name
        status = _prepare(out, stage, run_dir)
        started = time.perf_counter()
        if status != "skipped":
            before = read_stage(out) or {}
            _write_stage(out, stage, "running")
            summary = runners[stage.kind](context, stage, out)
            _write_stage(out, stage, "done", seconds=time.perf_counter() - started, **summary,
                         **({"resumed": True} if before.get("status") == "running" else {}))
            status = "done"
        record = StageRecord(stage.name, status, round(time.perf_counter() - started, 2))
        records.append(record)
        if on_stage is not None:
            on_stage(i, len(stages), record)
    opened = context.__dict__.get("oracle")  # the teacher, if this run needed it: what it sent, all stages
    summary = {"recipe": recipe.name, "executor": dataclasses.asdict(recipe.executor),
               "stages": [dataclasses.asdict(r) for r in records],
               "teacher_queries_this_run": opened.queries if opened is not None else 0}
    if recipe.budget_plan is not None:
        summary["budget"] = budget_spent(recipe, run_dir, stages)
    write_json(run_dir / "run.json", summary)
    return records


def budget_spent(recipe: Recipe, run_dir: Path, stages: list[Stage]) -> dict:
    """The budget's plan and what was spent: every stage's transfer queries (evaluation apart), in all within
    the budget, as the oracle counted them."""
    spent = {s.name: (read_stage(run_dir / s.name) or {}).get("teacher_queries", {}).get("transfer", 0)
             for s in stages}
    spent = {name: int(q) for name, q in spent.items() if q}
    plan = recipe.budget_plan
    return {**plan.to_dict(), "spent": spent, "spent_total": sum(spent.values()),
            "within_budget": sum(spent.values()) <= plan.budget}


SHARDED = ("synthesize", "mixtures", "soft_labels")  # the stage kinds whose shards the executor computes


def _status(out: Path, stage: Stage) -> str | None:
    """'done' or 'running' if `out` holds this stage with this hash, else None."""
    state = read_stage(out) or {}
    return state.get("status") if state.get("hash") == stage.hash else None


def _prepare(out: Path, stage: Stage, run_dir: Path) -> str:
    """'skipped' if `out` is done with this hash; else make it ready: resumed if it was running this hash, else
    fresh. Another config's results, paid for, are never deleted: they are set aside under
    RUN_DIR/superseded/<stage>/<hash>/, and brought back when the recipe returns to that config."""
    status = _status(out, stage)
    if status in ("done", "running"):
        return "skipped" if status == "done" else "resume"
    if out.exists():
        old = (read_stage(out) or {}).get("hash") or time.strftime("unknown-%Y%m%dT%H%M%S")
        aside = run_dir / SUPERSEDED / stage.name / old
        if aside.exists():
            shutil.rmtree(aside)  # an older copy of the same config's results: this one is newer
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, aside)
    kept = run_dir / SUPERSEDED / stage.name / stage.hash
    if kept.is_dir():
        os.replace(kept, out)
        return _prepare(out, stage, run_dir)
    out.mkdir(parents=True)
    return "fresh"


def superseded(run_dir: Path) -> list[dict]:
    """The stage results set aside by recipe edits (stage.json of each), for the report."""
    return [{**(read_stage(p.parent) or {}), "path": str(p.parent.relative_to(run_dir))}
            for p in sorted((run_dir / SUPERSEDED).glob(f"**/{STAGE_FILE}"))]


def _write_stage(out: Path, stage: Stage, status: str, **summary) -> None:
    write_json(out / STAGE_FILE, {"stage": stage.name, "kind": stage.kind, "status": status, "hash": stage.hash,
                                  "inputs": stage.input_hashes, "config": stage.config, **summary,
                                  "finished" if status == "done" else "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


# --- the stages ---------------------------------------------------------------------------------------------
# Each returns a summary for stage.json: teacher queries for the transfer set and for evaluation, counted apart.

def _synthesize_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .jobs.synthesis import SynthesisConfig, synthesize

    with ctx.teacher.thread_policy():
        manifest = synthesize(ctx.oracle, SynthesisConfig(**stage.config["params"]), out,
                              {"teacher": ctx.recipe.teacher}, progress=ctx.progress, executor=ctx.executor)
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0},
            "pseudo_samples": manifest["num_samples"], "synthesis_seconds": manifest["seconds"]}


def _mixtures_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    import torch

    from .jobs.mixtures import MixtureConfig, label_mixtures

    zero_shot = ctx.recipe.transfer.zero_shot
    source = {"pseudo": SYNTHESIZE} if zero_shot else {"images": ctx.source}
    config = MixtureConfig(**stage.config["params"])
    threads = torch.get_num_threads()  # the selectors train on them all, not under the teacher's thread policy

    def selector(round: int, earlier) -> torch.nn.Module:
        """The student choosing round `round`'s mixtures: trained on those before it (and the pseudo samples,
        labelled by the synthesis), like the recipe's first student."""
        from .jobs.selection import train_selector
        from .training import TrainConfig, torch_threads

        def transfer() -> TransferSet:
            x, y = earlier()
            if not zero_shot:
                return TransferSet(x, y, None, TransferCost(mixtures=len(x)), "mixtures")
            pseudo_x, pseudo_y, _ = ctx.pseudo  # held out from, as for the students; the mixtures are added
            base = TransferSet(pseudo_x, pseudo_y, None, TransferCost(synthesis=ctx.synthesis_queries()), ctx.source)
            return base.with_mixtures(x, y, len(x))

        spec = stage.config["selector"]
        with torch_threads(threads):
            return train_selector(out / f"selector{round}", spec["arch"], ctx.info, transfer,
                                  TrainConfig(**spec["train"], seed=config.seed), ctx.test, ctx.progress)

    with ctx.teacher.thread_policy():
        manifest = label_mixtures(ctx.oracle, ctx.mixture_pool, config, out, {"teacher": ctx.recipe.teacher, **source},
                                  progress=ctx.progress, executor=ctx.executor, selector=selector)
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0}, "mixtures": manifest["count"],
            "mixture_seconds": manifest["seconds"]}


def _soft_label_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .jobs.soft_labels import compute_soft_labels, digest

    name = stage.name.split("/", 1)[1]
    spec = ctx.recipe.soft_labels[name]
    x = ctx.transfer_x  # the transfer images are also the reference samples (candidate directions)
    if spec.subset is not None and spec.subset > len(x):
        raise ConfigError(f"soft_labels.{name}.subset: expected at most {len(x)} (the transfer set's size), got {spec.subset}")
    run_info = {"teacher": ctx.recipe.teacher, "dataset": ctx.recipe.dataset.name, "split": ctx.recipe.transfer.split}
    if not ctx.recipe.transfer.zero_shot:
        run_info.update(ctx.data(ctx.recipe.transfer.split)[2])  # a path: where the images came from, how converted
    pseudo = {}
    if ctx.recipe.transfer.zero_shot:
        # Pseudo samples: their labels are the teacher's already (no labelling queries), and the images go
        # into soft_labels.npz, since no dataset holds them.
        run_info.update(split="pseudo", pseudo=SYNTHESIZE, pseudo_sha256=digest(*ctx.pseudo[:2]))
        pseudo = {"reference_y": ctx.pseudo[1], "store_images": True, "synthesis_queries": ctx.synthesis_queries()}
    indices, selected = np.arange(spec.subset or len(x)), {}
    if spec.uses_selector:
        indices, selected = _select_pairs(ctx, stage, spec, out, x, pseudo.get("reference_y"))
    with ctx.teacher.thread_policy():
        manifest = compute_soft_labels(ctx.oracle, x, indices, spec, out, run_info, progress=ctx.progress,
                                       executor=ctx.executor, **selected, **pseudo)
    accuracy = {} if not spec.uses_selector else {"selector_test_accuracy": json.loads(
        (out / "selector" / "metrics.json").read_text())["test_accuracy"]}
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0},
            "soft_label_seconds": manifest["seconds"], **accuracy}


def _select_pairs(ctx: _Context, stage: Stage, spec, out: Path, x, reference_y) -> tuple[np.ndarray, dict]:
    """The images a soft-label stage with a selector searches from, and `compute_soft_labels`'s `targets` and
    `guide` (`db3kd.jobs.selection`): the selector is a student trained on the teacher's labels of the transfer
    images (the references' labels, asked here if not yet)."""
    from .jobs.selection import select_pairs, selector_probabilities
    from .jobs.soft_labels import reference_labels
    from .training import TrainConfig

    if reference_y is None:
        with ctx.teacher.thread_policy():
            reference_y, _ = reference_labels(out, ctx.oracle, x)
    selector = stage.config["selector"]
    config = TrainConfig(**selector["train"], seed=selector["seed"])
    # Its labels: bought by this stage's reference labelling, or with the pseudo samples (zero-shot).
    cost = TransferCost(synthesis=ctx.synthesis_queries()) if ctx.recipe.transfer.zero_shot else \
        TransferCost(labels=len(x))
    model, probs = selector_probabilities(out / "selector", selector["arch"], ctx.info, np.asarray(x), reference_y,
                                          cost, config, ctx.test, ctx.progress)
    indices, targets = select_pairs(reference_y, spec.subset or len(x), spec.select, spec.classes_per_image, probs)
    return indices, {"targets": targets, "guide": model if spec.guide else None}


def _distill_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .losses import KDLoss
    from .transfer import load_transfer_set

    transfer = load_transfer_set(ctx.run_dir / stage.inputs[0], ctx.recipe.dataset.data_dir,
                                 checkpoint=stage.config["checkpoint"],
                                 hard_labels_for_rest=stage.config.get("hard_labels_for_rest", False))
    extra = {"stage": stage.name, "method": stage.label, "estimator": transfer.manifest["method"],
             "checkpoint": stage.config["checkpoint"], "soft_labels": stage.inputs[0], "teacher": ctx.recipe.teacher,
             "soft_label_seconds": transfer.manifest["seconds"]}
    return _train_student(ctx, stage, out, ctx.with_mixtures(transfer, stage), extra,
                          kd=KDLoss(**stage.config["loss"]))


def _ce_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .jobs.students import teacher_labels

    if ctx.recipe.transfer.zero_shot:
        labels, cost = ctx.pseudo[1], TransferCost(synthesis=ctx.synthesis_queries())  # labelled by the synthesis
    else:
        labels, queries = teacher_labels(ctx.oracle, ctx.transfer_x)
        cost = TransferCost(labels=queries)
    transfer = TransferSet(ctx.transfer_x, labels, None, cost, ctx.source)
    extra = {"stage": stage.name, "method": "ce", "teacher": ctx.recipe.teacher}
    return _train_student(ctx, stage, out, ctx.with_mixtures(transfer, stage), extra, spent=cost.labels)


def _student_alone_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    """The paper's "student alone": cross-entropy on the transfer images' true labels, no teacher involved."""
    y = ctx.data(ctx.recipe.transfer.split)[1]
    if y is None:
        raise ConfigError("baselines: student-alone trains on true labels, and these images have none (an unlabelled "
                          "folder): drop it from the recipe")
    transfer = TransferSet(ctx.transfer_x, y[:len(ctx.transfer_x)], None, TransferCost(), f"{ctx.source} (true labels)")
    return _train_student(ctx, stage, out, transfer, {"stage": stage.name, "method": "student-alone"})


def _teacher_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    """The teacher's own test accuracy: its labels of the test images, one query each (evaluation)."""
    from .jobs.students import teacher_labels

    x, y = ctx.test
    labels, queries = teacher_labels(ctx.oracle, x)
    accuracy = None if y is None else float((labels == y).mean())
    write_json(out / "metrics.json", {"arch": "teacher", "stage": stage.name, "method": "teacher",
                                      "teacher": ctx.recipe.teacher, "test_accuracy": accuracy, "fidelity": 1.0,
                                      "teacher_queries": TransferCost(evaluation=queries).to_dict(),
                                      "transfer_set": "—", "transfer_samples": 0, "mixture_samples": 0,
                                      "queries_per_pair": None, "white_box": False})
    return {"teacher_queries": {"transfer": 0, "eval": queries}, "test_accuracy": accuracy}


def _standard_kd_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    # The white-box reference: it never trains on the mixtures (transfer.mixtures), nor counts their queries.
    from .losses import KDLoss
    from .standard_kd import standard_kd_transfer

    transfer = standard_kd_transfer(ctx.teacher, ctx.transfer_x, ctx.source,
                                    TransferCost(synthesis=ctx.synthesis_queries()))
    extra = {"stage": stage.name, "method": "standard-kd", "teacher": ctx.recipe.teacher,
             "white_box_forward_passes": len(transfer.images)}
    return _train_student(ctx, stage, out, transfer, extra, kd=KDLoss(**stage.config["loss"]))


def _train_student(ctx: _Context, stage: Stage, out: Path, transfer: TransferSet, extra: dict, kd=None,
                   spent: int = 0) -> dict:
    """Train the stage's student; `spent`: transfer queries this stage sent itself (the CE baseline's labels;
    a distilled student's were spent by its soft-label stage)."""
    from .jobs.students import train_student
    from .training import TrainConfig

    config = TrainConfig(**stage.config["train"], seed=stage.config["seed"])
    metrics = train_student(out, stage.config["arch"], ctx.info, transfer, ctx.test, config, kd=kd,
                            oracle=ctx.oracle, extra_metrics=extra, progress=ctx.progress)
    return {"teacher_queries": {"transfer": spent, "eval": metrics["teacher_queries"]["evaluation"]},
            "test_accuracy": metrics["test_accuracy"], "fidelity": metrics["fidelity"]}
