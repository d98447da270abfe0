"""Transfer sets: the images a student learns from, with hard labels and soft-label logits."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import load_split
from .errors import DataError


@dataclass(frozen=True, eq=False)
class TransferSet:
    """Images (N, C, H, W), their class c (N,), soft-label logits (N, K), and the manifest that made them."""

    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    logits: np.ndarray = field(repr=False)
    manifest: dict


def load_transfer_set(directory: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> TransferSet:
    """Read the output of `db3kd soft-labels` (soft_labels.npz + manifest.json) from `directory`.

    Images come from the npz itself when it holds them (pseudo samples), else from the dataset split the
    manifest names, at the stored indices.
    """
    directory = Path(directory)
    npz, manifest_path = directory / "soft_labels.npz", directory / "manifest.json"
    for path in (npz, manifest_path):
        if not path.is_file():
            raise DataError(f"{path} not found: expected the output directory of `db3kd soft-labels --out {directory}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the transfer set in {directory}: {e}") from e
    required = ["labels", "logits"] + ([] if "images" in arrays else ["indices"])
    missing = [key for key in required if key not in arrays]
    if missing:
        raise DataError(f"{npz} lacks {', '.join(missing)}; is it the output of `db3kd soft-labels`?")
    if "images" in arrays:
        images = arrays["images"]
    else:
        x, _ = load_split(manifest["dataset"], manifest.get("split", "train"), data_dir)
        images = x[arrays["indices"]]
    logits = arrays["logits"].astype(np.float32)
    if not np.isfinite(logits).all():
        raise DataError(f"{npz}: soft-label logits contain NaN or inf")
    if not (len(images) == len(arrays["labels"]) == len(logits)):
        raise DataError(f"{npz}: expected as many images, labels and logits, got {len(images)}, {len(arrays['labels'])}, {len(logits)}")
    return TransferSet(images=images, labels=arrays["labels"].astype(np.int64), logits=logits, manifest=manifest)


def with_hard_labels(transfer: TransferSet, images: np.ndarray, labels: np.ndarray) -> TransferSet:
    """`transfer` plus `images` that have a teacher label but no soft label (their logits are NaN, so the
    distillation loss gives them its cross-entropy term only; see `db3kd.losses.KDLoss`)."""
    if images.shape[1:] != transfer.images.shape[1:] or len(images) != len(labels):
        raise DataError(f"expected images shaped {transfer.images.shape[1:]} with one label each, got {images.shape} "
                        f"and {len(labels)} labels")
    nan = np.full((len(images), transfer.logits.shape[1]), np.nan, dtype=np.float32)
    return TransferSet(images=np.concatenate([transfer.images, images]), labels=np.concatenate([transfer.labels, labels]),
                       logits=np.concatenate([transfer.logits, nan]), manifest=transfer.manifest)
