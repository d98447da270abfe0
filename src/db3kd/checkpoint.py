"""Saving, loading and exporting trained models.

A db3kd checkpoint (`model.pt`) holds the weights and everything needed to rebuild the network without
the code that trained it: architecture name and options, input shape, class count, pixel bounds and the
dataset it was trained on. `model.onnx` is the same network exported for black-box use.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import atomic_write

FORMAT = "db3kd-model/1"


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs besides its weights to rebuild the network."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    bounds: tuple[float, float] = (0.0, 1.0)
    dataset: str | None = None
    arch_kwargs: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        from .models import build_model

        return build_model(self.arch, self.input_shape, self.num_classes, **self.arch_kwargs)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write `model`'s weights and `spec` to `path` atomically (a crash never leaves half a file)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "spec": asdict(spec), "state_dict": state}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the network saved at `path`, in eval mode on `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}. Train one with `db3kd train-teacher --out DIR` (writes DIR/model.pt).")
    try:
        # weights_only: a checkpoint is data, never code to run.
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # Not torch's message: it advises loading untrusted pickles (weights_only=False).
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}): damaged or not one; "
                              "expected a model.pt written by db3kd (train-teacher, train-student, distill)") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a db3kd checkpoint (expected format {FORMAT!r}). "
            "For another PyTorch model, build the module yourself and pass it to the Python API."
        )
    raw = payload["spec"]
    spec = ModelSpec(
        arch=raw["arch"],
        input_shape=tuple(raw["input_shape"]),
        num_classes=int(raw["num_classes"]),
        bounds=tuple(raw["bounds"]),
        dataset=raw.get("dataset"),
        arch_kwargs=dict(raw.get("arch_kwargs") or {}),
    )
    model = spec.build()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit architecture {spec.arch!r}: {e}") from e
    return model.to(device).eval(), spec


def export_onnx(model: torch.nn.Module, spec: ModelSpec, path: str | os.PathLike) -> Path:
    """Export `model` to ONNX: input `image` (N, C, H, W) float32 in bounds, output `logits` (N, K).

    The spec's bounds and class count are written as metadata so an ONNX teacher describes itself.
    """
    import onnx

    model = model.eval().cpu()
    example = torch.zeros(2, *spec.input_shape)
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model, (example,), exported, dynamo=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )
    proto = onnx.load_from_string(exported.getvalue())
    meta = {"db3kd.arch": spec.arch, "db3kd.num_classes": str(spec.num_classes),
            "db3kd.bounds": f"{spec.bounds[0]},{spec.bounds[1]}"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))
