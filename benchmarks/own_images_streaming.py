"""Your own images, streamed: a folder of 20,000 JPEGs of 500x400 pixels converted to a 3x224x224 teacher's input
and BD-labelled with bounded memory; writes benchmarks/results/own_images_streaming.json.

The benchmark makes everything it needs under --work (default runs/bench-streaming): the JPEGs (MNIST digits,
coloured and upscaled to 500x400, so that a teacher can tell them apart), and the teacher: the shared MNIST
LeNet-5 preceded by grey conversion and 8x8 average pooling (224 -> 28), exported to ONNX with input
(N, 3, 224, 224). Then, each step a fresh process (its peak RSS measured alone):

1. convert: `db3kd.data.images.load_images` decodes and resizes the folder into the on-disk image store;
2. label: `db3kd soft-labels --method bd --subset 300` on the folder (the cache from 1), i.e. the teacher's labels
   of all 20,000 images (the references), then BD on the first 300 against all of them.

    .venv/bin/python benchmarks/own_images_streaming.py [--images 20000] [--subset 300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER_28 = SHARED / "teachers" / "lenet5_mnist.onnx"


def make_images(folder: Path, count: int) -> float:
    """`count` JPEGs of 500x400 (MNIST training digits, tinted, upscaled); returns seconds."""
    from PIL import Image

    from db3kd.data import load_split

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return 0.0
    x, _ = load_split("mnist", "train", SHARED / "data")
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for i in range(count):
        tint = rng.uniform(0.5, 1.0, 3)
        digit = (x[i % len(x), 0, :, :, None] * tint * 255).astype(np.uint8)  # (28, 28, 3)
        Image.fromarray(digit).resize((500, 400), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return time.perf_counter() - started


def make_teacher(path: Path) -> None:
    """The shared MNIST teacher behind grey conversion and 8x8 pooling, as an ONNX graph of (N, 3, 224, 224)."""
    import onnx
    from onnx import TensorProto, helper

    if path.is_file():
        return
    inner = onnx.load(str(TEACHER_28))
    inner_input = inner.graph.input[0].name
    # Grey as the channels' mean (a 1x1 convolution), then 8x8 average pooling: (N, 3, 224, 224) -> (N, 1, 28, 28).
    grey = helper.make_tensor("grey_weight", TensorProto.FLOAT, [1, 3, 1, 1], [1 / 3] * 3)
    pre = [helper.make_node("Conv", ["rgb", "grey_weight"], ["grey"]),
           helper.make_node("AveragePool", ["grey"], [inner_input], kernel_shape=[8, 8], strides=[8, 8])]
    graph = helper.make_graph(pre + list(inner.graph.node), "teacher224",
                              [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              list(inner.graph.output), initializer=[grey, *inner.graph.initializer])
    model = helper.make_model(graph, opset_imports=inner.opset_import)
    model.metadata_props.extend(inner.metadata_props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def child(code: list[str], cache: Path) -> tuple[float, float, str]:
    """Run a command in a fresh process with its own image cache: (seconds, peak RSS in MiB, stdout).
    (Children's peak RSS is the largest of any child so far: the steps run in increasing order of memory.)"""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(code, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DB3KD_CACHE": str(cache)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(code)}\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--subset", type=int, default=300, help="samples given BD soft labels (all are references)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-streaming"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "own_images_streaming.json"))
    args = parser.parse_args()
    work = Path(args.work)
    folder, teacher, cache = work / "jpegs", work / "teacher224.onnx", work / "cache"
    generation = make_images(folder, args.images)
    make_teacher(teacher)
    for stale in (cache, work / "bd"):
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    python = sys.executable
    convert = (f"from db3kd.data.images import ImageTransform, load_images\n"
               f"print(len(load_images({str(folder)!r}, ImageTransform((3, 224, 224)), progress=False).x))")
    seconds_convert, rss_convert, out = child([python, "-c", convert], cache)
    assert int(out) == args.images
    seconds_label, rss_label, _ = child([python, "-m", "db3kd", "soft-labels", "--teacher", str(teacher), "--dataset",
                                         str(folder), "--method", "bd", "--subset", str(args.subset), "--out",
                                         str(work / "bd")], cache)
    manifest = json.loads((work / "bd" / "manifest.json").read_text())
    reference = manifest["reference_label_queries"]
    figures = {
        "benchmark": "own_images_streaming",
        "images": {"count": args.images, "source_size": "500x400 JPEG (quality 90)", "teacher_input": [3, 224, 224],
                   "store_gib": round(sum(p.stat().st_size for p in cache.glob("images/*.npy")) / 2**30, 2)},
        "generation_seconds": round(generation, 1),
        "convert": {"seconds": round(seconds_convert, 1), "images_per_second": round(args.images / seconds_convert, 1),
                    "peak_rss_mib": round(rss_convert)},
        "soft_labels_bd": {"seconds": round(seconds_label, 1), "peak_rss_mib": round(rss_label),
                           "samples": manifest["num_samples"], "references": args.images,
                           "reference_label_queries": reference, "estimator_queries": manifest["estimator_queries"],
                           "labelling_images_per_second": round(manifest["total_queries"] / seconds_label, 1),
                           "queries_per_pair": manifest["queries_per_pair"], "median_distance": manifest["median_distance"],
                           "transform": manifest["images"]["transform"]},
        "targets": {"peak_rss_under_2_gib": max(rss_convert, rss_label) < 2048},
    }
    out_path = Path(args.out)
    out_path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
