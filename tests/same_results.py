"""What "the same results" means across refactors: digests of a recipe run's arrays and its students' figures.

`fingerprint(tmp)` runs, on scikit-learn's digits with the committed teacher `tests/data/digits_teacher.onnx`,
a data-based recipe (SD, BD, MBD with checkpoints, the CE and standard-KD baselines), a zero-shot recipe
(synthesis, mixtures, BD) and the demo with short settings, and returns the SHA-256 of every result array and
every student's accuracy, fidelity and teacher queries. `tests/data/same_results.json` holds the fingerprint
of the code before the upper-layer refactor (the recipes pin the paper's training profile, so they still give
it); the demo's part was remade when the default training profile became `auto`, and the whole reference when
BD and MBD changed their search (issue 14: BD's `descent`, MBD's momentum), which changes every result. `tests/test_same_results.py`
checks the code still gives it.

    .venv/bin/python tests/same_results.py --write    # regenerate the reference (only when results SHOULD change)
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

DATA = Path(__file__).resolve().parent / "data"
TEACHER = DATA / "digits_teacher.onnx"
REFERENCE = DATA / "same_results.json"
TRAIN = {"profile": "paper", "epochs": 4, "batch_size": 32, "lr": 0.005}


def recipes(teacher: Path) -> dict[str, dict]:
    students = {"arch": ["lenet5-half"], "seeds": [0], "train": dict(TRAIN)}
    return {
        "data": {
            "name": "same-data", "dataset": {"name": "digits"}, "teacher": str(teacher),
            "transfer": {"split": "train", "subset": 300},
            "soft_labels": {
                "sd": {"method": "sd"},
                "bd": {"method": "bd", "params": {"queries_per_pair": 20}},
                "mbd": {"method": "mbd", "params": {"queries_per_pair": 60, "checkpoints": [30, 60], "probes": 8},
                        "subset": 40, "checkpoint_students": True},
            },
            "students": students, "baselines": ["ce", "standard-kd"],
        },
        "zero-shot": {
            "name": "same-zs", "dataset": {"name": "digits"}, "teacher": str(teacher),
            "transfer": {"synthesize": {"per_class": 4, "queries_per_sample": 200, "rounds": 2, "shard_size": 20,
                                        "draw_batch": 200},
                         "mixtures": {"count": 300, "max_shift": 1, "shard_size": 100}},
            "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": 10}}},
            "students": students, "baselines": ["ce"],
        },
    }


def digest(path: Path) -> dict[str, str]:
    with np.load(path, allow_pickle=False) as data:
        return {k: hashlib.sha256(np.ascontiguousarray(data[k]).tobytes()).hexdigest()[:16] for k in sorted(data.files)}


def student(metrics: dict) -> dict:
    return {"accuracy": metrics["test_accuracy"], "fidelity": metrics.get("fidelity"),
            "history": [h["test_accuracy"] for h in metrics["history"]],
            "queries": metrics["teacher_queries"]["total"]}


def fingerprint(tmp: Path) -> dict:
    from db3kd.demo import run_demo
    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe

    out: dict = {}
    for name, raw in recipes(TEACHER).items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_dir = tmp / name
        run_recipe(load_recipe(path), run_dir, progress=False)
        arrays = {str(p.relative_to(run_dir)): digest(p) for p in sorted(run_dir.glob("**/*.npz"))
                  if "shards" not in p.parts and p.name != "reference_labels.npz"}
        students = {str(p.parent.relative_to(run_dir)): student(json.loads(p.read_text()))
                    for p in sorted(run_dir.glob("students/*/metrics.json"))}
        out[name] = {"arrays": arrays, "students": students}
    run_demo(tmp / "demo", epochs=2, progress=False, synthesis={"per_class": 5, "queries_per_sample": 200, "rounds": 2},
             mixtures={"count": 500})
    rows = {"teacher": "teacher", "student, CE on top-1 labels": "data/students/ce-lenet5-half-seed0",
            "student, DB3KD-BD": "data/students/bd-lenet5-half-seed0",
            "student, ZSDB3KD-BD (zero-shot)": "zero-shot/students/bd-lenet5-half-seed0"}
    out["demo"] = []
    for model, path in rows.items():
        metrics = json.loads((tmp / "demo" / path / "metrics.json").read_text())
        out["demo"].append({"model": model, "test_accuracy": metrics["test_accuracy"], "fidelity": metrics.get("fidelity"),
                            "teacher_queries": None if model == "teacher" else metrics["teacher_queries"]["total"]})
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = fingerprint(Path(tmp))
    text = json.dumps(result, indent=1, sort_keys=True)
    if "--write" in sys.argv:
        REFERENCE.write_text(text + "\n")
    print(text)
