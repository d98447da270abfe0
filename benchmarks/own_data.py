"""The whole DB3KD path on your own images and your own teacher; writes benchmarks/results/own_data.json.

Images (made here from MNIST, under --work): a folder of PNG files with one subfolder per class (the first
--train training images), a flat folder of unlabelled RGB JPEGs of 40x36 pixels (the next --train), and a
labelled PNG test folder (the first --test test images). Teachers: the shared MNIST LeNet-5 as a Python callable
(benchmarks/mnist_callable.py) and behind a real V2 inference server (KServe, or MLServer; their venvs come
from .ci/v2-servers.sh). For each (images, teacher), `db3kd run` on a recipe with BD soft labels, the CE
baseline and a DB3KD student, then `db3kd report`; the oracle's query count is compared with the teacher's
own (the callable's counter, the server's Prometheus count).

    .venv/bin/python benchmarks/own_data.py [--train 2000] [--test 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the V2 server launcher of the tests


def make_folders(work: Path, train: int, test: int) -> dict[str, Path]:
    from PIL import Image

    from db3kd.data import load_split

    folders = {"png": work / "png-train", "jpeg": work / "jpeg-flat", "test": work / "png-test"}
    if all(f.is_dir() for f in folders.values()):
        return folders
    x, y = load_split("mnist", "train", SHARED / "data")
    xt, yt = load_split("mnist", "test", SHARED / "data")
    for i in range(train):
        (folders["png"] / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0] * 255).astype(np.uint8)).save(folders["png"] / str(y[i]) / f"{i:05d}.png")
    folders["jpeg"].mkdir(parents=True, exist_ok=True)
    for i in range(train, 2 * train):
        digit = Image.fromarray((x[i, 0] * 255).astype(np.uint8)).convert("RGB").resize((40, 36))
        digit.save(folders["jpeg"] / f"{i:05d}.jpg", quality=92)
    for i in range(test):
        (folders["test"] / str(yt[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((xt[i, 0] * 255).astype(np.uint8)).save(folders["test"] / str(yt[i]) / f"{i:05d}.png")
    return folders


def recipe(name: str, images: Path, test: Path, teacher: str) -> dict:
    return {"name": name, "dataset": {"name": str(images), "test": str(test), "resize": "pad"}, "teacher": teacher,
            "soft_labels": {"bd": {"method": "bd"}}, "baselines": ["ce"],
            "students": {"arch": ["lenet5-half"], "seeds": [0]}}


def run(raw: dict, work: Path) -> tuple[dict, int, float]:
    """`db3kd run` and `db3kd report` on a recipe: (the report's rows, the queries this run sent, seconds)."""
    from db3kd.cli import main as db3kd

    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    if db3kd(["run", str(path), "--out", str(work / raw["name"]), "--quiet", "--report"]) != 0:
        sys.exit(f"db3kd run failed on {path}")
    seconds = time.perf_counter() - started
    from db3kd.recipe import load_recipe
    from db3kd.report import collect, plan_stages, summarise

    run_dir = work / raw["name"]
    recipe_ = load_recipe(run_dir / "recipe.resolved.yaml", check_files=False)
    rows = {r["label"]: {"test_accuracy": r["accuracy"][0], "fidelity": r["fidelity"][0], "teacher_queries": r["queries"],
                         "transfer": r["transfer"]} for r in summarise(collect(run_dir, plan_stages(recipe_))[0])}
    return rows, json.loads((run_dir / "run.json").read_text())["teacher_queries_this_run"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-own-data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "own_data.json"))
    args = parser.parse_args()
    work = Path(args.work)
    subprocess.run(["rm", "-rf", *[str(p) for p in work.glob("*-*-run")]], check=True)
    folders = make_folders(work, args.train, args.test)
    import mnist_callable

    results = {}
    for images in ("png", "jpeg"):
        before = mnist_callable.IMAGES[0]
        rows, queries, seconds = run(recipe(f"{images}-callable-run", folders[images], folders["test"],
                                            "python:mnist_callable:MnistTeacher"), work)
        results[f"{images}/callable"] = {"students": rows, "oracle_queries": queries,
                                         "teacher_count": mnist_callable.IMAGES[0] - before, "seconds": round(seconds, 1)}
    from test_teachers_v2_servers import start_kserve, start_mlserver  # noqa: E402

    for kind, start in (("kserve", start_kserve), ("mlserver", start_mlserver)):
        try:
            server = start(work)
        except BaseException as e:  # noqa: BLE001 - no server venv here: say so in the figures
            results[f"v2-{kind}"] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        try:
            model = "lenet5-logits"
            for images in ("png", "jpeg"):
                before = server.images(model)
                rows, queries, seconds = run(recipe(f"{images}-{kind}-run", folders[images], folders["test"],
                                                    server.url(model, "?num_classes=10")), work)
                results[f"{images}/v2-{kind}"] = {"students": rows, "oracle_queries": queries,
                                                  "teacher_count": server.images(model) - before,
                                                  "seconds": round(seconds, 1)}
        finally:
            server.stop()
    figures = {"benchmark": "own_data", "train_images": args.train, "test_images": args.test,
               "images": {"png": "labelled folder, MNIST 28x28 PNG, one subfolder per class",
                          "jpeg": "flat folder of unlabelled 40x36 RGB JPEGs (MNIST), resized with padding",
                          "test": "labelled folder, MNIST test PNGs"},
               "runs": results,
               "counts_equal": all(r.get("oracle_queries") == r.get("teacher_count") for r in results.values()
                                   if "skipped" not in r)}
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
