"""Run a recipe (`db3kd.recipe`) as cached stages under a run directory.

    RUN_DIR/recipe.resolved.yaml                      the recipe with every default and path resolved
    RUN_DIR/synthesize/                               zero-shot: the pseudo samples (db3kd.synthesis.synthesize)
    RUN_DIR/mixtures/                                 zero-shot, optional: teacher-labelled mixtures of them
    RUN_DIR/soft_labels/<name>/                       a soft-label stage (compute_soft_labels: npz + manifest)
    RUN_DIR/students/<name>-<arch>-seed<k>/           a student distilled on stage <name>'s soft labels
    RUN_DIR/students/<name>-q<Q>-<arch>-seed<k>/      ... on an mbd stage's distances at Q queries per pair
    RUN_DIR/students/ce-<arch>-seed<k>/               baseline: cross-entropy on the teacher's top-1 labels
    RUN_DIR/students/standard-kd-<arch>-seed<k>/      baseline: white-box KD on the teacher's logits
    RUN_DIR/run.json                                  what the last `db3kd run` did, stage by stage

A zero-shot recipe (`transfer.synthesize`) starts with the synthesize stage; its pseudo samples are then
the transfer set of every soft-label stage and baseline, and the dataset's training split is never read.
With `transfer.mixtures`, a mixtures stage then labels mixtures of the pseudo samples (`db3kd.mixtures`, one
query each, in shards like the other stages); every distilled student and the `ce` baseline train on
them too (cross-entropy only, as they have no soft labels), and count their queries. `standard-kd` does not.

Every stage directory holds a `stage.json` with the hash of its resolved config and of its inputs (the
soft-label stage a student learns from; the synthesize stage a zero-shot stage reads; the mixtures stage,
whose hash holds the synthesize stage's). It says "running"
while the stage works and "done" once its results are complete. A rerun skips a stage whose stage.json is
"done" with the same hash, resumes one left "running" with the same hash (soft-label and synthesis shards
survive), and clears and recomputes any other, so editing a recipe recomputes exactly the stages whose
config or inputs changed.

The recipe's `executor` (local, or Ray) computes the shards of the synthesize, mixtures and soft-label stages. It is in
no stage's hash, since the results are equal bit for bit whichever executor made them: switching executor
recomputes nothing, and a stage left "running" on one executor resumes on the other. A Ray executor is made
(Ray imported, the teacher read for shipping, the head's address checked) before the first stage runs, and
only if a synthesize or soft-label stage has work to do; one serves every stage of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .jobs import write_json
from .recipe import Recipe, is_url, recipe_to_dict

STAGE_FILE = "stage.json"
SYNTHESIZE = "synthesize"  # the zero-shot synthesis stage's directory
MIXTURES = "mixtures"  # the zero-shot mixtures stage's directory (transfer.mixtures)
RESOLVED_RECIPE = "recipe.resolved.yaml"


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


def teacher_identity(spec: str) -> str:
    """What the stage hashes know of the teacher: a file's SHA-256 (a retrained teacher invalidates them) or the URL."""
    if is_url(spec):
        return spec
    digest = hashlib.sha256()
    with open(spec, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def plan_stages(recipe: Recipe, teacher_id: str = "") -> list[Stage]:
    """Every stage of `recipe` in run order, with hashes (synthesis, mixtures and soft labels first, then
    students, then baselines)."""
    stages: list[Stage] = []
    mixtures: list[str] = []  # what students that also train on the mixtures read besides their own inputs
    if recipe.transfer.zero_shot:
        data = {"teacher": teacher_id, "dataset": recipe.dataset.name, "split": "pseudo"}
        stages.append(Stage(SYNTHESIZE, "synthesize", {**data, "kind": "synthesize",
                                                       "params": recipe.transfer.synthesize}))
        transfer_inputs = [SYNTHESIZE]  # every stage that reads the transfer images depends on them
        if recipe.transfer.mixtures is not None:
            # Its own stage, hashed on the synthesize stage's: new mixture parameters never recompute the pseudo
            # samples, and new pseudo samples always recompute the mixtures.
            stages.append(Stage(MIXTURES, "mixtures", {**data, "kind": "mixtures", "params": recipe.transfer.mixtures},
                                [SYNTHESIZE]))
            mixtures = [MIXTURES]
    else:
        data = {"teacher": teacher_id, "dataset": recipe.dataset.name, "split": recipe.transfer.split,
                "transfer_subset": recipe.transfer.subset}
        transfer_inputs = []
    train = dataclasses.asdict(recipe.students.train)
    loss = dataclasses.asdict(recipe.students.loss)
    for name, spec in recipe.soft_labels.items():
        config = {**data, "kind": "soft_labels", "method": spec.method, "params": spec.params, "seed": spec.seed,
                  "shard_size": spec.shard_size, "subset": spec.subset}
        stages.append(Stage(f"soft_labels/{name}", "soft_labels", config, list(transfer_inputs)))
    students = recipe.students
    for name, spec in recipe.soft_labels.items():
        for checkpoint in [None, *spec.checkpoints()]:
            tag = name if checkpoint is None else f"{name}-q{checkpoint}"
            for arch in students.arch:
                for seed in students.seeds:
                    config = {**data, "kind": "distill", "soft_labels": name, "checkpoint": checkpoint, "arch": arch,
                              "seed": seed, "train": train, "loss": loss}
                    stages.append(Stage(f"students/{tag}-{arch}-seed{seed}", "distill", config,
                                        [f"soft_labels/{name}", *mixtures]))  # the soft labels first
    for baseline in recipe.baselines:
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
        self.recipe, self.run_dir, self.api_key, self.progress = recipe, run_dir, api_key, progress

    @cached_property
    def transfer_x(self) -> np.ndarray:
        """The transfer images: the pseudo samples (zero-shot), else the first transfer.subset of the split."""
        if self.recipe.transfer.zero_shot:
            return self.pseudo[0]
        from .data import load_split

        x, _ = load_split(self.recipe.dataset.name, self.recipe.transfer.split, self.recipe.dataset.data_dir)
        subset = self.recipe.transfer.subset
        if subset is not None and subset > len(x):
            raise ConfigError(f"transfer.subset: expected at most {len(x)} (the {self.recipe.transfer.split} "
                              f"split's size), got {subset}")
        return x[:subset]

    @cached_property
    def pseudo(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The synthesize stage's pseudo samples, their labels (the teacher's) and its manifest."""
        from .synthesis import load_pseudo_samples

        return load_pseudo_samples(self.run_dir / SYNTHESIZE)

    @cached_property
    def pseudo_digest(self) -> str:
        """SHA-256 of the pseudo samples and labels: soft-label shards made from other samples are refused."""
        x, y, _ = self.pseudo
        return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()

    def synthesis_queries(self) -> int:
        """Teacher queries that made the transfer images: the synthesis's (zero-shot), else none."""
        return int(self.pseudo[2]["total_queries"]) if self.recipe.transfer.zero_shot else 0

    @cached_property
    def mixtures(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The mixtures stage's images (rebuilt from the pseudo samples), labels and manifest."""
        from .mixtures import read_mixtures

        return read_mixtures(self.run_dir / MIXTURES, self.pseudo[0], source=f"{self.run_dir / SYNTHESIZE}'s",
                             remake="rerun")

    def transfer_description(self) -> dict:
        """What students record about their transfer set (the report's transfer column)."""
        if self.recipe.transfer.zero_shot:
            return {"transfer_set": "synthesized", "teacher_queries_synthesis": self.synthesis_queries()}
        return {"transfer_set": f"{self.recipe.transfer.split} split"}

    @cached_property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        from .data import load_split

        return load_split(self.recipe.dataset.name, "test", self.recipe.dataset.data_dir)

    @cached_property
    def info(self):
        from .data import dataset_info

        return dataset_info(self.recipe.dataset.name)

    @cached_property
    def oracle(self):
        from .cli.common import open_teacher

        return open_teacher(self.recipe.teacher, self.api_key)

    @cached_property
    def executor(self):
        """Where shards run: None (in this process) or one `RayExecutor`, reused by every stage."""
        spec = self.recipe.executor
        if spec.kind == "local":
            return None
        from .executors import RayExecutor, TeacherSource

        return RayExecutor(TeacherSource.from_spec(self.recipe.teacher, self.api_key), address=spec.address,
                           workers=spec.workers, max_retries=spec.max_retries)


def run_recipe(recipe: Recipe, run_dir: str | os.PathLike | None = None, api_key: str | None = None,
               progress: bool = True) -> list[StageRecord]:
    """Run every stage of `recipe` that is not already done with the same config; return what happened."""
    import yaml

    run_dir = Path(run_dir if run_dir is not None else recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = recipe_to_dict(dataclasses.replace(recipe, run_dir=str(run_dir)))
    _write_text(run_dir / RESOLVED_RECIPE, yaml.safe_dump(resolved, sort_keys=False))
    stages = plan_stages(recipe, teacher_identity(recipe.teacher))
    context = _Context(recipe, run_dir, api_key, progress)
    runners = {"synthesize": _synthesize_stage, "mixtures": _mixtures_stage, "soft_labels": _soft_label_stage,
               "distill": _distill_stage,
               "ce": _ce_stage, "standard-kd": _standard_kd_stage}
    if any(stage.kind in SHARDED and not _is_done(run_dir / stage.name, stage) for stage in stages):
        context.executor  # noqa: B018 - made now, so a missing Ray or a bad address fails before any query
    records = []
    for i, stage in enumerate(stages, 1):
        out = run_dir / stage.name
        status = _prepare(out, stage)
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
        print(f"[{i}/{len(stages)}] {stage.name}: {status}" + ("" if status == "skipped" else f" ({record.seconds:.1f} s)"),
              flush=True)
    write_json(run_dir / "run.json", {"recipe": recipe.name, "executor": dataclasses.asdict(recipe.executor),
                                      "stages": [dataclasses.asdict(r) for r in records]})
    return records


SHARDED = ("synthesize", "mixtures", "soft_labels")  # the stage kinds whose shards the executor computes


def _is_done(out: Path, stage: Stage) -> bool:
    state = read_stage(out)
    return state is not None and state.get("hash") == stage.hash and state.get("status") == "done"


def _prepare(out: Path, stage: Stage) -> str:
    """'skipped' if `out` is done with this hash; else make it ready: resumed if it was running this hash, else clean."""
    state = read_stage(out)
    if state is not None and state.get("hash") == stage.hash:
        if state.get("status") == "done":
            return "skipped"
        if state.get("status") == "running":
            return "resume"
    if out.exists():
        shutil.rmtree(out)  # another config's results: never mixed with this one's
    out.mkdir(parents=True)
    return "fresh"


def _write_stage(out: Path, stage: Stage, status: str, **summary) -> None:
    write_json(out / STAGE_FILE, {"stage": stage.name, "kind": stage.kind, "status": status, "hash": stage.hash,
                                  "inputs": stage.input_hashes, "config": stage.config, **summary,
                                  "finished" if status == "done" else "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the stages ---------------------------------------------------------------------------------------------
# Each returns a summary for stage.json: teacher queries for the transfer set and for evaluation, counted apart.

def _synthesize_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .synthesis import SynthesisConfig, synthesize

    config = SynthesisConfig(**stage.config["params"])
    with _torch_threads(1 if not ctx.recipe.teacher.lower().endswith((".pt", ".pth")) else None):
        manifest = synthesize(ctx.oracle, config, out, {"teacher": ctx.recipe.teacher}, progress=ctx.progress,
                              executor=ctx.executor)
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0},
            "pseudo_samples": manifest["num_samples"], "synthesis_seconds": manifest["seconds"]}


def _mixtures_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .mixtures import MixtureConfig, label_mixtures

    config = MixtureConfig(**stage.config["params"])
    run_info = {"teacher": ctx.recipe.teacher, "pseudo": SYNTHESIZE}
    with _torch_threads(1 if not ctx.recipe.teacher.lower().endswith((".pt", ".pth")) else None):
        manifest = label_mixtures(ctx.oracle, ctx.pseudo[0], config, out, run_info, progress=ctx.progress,
                                  executor=ctx.executor)
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0}, "mixtures": manifest["count"],
            "mixture_seconds": manifest["seconds"]}


def _with_mixtures(ctx: _Context, stage: Stage, images: np.ndarray, labels: np.ndarray, logits: np.ndarray | None,
                   extra: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The training data (images, labels, soft logits or None) plus the mixtures if `stage` reads them (hard
    labels only: NaN soft logits, see `with_hard_labels`); their queries are added to `extra`'s."""
    from .transfer import TransferSet, with_hard_labels

    if MIXTURES not in stage.inputs:
        return images, labels, logits
    mixed_x, mixed_y, manifest = ctx.mixtures
    queries = int(manifest["total_queries"])
    extra.update(teacher_queries_transfer=extra["teacher_queries_transfer"] + queries,
                 teacher_queries_mixtures=queries, mixture_samples=len(mixed_y))
    base = TransferSet(images, labels, np.empty((len(images), 0), np.float32) if logits is None else logits, {})
    joined = with_hard_labels(base, mixed_x, mixed_y)
    return joined.images, joined.labels, None if logits is None else joined.logits


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch limited to `threads` inside (None: unchanged). Synthesis uses torch only for its searches'
    small-batch bookkeeping while ONNX Runtime (or a service) answers: torch's idle OpenMP threads would
    spin against the teacher's on the same cores (as `db3kd synthesize` does)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _soft_label_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .soft_labels import SoftLabelConfig, compute_soft_labels

    name = stage.name.split("/", 1)[1]
    spec = ctx.recipe.soft_labels[name]
    x = ctx.transfer_x  # the transfer images are also the reference samples (candidate directions)
    if spec.subset is not None and spec.subset > len(x):
        raise ConfigError(f"soft_labels.{name}.subset: expected at most {len(x)} (the transfer set's size), got {spec.subset}")
    indices = np.arange(spec.subset or len(x))
    config = SoftLabelConfig(spec.method, dict(spec.params), spec.seed, spec.shard_size)
    run_info = {"teacher": ctx.recipe.teacher, "dataset": ctx.recipe.dataset.name, "split": ctx.recipe.transfer.split}
    if ctx.recipe.transfer.zero_shot:
        # Pseudo samples: their labels are the teacher's already (no labelling queries), and the images go
        # into soft_labels.npz, since no dataset holds them.
        run_info.update(split="pseudo", pseudo=SYNTHESIZE, pseudo_sha256=ctx.pseudo_digest)
        manifest = compute_soft_labels(ctx.oracle, x, indices, config, out, run_info, progress=ctx.progress,
                                       reference_y=ctx.pseudo[1], store_images=True, executor=ctx.executor)
    else:
        manifest = compute_soft_labels(ctx.oracle, x, indices, config, out, run_info, progress=ctx.progress,
                                       executor=ctx.executor)
    return {"teacher_queries": {"transfer": manifest["total_queries"], "eval": 0},
            "soft_label_seconds": manifest["seconds"]}


def _distill_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .losses import KDLoss
    from .robustness import distances_to_logits
    from .transfer import load_transfer_set

    source = ctx.run_dir / stage.inputs[0]
    transfer = load_transfer_set(source, ctx.recipe.dataset.data_dir)
    manifest, logits = transfer.manifest, transfer.logits
    queries, per_pair = manifest["total_queries"], manifest["queries_per_pair"]
    checkpoint = stage.config["checkpoint"]
    if checkpoint is not None:
        # The distances MBD had reached after `checkpoint` queries per pair, and what they had cost by then.
        with np.load(source / "soft_labels.npz", allow_pickle=False) as data:
            at = list(data["checkpoints"]).index(checkpoint)
            logits = distances_to_logits(data["distances_at"][at], transfer.labels).astype(np.float32)
            spent = np.minimum(data["queries"], checkpoint)  # (N, K)
            estimated = data["queries"] > 0
        queries = int(manifest["reference_label_queries"] + spent.sum())
        per_pair = float(spent[estimated].mean()) if estimated.any() else 0.0
    # Every query behind the student's training data: synthesis (zero-shot), labels, soft labels and mixtures.
    extra = {"stage": stage.name, "method": stage.label, "estimator": manifest["method"], "checkpoint": checkpoint,
             "soft_labels": stage.inputs[0], "teacher": ctx.recipe.teacher,
             "teacher_queries_transfer": ctx.synthesis_queries() + queries, "teacher_queries_soft_labels": queries,
             **ctx.transfer_description(), "transfer_samples": len(transfer.images), "queries_per_pair": per_pair,
             "soft_label_seconds": manifest["seconds"], "white_box": False}
    images, labels, logits = _with_mixtures(ctx, stage, transfer.images, transfer.labels, logits, extra)
    return _train_student(ctx, stage, out, (images, labels), extra, soft_logits=logits,
                          kd=KDLoss(**stage.config["loss"]))


def _ce_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    from .jobs import teacher_labels

    if ctx.recipe.transfer.zero_shot:
        labels, queries = ctx.pseudo[1], 0  # the teacher labelled every pseudo sample during synthesis
    else:
        labels, queries = teacher_labels(ctx.oracle, ctx.transfer_x)
    extra = {"stage": stage.name, "method": "ce", "teacher": ctx.recipe.teacher,
             "teacher_queries_transfer": ctx.synthesis_queries() + queries, "teacher_queries_labels": queries,
             **ctx.transfer_description(), "transfer_samples": len(labels), "queries_per_pair": None,
             "white_box": False}
    images, labels, _ = _with_mixtures(ctx, stage, ctx.transfer_x, labels, None, extra)
    return _train_student(ctx, stage, out, (images, labels), extra)


def _standard_kd_stage(ctx: _Context, stage: Stage, out: Path) -> dict:
    # The white-box reference: the only stage that reads logits, and the only importer of db3kd.whitebox here.
    from .losses import KDLoss
    from .whitebox import WhiteBoxTeacher, logits_in_batches

    x = ctx.transfer_x
    logits = logits_in_batches(WhiteBoxTeacher.from_file(ctx.recipe.teacher), x)
    labels = logits.argmax(axis=1).astype(np.int64)  # hard labels: the teacher's top-1, as for every student
    # Zero-shot, its transfer images are the pseudo samples: the label queries that made them are counted. It
    # never trains on the mixtures (transfer.mixtures), nor counts their queries.
    extra = {"stage": stage.name, "method": "standard-kd", "teacher": ctx.recipe.teacher,
             "teacher_queries_transfer": ctx.synthesis_queries(), "white_box_forward_passes": len(x),
             **ctx.transfer_description(), "transfer_samples": len(x), "queries_per_pair": None, "white_box": True}
    return _train_student(ctx, stage, out, (x, labels), extra, soft_logits=logits.astype(np.float32),
                          kd=KDLoss(**stage.config["loss"]))


def _train_student(ctx: _Context, stage: Stage, out: Path, train: tuple, extra: dict, soft_logits=None, kd=None) -> dict:
    from .jobs import train_to_dir
    from .training import TrainConfig

    config = TrainConfig(**stage.config["train"], seed=stage.config["seed"])
    metrics = train_to_dir(out, stage.config["arch"], ctx.info, train, ctx.test, config, oracle=ctx.oracle,
                           soft_logits=soft_logits, kd=kd, extra_metrics=extra, progress=ctx.progress)
    # Transfer queries this stage spent itself (the CE baseline's labels); a distilled student's were spent by
    # its soft-label stage, and are in its metrics.json as teacher_queries_transfer.
    spent = extra["teacher_queries_labels"] if stage.kind == "ce" else 0
    return {"teacher_queries": {"transfer": spent, "eval": metrics["teacher_queries_eval"]},
            "test_accuracy": metrics["test_accuracy"], "fidelity": metrics["fidelity"]}
