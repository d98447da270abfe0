"""Transfer sets: the images a student learns from, their labels and soft labels, and what they cost.

The cost travels with the data (`TransferCost`, summed in one place: `total`); students write it to their
metrics.json and the report reads it back, so every path shows the same total for the same student.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .data import DATASETS, dataset_info, load_split
from .data.images import ImageTransform, load_images
from .data.rows import LazyRows, RowStack
from .errors import DataError
from .io import load_json, load_npz
from .oracle import LabelOracle
from .robustness import distances_to_logits


@dataclass(frozen=True)
class TransferCost:
    """Teacher queries behind a student's training data, by what bought them.

    Attributes:
        synthesis: making the pseudo samples (zero-shot), rejection sampling and rounds.
        labels: top-1 labels of the transfer images (a soft-label run's reference labels included).
        soft_labels: the boundary searches behind the soft labels.
        mixtures: teacher-labelled mixtures, one query each.
        evaluation: the student's fidelity on the test split; reported, not part of `total`.
    """

    synthesis: int = 0
    labels: int = 0
    soft_labels: int = 0
    mixtures: int = 0
    evaluation: int = 0

    @property
    def total(self) -> int:
        """Every query behind the training data: the headline number of a student."""
        return self.synthesis + self.labels + self.soft_labels + self.mixtures

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict) -> TransferCost:
        return cls(**{f.name: int(data.get(f.name, 0)) for f in fields(cls)})


@dataclass(frozen=True, eq=False)
class TransferSet:
    """Images (N, C, H, W), their class (N,), soft-label logits (N, K) (NaN rows: a hard label only; None: no
    soft labels at all), and what they cost.

    The last `mixtures` rows are teacher-labelled mixtures (hard labels only); `source` says where the other
    rows came from ("train split", "synthesized"), `queries_per_pair` what the soft labels cost per (sample,
    class) pair, `manifest` the soft-label manifest they came from.
    """

    images: np.ndarray | LazyRows = field(repr=False)  # LazyRows: mixtures, built a batch at a time
    labels: np.ndarray = field(repr=False)
    logits: np.ndarray | None = field(repr=False)
    cost: TransferCost
    source: str
    mixtures: int = 0
    hard_labelled: int = 0  # rows with the teacher's label only, beside the soft-labelled ones (not mixtures)
    queries_per_pair: float | None = None
    white_box: bool = False
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def samples(self) -> int:
        """Rows that are not mixtures (real images or pseudo samples)."""
        return len(self.images) - self.mixtures

    def with_mixtures(self, images: np.ndarray | LazyRows, labels: np.ndarray, queries: int) -> TransferSet:
        """This set plus teacher-labelled mixtures, which have a hard label but no soft label (NaN logits, so
        the distillation loss gives them its cross-entropy term only; see `db3kd.losses.KDLoss`)."""
        extended = self._with_hard_labels(images, labels)
        return replace(extended, mixtures=self.mixtures + len(images),
                       cost=replace(self.cost, mixtures=self.cost.mixtures + int(queries)))

    def _with_hard_labels(self, images: np.ndarray | LazyRows, labels: np.ndarray) -> TransferSet:
        """This set plus rows with a hard label only (NaN soft logits); the caller says what they are. Images built
        when indexed (mixtures) are stacked, not copied."""
        if images.shape[1:] != self.images.shape[1:] or len(images) != len(labels):
            raise DataError(f"expected images shaped {self.images.shape[1:]} with one label each, got {images.shape} "
                            f"and {len(labels)} labels")
        logits = self.logits
        if logits is not None:
            logits = np.concatenate([logits, np.full((len(images), logits.shape[1]), np.nan, dtype=np.float32)])
        # Other array-likes (an ImageStore of a folder) are read once, not a batch at a time from disk.
        parts = [p if isinstance(p, LazyRows) else np.asarray(p) for p in (self.images, images)]
        stacked = RowStack(parts) if any(isinstance(p, LazyRows) for p in parts) else np.concatenate(parts)
        return replace(self, images=stacked, labels=np.concatenate([self.labels, labels.astype(np.int64)]),
                       logits=logits)

    def description(self) -> dict:
        """What a student's metrics.json records about its transfer set (the report's transfer column)."""
        return {"transfer_set": self.source, "transfer_samples": self.samples, "mixture_samples": self.mixtures,
                "hard_labelled_samples": self.hard_labelled, "queries_per_pair": self.queries_per_pair,
                "white_box": self.white_box}


def dataset_images(dataset: str, split: str, oracle: LabelOracle, data_dir: str | os.PathLike | None = None,
                   resize: str = "crop", skip_bad: bool = False, progress: bool = True) -> tuple:
    """(x, y or None, what a manifest records of them): the `split` of a dataset named in `DATASETS`, or the images
    at a path (a folder or arrays, `db3kd.data.images`) converted to the teacher's contract. A teacher of other
    images or classes is refused before any query."""
    if dataset in DATASETS:
        info = dataset_info(dataset)
        oracle.check_fits(info.input_shape, info.num_classes, f"the {dataset} dataset")
        x, y = load_split(dataset, split, data_dir)
        return x, y, {"dataset": dataset, "split": split}
    images = load_images(dataset, ImageTransform(tuple(oracle.input_shape), tuple(oracle.bounds), resize),
                         skip_bad=skip_bad, progress=progress)
    if images.classes is not None and len(images.classes) != oracle.num_classes:
        raise DataError(f"{dataset} has {len(images.classes)} class folders ({', '.join(images.classes[:5])}...) but "
                        f"teacher {oracle.name} answers {oracle.num_classes} classes: expected one folder per class")
    return images.x, images.y, {"dataset": str(Path(dataset).resolve()), "split": "images", "images": images.source}


def images_of(manifest: dict, data_dir: str | os.PathLike | None = None):
    """The images a manifest's `dataset_images` came from, again (a folder through its cache)."""
    source = manifest.get("images")
    if source is None:
        return load_split(manifest["dataset"], manifest.get("split", "train"), data_dir)[0]
    t = source["transform"]
    images = load_images(source["path"], ImageTransform(tuple(t["input_shape"]), tuple(t["bounds"]), t["resize"]),
                         skip_bad=source.get("skip_bad", bool(source["skipped"])), progress=False)
    if images.source["images"] != source["images"] or images.source.get("cache") != source.get("cache"):
        raise DataError(f"{source['path']} has changed since its results were made ({source['images']:,} images "
                        f"then, {images.source['images']:,} now, or files edited): they belong to images that are no "
                        "longer all there; restore the folder, or redo the soft labels into a new --out")
    return images.x


def load_transfer_set(directory: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                      checkpoint: int | None = None, hard_labels_for_rest: bool = False) -> TransferSet:
    """The output of `db3kd soft-labels` (soft_labels.npz + manifest.json) in `directory`, as a transfer set.

    Images come from the npz itself when it holds them (pseudo samples), else from the dataset split the
    manifest names, at the stored indices. With `checkpoint` (mbd), the soft labels are those of the distances
    reached after that many queries per pair, and the cost what they had cost by then. With
    `hard_labels_for_rest`, the split's other images join the set with the teacher's labels that the run's
    reference labelling already paid for (a hard label only: NaN logits, the loss's cross-entropy term): the
    whole split, or the first images of it that were the references.
    """
    directory = Path(directory)
    remedy = f"expected the output directory of `db3kd soft-labels --out {directory}`; rerun it to remake them"
    manifest = load_json(directory / "manifest.json", remedy)
    npz = directory / "soft_labels.npz"
    arrays = load_npz(npz, remedy)
    required = ["labels", "logits"] + ([] if "images" in arrays else ["indices"])
    missing = [key for key in required if key not in arrays]
    missing += [key for key in ("reference_label_queries", "estimator_queries") if key not in manifest]
    if missing:
        raise DataError(f"{directory} lacks {', '.join(missing)}; is it the output of `db3kd soft-labels`?")
    if hard_labels_for_rest and "images" in arrays:
        raise DataError(f"{directory} holds pseudo samples: hard labels for the rest apply to a dataset split's images")
    if "images" in arrays:
        images, source = arrays["images"], "synthesized"
    else:
        split_x = images_of(manifest, data_dir)
        images = split_x[arrays["indices"]]
        source = f"{manifest.get('split', 'train')} split" if "images" not in manifest else manifest["images"]["kind"]
    labels = arrays["labels"].astype(np.int64)
    logits, spent = arrays["logits"], int(manifest["estimator_queries"])
    queries_per_pair = manifest.get("queries_per_pair")
    if checkpoint is not None:
        if "checkpoints" not in arrays or checkpoint not in arrays["checkpoints"]:
            raise DataError(f"{npz} holds no distances at {checkpoint} queries per pair")
        at = list(arrays["checkpoints"]).index(checkpoint)
        logits = distances_to_logits(arrays["distances_at"][at], labels)
        capped = np.minimum(arrays["queries"], checkpoint)  # (N, K) what each pair had spent by then
        estimated = arrays["queries"] > 0
        spent, queries_per_pair = int(capped.sum()), float(capped[estimated].mean()) if estimated.any() else 0.0
    logits = logits.astype(np.float32)
    if not np.isfinite(logits).all():
        raise DataError(f"{npz}: soft-label logits contain NaN or inf")
    if not (len(images) == len(labels) == len(logits)):
        raise DataError(f"{npz}: expected as many images, labels and logits, got {len(images)}, {len(labels)}, {len(logits)}")
    cost = TransferCost(synthesis=int(manifest.get("synthesis_queries", 0)),
                        labels=int(manifest["reference_label_queries"]), soft_labels=spent)
    transfer = TransferSet(images, labels, logits, cost, source, queries_per_pair=queries_per_pair, manifest=manifest)
    if not hard_labels_for_rest:
        return transfer
    # The references are the split, or its first images (a recipe's transfer.subset): the rest is among them.
    reference = load_npz(directory / "reference_labels.npz", remedy)["labels"]
    rest = np.setdiff1d(np.arange(len(reference)), arrays["indices"])
    if len(reference) > len(split_x):
        raise DataError(f"{directory}/reference_labels.npz labels {len(reference)} images, the split has {len(split_x)}")
    return replace(transfer._with_hard_labels(split_x[rest], reference[rest]), hard_labelled=len(rest))
