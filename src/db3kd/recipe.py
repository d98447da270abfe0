"""Recipes: a DB3KD experiment declared in one YAML file, read into typed dataclasses.

A recipe names the teacher, the transfer set, the soft-label methods and the students; `db3kd run`
(`db3kd.pipeline`) turns it into cached stages under a run directory. The README ("Recipes") shows a whole
one. Its fields are the library's own configuration types, each checked by itself, and every key is
checked: an unknown key or a bad value raises `ConfigError` naming its place, e.g.
`students.trian: unknown key; expected one of arch, seeds, train, loss`.

- `dataset`: `DatasetSpec` (name, data_dir); `teacher`: a model.pt, model.onnx or http(s):// URL.
- `transfer`: the first `subset` images of `split`, or zero-shot `synthesize` (a `SynthesisConfig`); and
  optionally `mixtures` (a `MixtureConfig`) of those images, which every student but `standard-kd` and
  `student-alone` also trains on (hard labels only, their queries counted). Zero-shot reads no training image.
- `soft_labels`: name -> `SoftLabelStageSpec` (a `SoftLabelConfig`: method, estimator params, seed,
  shard_size; plus `subset` and, for mbd, `checkpoint_students`: also train students on the distances
  reached at each checkpoint below its queries_per_pair, for the accuracy-vs-queries curve).
- `students`: arch list, seeds, `train` (a `TrainConfig` without seed), `loss` (a `KDLoss`).
- `baselines`: `teacher` (the teacher's own test accuracy, its queries counted as evaluation), `student-alone`
  (cross-entropy on the dataset's true labels: no teacher at all), `ce` (cross-entropy on the teacher's top-1
  labels, queries counted) and `standard-kd` (the
  teacher's logits, WHITE-BOX: needs a model file; the upper reference, not a label-only method).
- `budget`: a `db3kd.budget.BudgetSpec`, a total of teacher queries behind each student's training data; its
  plan sets `transfer.subset`, `transfer.mixtures` and a `budget` BD stage (`db3kd.budget`).
- `executor`: where the shards of synthesize, mixtures and soft-label stages run, `local` or `ray` (with
  address, workers, max_retries); `db3kd run`'s options override it. It is in no stage's hash: results are
  equal whichever executor made them.

Paths: `teacher` and `dataset.data_dir` are relative to the recipe file; `run_dir` (an output, like
`--out`) is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .budget import BudgetPlan, BudgetSpec, plan_budget
from .errors import ConfigError
from .executors import ExecutorConfig
from .jobs.mixtures import MixtureConfig
from .jobs.soft_labels import SoftLabelConfig
from .jobs.synthesis import SynthesisConfig
from .losses import KDLoss
from .teachers import TeacherSpec
from .training import TrainConfig

__all__ = ["BASELINES", "DatasetSpec", "Recipe", "SoftLabelStageSpec", "StudentsSpec",
           "TransferSpec", "load_recipe", "parse_recipe"]

BASELINES = ("teacher", "student-alone", "ce", "standard-kd")
BUDGET_STAGE = "budget"  # the soft-label stage a budget plans
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.]*$")  # a directory name; no '-', which separates name parts


class _FieldError(ConfigError):
    """A bad value found by a dataclass's own checks; the loader prefixes the field's place."""

    def __init__(self, name: str, message: str):
        self.name, self.message = name, message
        super().__init__(f"{name}: {message}")


def _expect(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise _FieldError(name, f"expected {expected}, got {value!r}")


@dataclass
class DatasetSpec:
    """Which images the transfer and test sets come from: a dataset of `db3kd.data.DATASETS` (its splits), or
    your own (`name` a path, relative to the recipe file: a folder or an .npy/.npz, converted to the teacher's
    input by `resize`; `test` the images for accuracy if labelled, else for fidelity only)."""

    name: str
    data_dir: str | None = None  # None: $DB3KD_DATA, else ~/.cache/db3kd/data
    test: str | None = None
    resize: str = "crop"
    skip_bad_images: bool = False

    def __post_init__(self):
        _expect(self.resize in ("crop", "pad"), "resize", "crop or pad", self.resize)
        _expect(self.own or self.test is None, "test", "null with a named dataset (its test split is the test set)",
                self.test)

    @property
    def own(self) -> bool:
        """The user's images (a path), not a named dataset."""
        from .data import DATASETS

        return self.name not in DATASETS


@dataclass
class TransferSpec:
    """The transfer images: the first `subset` images of `split` (all of it if None), or pseudo samples.

    `synthesize` (zero-shot) replaces `split` and `subset`: a `db3kd.jobs.synthesis.SynthesisConfig`.
    `mixtures`: a `db3kd.jobs.mixtures.MixtureConfig`, teacher-labelled mixtures of the transfer images (the
    pseudo samples, or the real images), one query each.
    """

    split: str | None = None  # None: 'train', unless synthesize
    subset: int | None = None
    synthesize: SynthesisConfig | None = None
    mixtures: MixtureConfig | None = None

    def __post_init__(self):
        if self.synthesize is not None:
            _expect(self.split is None, "split", "no split with synthesize (zero-shot reads no real image)", self.split)
            _expect(self.subset is None, "subset",
                    "no subset with synthesize (synthesize.per_class sets the size)", self.subset)
            return
        if self.split is None:
            self.split = "train"
        _expect(self.split in ("train", "test"), "split", "'train' or 'test'", self.split)
        _expect(self.subset is None or self.subset > 0, "subset", "a positive integer or null", self.subset)

    @property
    def zero_shot(self) -> bool:
        return self.synthesize is not None


@dataclass
class SoftLabelStageSpec(SoftLabelConfig):
    """One soft-label stage: a `SoftLabelConfig` run over (the first `subset` of) the transfer images."""

    subset: int | None = None  # None: the whole transfer set
    checkpoint_students: bool = False  # mbd: also distil from the distances at each checkpoint < queries_per_pair
    # Students also train on the transfer images outside `subset`, with the teacher's labels that labelling the
    # references already paid for (no further query): soft labels where bought, hard labels elsewhere.
    hard_labels_for_rest: bool = False
    # Which `subset` images get soft labels ("first", or "uncertain": those a selector student of the hard labels
    # separates least surely), and toward how many classes each (the selector's most plausible; the others get
    # their sample distance, free). See `db3kd.jobs.selection`.
    select: str = "first"
    classes_per_image: int | None = None
    guide: bool = False  # BD / MBD search the selector's adversarial direction toward each class first

    def __post_init__(self):
        super().__post_init__()  # the estimator checks its own parameters (names and values)
        from .jobs.selection import SELECTIONS

        _expect(self.select in SELECTIONS, "select", " or ".join(SELECTIONS), self.select)
        _expect(self.select == "first" or self.subset is not None, "select",
                "first unless subset is given (without one, every image is chosen)", self.select)
        _expect(self.classes_per_image is None or (isinstance(self.classes_per_image, int)
                                                   and self.classes_per_image > 0),
                "classes_per_image", "a positive integer or null", self.classes_per_image)
        _expect(isinstance(self.guide, bool) and (not self.guide or self.method != "sd"), "guide",
                "false with sd (it searches nothing), else true or false", self.guide)
        _expect(self.subset is None or self.subset > 0, "subset", "a positive integer or null", self.subset)
        _expect(not self.checkpoint_students or self.method == "mbd", "checkpoint_students",
                "false unless method is mbd (only mbd records checkpoints)", self.checkpoint_students)
        _expect(not self.hard_labels_for_rest or self.subset is not None, "hard_labels_for_rest",
                "false unless subset is given (without one, there is no rest)", self.hard_labels_for_rest)

    @property
    def uses_selector(self) -> bool:
        """Whether a selector student chooses the pairs or guides the search (`db3kd.jobs.selection`)."""
        return self.select != "first" or self.classes_per_image is not None or self.guide

    def checkpoints(self) -> list[int]:
        """Queries per pair at which students are also trained (checkpoints below the stage's own), if asked."""
        if not self.checkpoint_students:
            return []
        return [int(c) for c in self.estimator.checkpoints if c < self.estimator.queries_per_pair]


@dataclass
class StudentsSpec:
    """Every student architecture is trained once per seed on every soft-label stage and baseline."""

    arch: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)  # the auto profile; `profile: paper` for the paper's
    loss: KDLoss = field(default_factory=KDLoss)  # validated by KDLoss itself

    def __post_init__(self):
        from .models import available_models

        _expect(len(self.arch) > 0, "arch", "a non-empty list of model names", self.arch)
        for name in self.arch:
            _expect(name in available_models(), "arch", f"models from {', '.join(available_models())}", name)
        _expect(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
                "a non-empty list of distinct integers", self.seeds)
        _expect(len(set(self.arch)) == len(self.arch), "arch", "distinct model names", self.arch)
        _expect(self.train.seed == 0, "train.seed", "no seed here: students.seeds gives each student's", self.train.seed)


@dataclass
class Recipe:
    """A whole experiment. Paths are resolved: `teacher` and `dataset.data_dir` absolute (URLs kept)."""

    name: str
    dataset: DatasetSpec
    teacher: str
    students: StudentsSpec
    soft_labels: dict[str, SoftLabelStageSpec] = field(default_factory=dict)
    transfer: TransferSpec = field(default_factory=TransferSpec)
    baselines: list[str] = field(default_factory=list)
    run_dir: str | None = None  # None: runs/<name>
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where shards run; in no stage's hash
    budget: BudgetSpec | None = None  # a total query budget: the plan fills transfer.mixtures and soft_labels

    def __post_init__(self):
        _expect(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)), "name",
                "a name of letters, digits, '_', '.', '-'", self.name)
        self.budget_plan = None if self.budget is None else self._apply_budget()
        for stage in self.soft_labels:
            _expect(bool(_STAGE_NAME.fullmatch(stage)), f"soft_labels.{stage}",
                    "a stage name of lower-case letters, digits, '_' and '.' (it names directories)", stage)
        for name in self.baselines:
            _expect(name in BASELINES, "baselines", f"names from {', '.join(BASELINES)}", name)
        _expect(len(set(self.baselines)) == len(self.baselines), "baselines", "distinct names", self.baselines)
        _expect(bool(self.soft_labels or self.baselines), "soft_labels",
                "at least one soft-label stage or baseline", self.soft_labels)
        if self.transfer.zero_shot and not self.dataset.own:  # a path's classes are the teacher's: known later
            self._check_synthesis()
        for stage, spec in self.soft_labels.items():
            size, name = self.transfer_size()
            _expect(spec.subset is None or size is None or spec.subset <= size,
                    f"soft_labels.{stage}.subset", f"at most {name} = {size}", spec.subset)
        for stage, spec in self.soft_labels.items():
            if spec.classes_per_image is not None and not self.dataset.own:  # a path's classes: known later
                from .data import dataset_info

                others = dataset_info(self.dataset.name).num_classes - 1
                _expect(spec.classes_per_image <= others, f"soft_labels.{stage}.classes_per_image",
                        f"at most {others} (the other classes)", spec.classes_per_image)
            _expect(not (spec.hard_labels_for_rest and self.transfer.zero_shot), f"soft_labels.{stage}.hard_labels_for_rest",
                    "false with zero-shot transfer (the pseudo samples outside the subset are not kept)", True)
        _expect("student-alone" not in self.baselines or not self.transfer.zero_shot, "baselines",
                "no student-alone with zero-shot transfer (it trains on the real images' true labels)", self.baselines)
        if "standard-kd" in self.baselines:
            _expect(TeacherSpec.parse(self.teacher).is_file, "baselines",
                    "no standard-kd with a teacher behind a URL (it reads logits: needs a model file)", self.baselines)
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"

    def _apply_budget(self) -> BudgetPlan:
        """Plan the budget over the real images available (`transfer.subset`, else the whole split) and write the
        plan into the recipe: `transfer.subset`, `transfer.mixtures` and a `budget` BD stage (or the `ce`
        baseline when no soft label fits). A recipe that already holds this plan (a resolved one) is left as is."""
        from .data import dataset_info, split_size
        from .jobs.mixtures import MixtureConfig

        _expect(not self.transfer.zero_shot, "budget", "a budget over real images (not with synthesize)", "synthesize")
        _expect(not self.dataset.own or self.transfer.subset is not None, "budget",
                "transfer.subset beside it with your images: the number of images the budget may label", None)
        available = self.transfer.subset or split_size(self.dataset.name, self.transfer.split)
        classes = dataset_info(self.dataset.name).num_classes if not self.dataset.own else None
        _expect(classes is not None, "budget", "a named dataset (your images' classes are known only from the "
                "teacher)", self.dataset.name)
        plan = plan_budget(self.budget, available, classes)
        soft = {} if not plan.soft_labelled else {BUDGET_STAGE: SoftLabelStageSpec(
            method="bd", params={"queries_per_pair": plan.queries_per_pair}, subset=plan.soft_labelled,
            hard_labels_for_rest=plan.soft_labelled < plan.labelled, select=plan.select,
            classes_per_image=plan.classes_per_image, guide=plan.guide)}
        options = self.budget.mixture_options
        rounds = min(options.get("rounds", 1), plan.mixtures)  # fewer mixtures than rounds: one per round
        mixtures = MixtureConfig(count=plan.mixtures, **{**options, "rounds": rounds}) if plan.mixtures else None
        if self.soft_labels or self.transfer.mixtures is not None:  # a resolved recipe: the same plan, or an edit
            _expect(self.soft_labels == soft and self.transfer.mixtures == mixtures
                    and self.transfer.subset == plan.labelled, "budget",
                    "no soft_labels or transfer.mixtures beside it (the budget plans them; every other purchase "
                    "would spend beyond it)", plan.to_dict())
        # Students on the plan's purchases: the budget's BD stage, or with no soft label the CE baseline (which
        # labels the images itself: beside a BD stage, whose reference labelling buys them, it would pay twice).
        _expect("ce" not in self.baselines or not soft, "baselines", "no ce beside a budget that buys soft labels "
                "(it would label the images a second time, beyond the budget); compare with a recipe of its own",
                self.baselines)
        self.transfer.subset, self.transfer.mixtures, self.soft_labels = plan.labelled, mixtures, soft
        if not soft and "ce" not in self.baselines:
            self.baselines = ["ce", *self.baselines]
        return plan

    def transfer_size(self) -> tuple[int | None, str]:
        """The number of transfer images if the recipe fixes it (None: the whole split), and what sets it."""
        if self.transfer.zero_shot and not self.dataset.own:
            from .data import dataset_info

            per_class = self.transfer.synthesize.per_class
            classes = dataset_info(self.dataset.name).num_classes
            return per_class * classes, f"transfer.synthesize.per_class x {classes} classes"
        return (None, "the teacher's classes") if self.transfer.zero_shot else (self.transfer.subset, "transfer.subset")

    def _check_synthesis(self) -> None:
        """The synthesis checks that need the number of classes (the dataset's: the teacher's is not opened)."""
        from .data import dataset_info

        try:
            self.transfer.synthesize.check(dataset_info(self.dataset.name).num_classes)
        except ConfigError as e:  # "<field> must be ...": the field's place
            name, _, rest = str(e).partition(" ")
            raise _FieldError(f"transfer.synthesize.{name}", rest) from None


# --- loading -----------------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, check_files: bool = True, budget: int | None = None) -> Recipe:
    """Read and check the recipe at `path`; relative input paths are resolved against its directory. `budget`
    sets (or replaces) its `budget.queries`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    class UniqueKeys(yaml.SafeLoader):
        """YAML whose mappings refuse a key said twice (plain YAML keeps the last value, silently)."""

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if twice is not None:
                raise ConfigError(f"line {node.start_mark.line + 1}: key {twice!r} appears twice in one mapping; "
                                  "say it once")
            return super().construct_mapping(node, deep)

    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeys)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if budget is not None and isinstance(raw, dict):
        raw["budget"] = {**(raw.get("budget") or {}), "queries": budget}
    try:
        return parse_recipe(raw, base_dir=path.resolve().parent, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_recipe(raw, base_dir: str | os.PathLike = ".", check_files: bool = True) -> Recipe:
    """A `Recipe` from a parsed YAML mapping; `base_dir` anchors relative input paths."""
    recipe = _build(Recipe, raw, "recipe")
    base = Path(base_dir)
    if TeacherSpec.parse(recipe.teacher).is_file:
        teacher = (base / recipe.teacher).resolve()
        if check_files and not teacher.is_file():
            raise ConfigError(f"teacher: file not found: {teacher} (relative paths are relative to the recipe file)")
        recipe.teacher = str(teacher)
    if recipe.dataset.data_dir is not None:
        recipe.dataset.data_dir = str((base / recipe.dataset.data_dir).resolve())
    if recipe.dataset.own:  # the user's images: a path, and one for the test set
        from .data import DATASETS

        d = recipe.dataset
        if check_files and not (base / d.name).exists():
            raise ConfigError(f"dataset.name: expected one of {', '.join(DATASETS)} or the path of your images "
                              f"(relative to the recipe file), got {d.name!r}: not found")
        if d.test is None:
            raise ConfigError("dataset.test: expected the path of your test images (a folder or arrays: labelled for "
                              "accuracy, else fidelity only) beside a path dataset")
        if check_files and not (base / d.test).exists():
            raise ConfigError(f"dataset.test: your test images not found: {(base / d.test).resolve()} (relative "
                              "paths are relative to the recipe file)")
        d.name, d.test = str((base / d.name).resolve()), str((base / d.test).resolve())
    return recipe


def _build(cls, raw, where: str):
    """Instantiate dataclass `cls` from mapping `raw`, checking keys and value types; `where` names the place."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = "" if where == "recipe" else f"{where}."
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing; {cls.__name__} needs {', '.join(missing)}")
    values = {key: _convert(value, hints[key], f"{prefix}{key}") for key, value in raw.items()}
    try:
        return cls(**values)
    except _FieldError as e:
        raise ConfigError(f"{prefix}{e.name}: {e.message}") from None
    except ConfigError as e:  # a library config validating itself: "<field> must be ..." names its place
        name, _, rest = str(e).partition(" ")
        name = name.rstrip(":")
        if name in fields:
            raise ConfigError(f"{prefix}{name}: {rest}") from None
        raise ConfigError(f"{where}: {e}") from None


def _convert(value, hint, where: str):
    """`value` checked against the type annotation `hint` (dataclasses, lists, dicts, Optional, scalars)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with string keys, got {value!r}")
        if not args:
            return dict(value)  # free-form (estimator parameters: the estimator checks them)
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint in (int, float):  # bools are not numbers here; an int is a valid float
        ok = isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
        value = float(value) if ok and hint is float else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a type this loader does not know is a bug in the dataclasses above
        raise TypeError(f"unsupported annotation {hint!r} at {where}")
    if not ok:
        raise ConfigError(f"{where}: expected {'a number' if hint is float else hint.__name__}, got {value!r}")
    return value
