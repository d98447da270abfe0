"""What the label-only oracle costs on top of the teacher itself.

On `../shared/teachers/lenet5_mnist.onnx`, in one run, with the same ONNX Runtime thread count everywhere:

- (a) a bare ONNX Runtime session + arg-max, batch 256: the ceiling;
- (b) `LabelOracle(OnnxBackend)`, batch 256 (target: >= 90% of (a));
- (c) `LabelOracle(HttpBackend)` against `db3kd serve` on loopback, the server in a subprocess (its own
  GIL), batch 1024 (target: >= 50% of the bare session at batch 1024, measured here too).

Measurements are interleaved round by round (the order rotates), and ratios are taken within a round, so
the drift of a shared machine hits both sides of a ratio alike; the medians over rounds are reported.
Results go to benchmarks/results/oracle.json and stdout.

    python benchmarks/oracle.py [--threads 2] [--images 20480] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "teachers" / "lenet5_mnist.onnx"
MNIST_TEST_IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
RESULTS = ROOT / "benchmarks" / "results" / "oracle.json"
TARGETS = {"oracle_vs_onnx_b256": 0.90, "http_vs_onnx_b1024": 0.50}


def load_images(n: int) -> np.ndarray:
    """n MNIST test images in [0, 1], repeated as needed (seeded noise if the dataset is absent)."""
    if MNIST_TEST_IMAGES.is_file():
        with gzip.open(MNIST_TEST_IMAGES) as f:
            pool = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    else:
        pool = np.random.default_rng(0).integers(0, 256, (10000, 1, 28, 28), dtype=np.uint8)
    return (np.resize(pool, (n, 1, 28, 28)) / 255.0).astype(np.float32)


def start_server(threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`db3kd serve` in a subprocess; returns it and its URL (read from its first line of output)."""
    command = [sys.executable, "-m", "db3kd", "serve", str(TEACHER), "--port", "0", "--threads", str(threads),
               "--max-batch", str(max_batch), "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DB3KD_API_KEY", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    line = first_line[0] if first_line else ""
    if " at http://" not in line:
        process.kill()
        raise SystemExit(f"db3kd serve did not start (first line: {line!r}); command: {' '.join(command)}")
    return process, line.split(" at ")[1].split(" ")[0]


def throughput(label, x: np.ndarray, batch: int) -> tuple[float, int]:
    """(seconds, images) to label all of x in batches of `batch`."""
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        label(x[i:i + batch])
    return time.perf_counter() - start, len(x)


def versions() -> dict:
    names = ["numpy", "torch", "onnxruntime", "fastapi", "starlette", "uvicorn", "h11", "httpx", "httpcore"]
    found = {name: metadata.version(name) for name in names if find_spec(name) is not None}
    found["python"] = platform.python_version()
    # uvicorn's "auto" HTTP implementation is httptools when installed, else the pure-Python h11.
    found["uvicorn_http"] = "httptools" if find_spec("httptools") else "h11"
    found["uvicorn_loop"] = "uvloop" if find_spec("uvloop") else "asyncio"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, everywhere")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of this process (the oracle's validation and clipping); `db3kd serve` "
                             "uses 1 with an ONNX teacher")
    parser.add_argument("--images", type=int, default=20480, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not TEACHER.is_file():
        raise SystemExit(f"benchmark teacher not found: {TEACHER}")

    import onnxruntime as ort
    import torch

    from db3kd.oracle import LabelOracle
    from db3kd.teachers import OnnxBackend
    from db3kd.teachers.http_backend import HttpBackend

    torch.set_num_threads(args.torch_threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(TEACHER), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def bare_onnx(xb: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: xb})[0].argmax(axis=1)

    local = LabelOracle(OnnxBackend(TEACHER, threads=args.threads), chunk_size=256)
    process, url = start_server(args.threads, max_batch=1024)
    try:
        remote = LabelOracle(HttpBackend(url, retries=50, backoff=0.05), chunk_size=1024)
        x = load_images(args.images)
        # Same answers everywhere, before timing anything.
        check = x[:1024]
        expected = bare_onnx(check)
        for name, labels in (("oracle", local.labels(check)), ("http", remote.labels(check))):
            if not np.array_equal(labels, expected):
                raise SystemExit(f"{name} labels differ from the bare session's")

        cases = {
            "onnx_b256": (bare_onnx, 256),
            "oracle_b256": (local.labels, 256),
            "onnx_b1024": (bare_onnx, 1024),
            "http_b1024": (remote.labels, 1024),
        }
        for label, batch in cases.values():  # warm-up: allocations, connection, first-call costs
            throughput(label, x[: 4 * batch], batch)
        rounds: list[dict[str, tuple[float, int]]] = []
        names = list(cases)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append({name: throughput(cases[name][0], x, cases[name][1]) for name in order})

        served = remote._backend._client.get("/info").json()["images_served"]
        if served != remote.queries:
            raise SystemExit(f"accounting mismatch: the oracle counted {remote.queries}, the server {served}")
        remote._backend.close()
    finally:
        process.terminate()
        process.wait(timeout=30)

    def rate(result: tuple[float, int]) -> float:
        return result[1] / result[0]

    measurements = {}
    for name, (_, batch) in cases.items():
        seconds = [result[name][0] for result in rounds]
        measurements[name] = {
            "batch": batch,
            "images_per_round": args.images,
            "rounds": args.rounds,
            "wall_seconds": [round(s, 4) for s in seconds],
            "images": args.images * args.rounds,
            "images_per_second_median": round(statistics.median(rate(result[name]) for result in rounds)),
            "images_per_second_min": round(min(rate(result[name]) for result in rounds)),
            "images_per_second_max": round(max(rate(result[name]) for result in rounds)),
        }
    ratios = {
        "oracle_vs_onnx_b256": statistics.median(rate(r["oracle_b256"]) / rate(r["onnx_b256"]) for r in rounds),
        "http_vs_onnx_b1024": statistics.median(rate(r["http_b1024"]) / rate(r["onnx_b1024"]) for r in rounds),
    }
    report = {
        "benchmark": "oracle",
        "teacher": str(TEACHER.relative_to(SHARED.parent)),
        "data": "MNIST test images" if MNIST_TEST_IMAGES.is_file() else "uniform noise (MNIST absent)",
        "measurements": measurements,
        "ratios": {name: round(value, 3) for name, value in ratios.items()},
        "targets": TARGETS,
        "targets_met": {name: ratios[name] >= target for name, target in TARGETS.items()},
        "http_accounting": {"oracle_queries": remote.queries, "server_images_served": served},
        "peak_rss_mb": {
            "benchmark_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "server_process": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        },
        "configuration": {
            "onnxruntime_threads": args.threads,
            "torch_threads": args.torch_threads,
            "server": "python -m db3kd serve (subprocess, loopback, no API key, max_batch 1024)",
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
