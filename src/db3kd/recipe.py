"""Recipes: a DB3KD experiment declared in one YAML file, read into typed dataclasses.

A recipe names the teacher, the transfer set, the soft-label methods and the students; `db3kd run`
(`db3kd.pipeline`) turns it into cached stages under a run directory. Every key is checked: an unknown
key or a bad value raises `ConfigError` naming its place, e.g.
`students.trian: unknown key; expected one of arch, seeds, train, loss`.

    name: mnist-db3kd                        # required; names the run
    run_dir: runs/mnist-db3kd                # default runs/<name>, relative to the working directory; --out overrides
    dataset: {name: mnist, data_dir: ../data}  # data_dir optional (default $DB3KD_DATA, else ~/.cache/db3kd/data)
    teacher: ../teachers/lenet5_mnist.onnx   # a model.pt, model.onnx or http(s):// URL; key from $DB3KD_API_KEY
    transfer: {split: train, subset: null}   # the transfer images: the first `subset` of the split (null: all)
    # or, zero-shot (ZSDB3KD): pseudo samples synthesized from noise, no real image at all
    # transfer: {synthesize: {per_class: 600, budget_per_sample: 2000, rounds: 8}}
    #   plus, optionally, teacher-labelled mixtures of the pseudo samples (one query each) for every student:
    # transfer: {synthesize: {...}, mixtures: {count: 400000, max_shift: 3, min_brightness: 0.3, seed: 0}}
    soft_labels:                             # one cached stage per entry; the entry's name names its students
      sd: {method: sd}
      bd: {method: bd, params: {max_queries: 40}}
      mbd: {method: mbd, params: {budget: 500, checkpoints: [250, 500]}, subset: 2000, checkpoint_students: true}
    students:
      arch: [lenet5-half, lenet5-fifth]
      seeds: [0, 1]
      train: {epochs: 10, batch_size: 512, lr: 0.001}   # also weight_decay, device
      loss: {temperature: 20, ce_weight: 1, kd_weight: 1, t2_scaling: false, reduction: sum}
    baselines: [ce, standard-kd]
    executor: {kind: local}                  # or {kind: ray, address: auto, workers: 8, max_retries: 3}

Soft-label entries: `method` (sd, bd, mbd), `params` (the estimator's keyword arguments, see
`db3kd.robustness`), `seed` (0), `shard_size` (500), `subset` (the first N transfer images, default all),
`checkpoint_students` (mbd only: also train students on the distances reached at each checkpoint below
the budget, for the accuracy-vs-queries curve).

Zero-shot: `transfer.synthesize` (instead of `split` and `subset`) holds the keyword arguments of
`db3kd.synthesis.SynthesisConfig`, passed through and checked by it (unknown keys are refused with their
place; missing ones take its defaults, filled into the resolved recipe). The run then starts with a
`synthesize` stage, and every soft-label stage and baseline works on its pseudo samples; the dataset's
training split is never read (only its test split, for accuracy and fidelity).

Mixtures (zero-shot only): `transfer.mixtures` holds the keyword arguments of `db3kd.mixtures.MixtureConfig`
(`count` required; `max_shift`, `min_brightness`, `seed`, `shard_size`), checked and completed the same way.
A `mixtures` stage then labels `count` random mixtures of the pseudo samples (one teacher query each), and
every zero-shot student but `standard-kd` also trains on them: cross-entropy on their labels (they have no
soft labels), their queries counted in the student's. `standard-kd` ignores them (its logits are white-box
reads on the pseudo samples alone).

Baselines: `ce` trains each student with cross-entropy on the teacher's top-1 labels of the transfer images
(queries counted; for pseudo samples, the labels the synthesis already asked, plus the mixtures if any);
`standard-kd` trains on the teacher's logits (white-box: needs a teacher file, read through `db3kd.whitebox`;
the upper reference, not a label-only method; zero-shot, on the pseudo samples only, never the mixtures).

Executor: where the shards of the synthesize, mixtures and soft-label stages are computed (`db3kd.executors`):
`kind` local (this process, the default) or ray (each shard a Ray task, one query budget for all), with, for
ray, `address` (auto, HOST:PORT of the head, local; null: Ray's default), `workers` (null: the cluster's CPUs)
and `max_retries` (3: further attempts at a shard whose worker died). The options of `db3kd run` (--executor,
--ray-address, --workers, --max-retries) override it. It is not part of any stage's hash: the results are
equal whichever executor made them, so switching executor recomputes nothing, and a stage left half done on
one resumes on the other.

Paths: `teacher` and `dataset.data_dir` are relative to the recipe file; `run_dir` (an output, like
`--out`) is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .losses import KDLoss

__all__ = ["BASELINES", "EXECUTORS", "DatasetSpec", "ExecutorSpec", "Recipe", "SoftLabelStageSpec", "StudentsSpec", "TrainSpec",
           "TransferSpec", "load_recipe", "mixture_params", "parse_recipe", "recipe_to_dict", "synthesis_params"]

BASELINES = ("ce", "standard-kd")
EXECUTORS = ("local", "ray")
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.]*$")  # a directory name; no '-', which separates name parts


class _FieldError(ConfigError):
    """A bad value found by a dataclass's own checks; the loader prefixes the field's place."""

    def __init__(self, name: str, message: str):
        self.name, self.message = name, message
        super().__init__(f"{name}: {message}")


def _expect(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise _FieldError(name, f"expected {expected}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DatasetSpec:
    """Which dataset the transfer and test images come from."""

    name: str
    data_dir: str | None = None  # None: $DB3KD_DATA, else ~/.cache/db3kd/data

    def __post_init__(self):
        from .data import DATASETS

        _expect(self.name in DATASETS, "name", f"one of {', '.join(DATASETS)}", self.name)


@dataclass
class TransferSpec:
    """The transfer images: the first `subset` images of `split` (all of it if None), or pseudo samples.

    `synthesize` (zero-shot) replaces `split` and `subset`: the keyword arguments of
    `db3kd.synthesis.SynthesisConfig`, completed with its defaults once checked. `mixtures` (zero-shot only):
    those of `db3kd.mixtures.MixtureConfig`, teacher-labelled mixtures of the pseudo samples.
    """

    split: str | None = None  # None: 'train', unless synthesize
    subset: int | None = None
    synthesize: dict | None = None
    mixtures: dict | None = None

    def __post_init__(self):
        if self.mixtures is not None:
            _expect(self.synthesize is not None, "mixtures",
                    "mixtures only together with synthesize (they are mixtures of its pseudo samples)", self.mixtures)
            self.mixtures = mixture_params(self.mixtures, "mixtures")
        if self.synthesize is not None:
            _expect(self.split is None, "split", "no split with synthesize (zero-shot reads no real image)", self.split)
            _expect(self.subset is None, "subset",
                    "no subset with synthesize (synthesize.per_class sets the size)", self.subset)
            self.synthesize = synthesis_params(self.synthesize, "synthesize")
            return
        if self.split is None:
            self.split = "train"
        _expect(self.split in ("train", "test"), "split", "'train' or 'test'", self.split)
        _expect(self.subset is None or self.subset > 0, "subset", "a positive integer or null", self.subset)

    @property
    def zero_shot(self) -> bool:
        return self.synthesize is not None


def synthesis_params(params: dict, where: str) -> dict:
    """`params` checked by `SynthesisConfig` itself and completed with its defaults, as plain YAML data.

    The field list is the dataclass's own, so fields the synthesis gains are accepted here unchanged.
    """
    from .synthesis import SynthesisConfig

    return _config_params(SynthesisConfig, params, where)


def mixture_params(params: dict, where: str) -> dict:
    """`params` checked by `db3kd.mixtures.MixtureConfig` itself and completed with its defaults (as above)."""
    from .mixtures import MixtureConfig

    return _config_params(MixtureConfig, params, where, strip="mixtures: ")


def _config_params(cls, params: dict, where: str, strip: str = "") -> dict:
    """`params` as keyword arguments of dataclass `cls`: unknown and missing keys refused with their place,
    values checked by `cls` itself (its message, less the prefix `strip`), defaults filled in, as YAML data."""
    import json

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            raise _FieldError(f"{where}.{key}", f"unknown key; expected one of {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in params
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _FieldError(f"{where}.{missing[0]}", f"missing; {cls.__name__} needs {', '.join(missing)}")
    try:
        config = cls(**params)
    except ConfigError as e:
        raise _FieldError(where, str(e).removeprefix(strip)) from None
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists: safe for yaml.safe_dump


@dataclass
class SoftLabelStageSpec:
    """One soft-label stage: a robustness estimator run over (the first `subset` of) the transfer images."""

    method: str
    params: dict = field(default_factory=dict)  # the estimator's keyword arguments
    seed: int = 0
    shard_size: int = 500  # samples per resumable shard
    subset: int | None = None  # None: the whole transfer set
    checkpoint_students: bool = False  # mbd: also distil from the distances at each checkpoint < budget

    def __post_init__(self):
        from .robustness import ESTIMATORS
        from .soft_labels import SoftLabelConfig

        _expect(self.method in ESTIMATORS, "method", f"one of {', '.join(ESTIMATORS)}", self.method)
        _expect(self.shard_size > 0, "shard_size", "a positive integer", self.shard_size)
        _expect(self.subset is None or self.subset > 0, "subset", "a positive integer or null", self.subset)
        _expect(not self.checkpoint_students or self.method == "mbd", "checkpoint_students",
                "false unless method is mbd (only mbd records checkpoints)", self.checkpoint_students)
        try:  # the estimator checks its own parameters (names and values)
            SoftLabelConfig(self.method, dict(self.params), self.seed, self.shard_size)
        except ConfigError as e:
            raise _FieldError("params", str(e)) from None

    def checkpoints(self) -> list[int]:
        """Queries per pair at which students are also trained (checkpoints below the budget), if asked."""
        if not self.checkpoint_students:
            return []
        from .robustness import estimator_from_name

        estimator = estimator_from_name(self.method, **self.params)
        return [int(c) for c in estimator.checkpoints if c < estimator.budget]  # the budget itself: the stage's own students


@dataclass
class TrainSpec:
    """Student training hyper-parameters (`db3kd.training.TrainConfig` without the seed, which `seeds` gives)."""

    epochs: int = 10
    batch_size: int = 512  # the DB3KD reference code's batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    device: str | None = None  # None: CUDA when present

    def __post_init__(self):
        _expect(self.epochs > 0, "epochs", "a positive integer", self.epochs)
        _expect(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _expect(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number", self.lr)
        _expect(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)


@dataclass
class StudentsSpec:
    """Every student architecture is trained once per seed on every soft-label stage and baseline."""

    arch: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainSpec = field(default_factory=TrainSpec)
    loss: KDLoss = field(default_factory=KDLoss)  # validated by KDLoss itself

    def __post_init__(self):
        from .models import available_models

        _expect(len(self.arch) > 0, "arch", "a non-empty list of model names", self.arch)
        for name in self.arch:
            _expect(name in available_models(), "arch", f"models from {', '.join(available_models())}", name)
        _expect(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
                "a non-empty list of distinct integers", self.seeds)
        _expect(len(set(self.arch)) == len(self.arch), "arch", "distinct model names", self.arch)


@dataclass
class ExecutorSpec:
    """Where the shards of the synthesize, mixtures and soft-label stages run (`db3kd.executors`); never hashed."""

    kind: str = "local"  # local | ray
    address: str | None = None  # ray: auto, HOST:PORT, local; None: Ray's default
    workers: int | None = None  # ray: shards at once; None: the cluster's CPUs
    max_retries: int = 3  # ray: further attempts at a shard whose worker died

    def __post_init__(self):
        _expect(self.kind in EXECUTORS, "kind", f"one of {', '.join(EXECUTORS)}", self.kind)
        _expect(self.workers is None or self.workers > 0, "workers", "a positive integer or null", self.workers)
        _expect(self.max_retries >= 0, "max_retries", "an integer >= 0", self.max_retries)
        if self.kind == "local":
            for name in ("address", "workers"):
                _expect(getattr(self, name) is None, name, "null unless kind is ray", getattr(self, name))


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
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)  # where shards run; not in any stage's hash

    def __post_init__(self):
        _expect(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)), "name",
                "a name of letters, digits, '_', '.', '-'", self.name)
        for stage in self.soft_labels:
            _expect(bool(_STAGE_NAME.fullmatch(stage)), f"soft_labels.{stage}",
                    "a stage name of lower-case letters, digits, '_' and '.' (it names directories)", stage)
        for name in self.baselines:
            _expect(name in BASELINES, "baselines", f"names from {', '.join(BASELINES)}", name)
        _expect(len(set(self.baselines)) == len(self.baselines), "baselines", "distinct names", self.baselines)
        _expect(bool(self.soft_labels or self.baselines), "soft_labels",
                "at least one soft-label stage or baseline", self.soft_labels)
        if self.transfer.zero_shot:
            self._check_synthesis()
        for stage, spec in self.soft_labels.items():
            size, name = self.transfer_size()
            _expect(spec.subset is None or size is None or spec.subset <= size,
                    f"soft_labels.{stage}.subset", f"at most {name} = {size}", spec.subset)
        if "standard-kd" in self.baselines:
            _expect(not is_url(self.teacher), "baselines",
                    "no standard-kd with a teacher behind a URL (it reads logits: needs a model file)", self.baselines)
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"

    def transfer_size(self) -> tuple[int | None, str]:
        """The number of transfer images if the recipe fixes it (None: the whole split), and what sets it."""
        if self.transfer.zero_shot:
            from .data import dataset_info

            per_class = self.transfer.synthesize["per_class"]
            classes = dataset_info(self.dataset.name).num_classes
            return per_class * classes, f"transfer.synthesize.per_class x {classes} classes"
        return self.transfer.subset, "transfer.subset"

    def _check_synthesis(self) -> None:
        """The synthesis checks that need the number of classes (the dataset's: the teacher's is not opened)."""
        from .data import dataset_info
        from .synthesis import SynthesisConfig

        try:
            SynthesisConfig(**self.transfer.synthesize).check(dataset_info(self.dataset.name).num_classes)
        except ConfigError as e:
            raise _FieldError("transfer.synthesize", str(e)) from None


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


# --- loading -----------------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, check_files: bool = True) -> Recipe:
    """Read and check the recipe at `path`; relative input paths are resolved against its directory."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return parse_recipe(raw, base_dir=path.resolve().parent, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_recipe(raw, base_dir: str | os.PathLike = ".", check_files: bool = True) -> Recipe:
    """A `Recipe` from a parsed YAML mapping; `base_dir` anchors relative input paths."""
    recipe = _build(Recipe, raw, "recipe")
    base = Path(base_dir)
    if not is_url(recipe.teacher):
        teacher = (base / recipe.teacher).resolve()
        if check_files and not teacher.is_file():
            raise ConfigError(f"teacher: file not found: {teacher} (relative paths are relative to the recipe file)")
        recipe.teacher = str(teacher)
    if recipe.dataset.data_dir is not None:
        recipe.dataset.data_dir = str((base / recipe.dataset.data_dir).resolve())
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain data for `recipe.resolved.yaml` (every default filled in, paths resolved)."""
    return dataclasses.asdict(recipe)


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
    except ConfigError as e:  # a library object validating itself (KDLoss)
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
    elif hint is int:
        ok = _is_int(value)
    elif hint is float:
        ok = (_is_int(value) or isinstance(value, float))
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a type this loader does not know is a bug in the dataclasses above
        raise TypeError(f"unsupported annotation {hint!r} at {where}")
    if not ok:
        raise ConfigError(f"{where}: expected {'a number' if hint is float else hint.__name__}, got {value!r}")
    return value
