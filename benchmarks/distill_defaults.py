"""Benchmark: `db3kd distill` with default training settings on small MNIST transfer sets, beside CE-only.

For each size N (6,000 and 2,000: the first N MNIST training images), with the shared LeNet-5 teacher:
1. BD soft labels of the N images (`db3kd soft-labels --method bd --subset N`, default parameters; reused
   when complete);
2. for each seed, a `lenet5-half` distilled on them with every training setting at its default
   (`db3kd distill`, the auto profile), a `lenet5-half` CE-only student on the teacher's top-1 labels of
   the same images with the same defaults (`db3kd train-student --labels teacher --subset N`), and the
   former default for reference (`--profile paper --epochs 3`, batch 512: 36 optimizer steps on 6,000).

Writes benchmarks/results/distill_defaults.json (accuracy, fidelity, chosen epoch, wall time per student;
means over seeds; the targets: >= 97.0% at 6,000, >= 95.0% at 2,000, each student under 3 minutes) and
distill_defaults.png (accuracy per setting and size).

    python benchmarks/distill_defaults.py [--sizes 6000 2000] [--seeds 0 1] [--run-dir runs/bench-distill]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from db3kd import __version__
from db3kd.cli import main as db3kd
from db3kd.io import write_json

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "../shared/teachers/lenet5_mnist.onnx"
DATA = "../shared/data"
TARGETS = {6000: 0.970, 2000: 0.950}
TIME_LIMIT_S = 180
SETTINGS = {  # name: (command, extra arguments)
    "db3kd-bd (defaults)": ("distill", []),
    "ce-only (defaults)": ("train-student", []),
    "db3kd-bd (paper, 3 epochs)": ("distill", ["--profile", "paper", "--epochs", "3"]),
}


def run(argv: list[str]) -> None:
    if db3kd(argv) != 0:
        raise SystemExit(f"failed: db3kd {' '.join(argv)}")


def student(command: str, extra: list[str], size: int, seed: int, soft: Path, out: Path) -> dict:
    if not (out / "metrics.json").exists():
        common = ["--teacher", TEACHER, "--data-dir", DATA, "--seed", str(seed), "--out", str(out), *extra]
        if command == "distill":
            run(["distill", "--transfer", str(soft), "--student", "lenet5-half", "--dataset", "mnist", *common])
        else:
            run(["train-student", "--labels", "teacher", "--arch", "lenet5-half", "--dataset", "mnist",
                 "--subset", str(size), *common])
    m = json.loads((out / "metrics.json").read_text())
    return {"seed": seed, "test_accuracy": m["test_accuracy"], "fidelity": m["fidelity"], "seconds": m["seconds"],
            "epochs": m["epochs"], "chosen_epoch": m["chosen_epoch"], "plan": m["plan"],
            "teacher_queries": m["teacher_queries"]["total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--run-dir", default="runs/bench-distill")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    result: dict = {"config": {"teacher": TEACHER, "student": "lenet5-half", "soft_labels": "bd, default parameters",
                               "seeds": args.seeds, "torch_threads": torch.get_num_threads()},
                    "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
                    "version": __version__, "sizes": {}}
    for size in args.sizes:
        soft = run_dir / f"bd-{size}"
        started = time.perf_counter()
        run(["soft-labels", "--teacher", TEACHER, "--dataset", "mnist", "--data-dir", DATA, "--method", "bd",
             "--subset", str(size), "--out", str(soft)])
        manifest = json.loads((soft / "manifest.json").read_text())
        entry: dict = {"soft_labels": {"queries": manifest["total_queries"], "seconds": round(time.perf_counter() - started, 1)},
                       "settings": {}}
        for name, (command, extra) in SETTINGS.items():
            rows = [student(command, extra, size, seed, soft, run_dir / f"{name.split()[0]}-{size}-{'-'.join(extra) or 'auto'}-s{seed}")
                    for seed in args.seeds]
            accs = [r["test_accuracy"] for r in rows]
            entry["settings"][name] = {"mean_test_accuracy": statistics.mean(accs), "min_test_accuracy": min(accs),
                                       "mean_fidelity": statistics.mean(r["fidelity"] for r in rows),
                                       "max_seconds": max(r["seconds"] for r in rows), "students": rows}
        best = entry["settings"]["db3kd-bd (defaults)"]
        entry["target"] = {"accuracy": TARGETS.get(size), "met": TARGETS.get(size) is None or
                           (best["mean_test_accuracy"] >= TARGETS[size] and best["max_seconds"] <= TIME_LIMIT_S)}
        result["sizes"][str(size)] = entry
        print(json.dumps({size: {k: round(v["mean_test_accuracy"], 4) for k, v in entry["settings"].items()}}))
    out = ROOT / "benchmarks" / "results" / "distill_defaults.json"
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    sizes = list(result["sizes"])
    width = 0.8 / len(SETTINGS)
    for i, name in enumerate(SETTINGS):
        values = [100 * result["sizes"][s]["settings"][name]["mean_test_accuracy"] for s in sizes]
        bars = ax.bar([j + i * width for j in range(len(sizes))], values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width for j in range(len(sizes))], [f"first {int(s):,} images" for s in sizes])
    ax.set(ylabel="test accuracy (%), mean of seeds", ylim=(60, 100),
           title="lenet5-half from the MNIST LeNet-5's labels: default training vs the former setting")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
