"""Requests in flight against a slow label service: `--concurrency N` against 50 ms of added latency.

db3kd's label service (`db3kd serve`'s app) runs in a subprocess (its own GIL) and waits `--latency` seconds
before answering each `POST /labels`, as a remote API does; it takes at most `--max-batch` images per request,
as such APIs do. Two teachers behind it:

- `remote`: a stand-in for a model that runs on the API's own machines: a fixed, seeded linear classifier
  (microseconds per request), so what is measured is the client against latency (the target's setting);
- `mnist`: `../shared/teachers/lenet5_mnist.onnx` (one ONNX Runtime thread) computed on this same machine,
  so the service's work competes with the client's for its cores.

For each, the client labels the same `--images` MNIST test images through
`LabelOracle(HttpBackend(url, concurrency=c))` for c in 1, 2, 4, 8, round by round (the order rotating, so a
shared machine's drift hits every c alike), and checks that every c gives the labels of the teacher run in
this process and that the oracle's count equals the service's `images_served`. Target (`remote`):
concurrency 8 at least 6x the images/s of concurrency 1.
Results go to benchmarks/results/teacher_concurrency.json and stdout.

    python benchmarks/teacher_concurrency.py [--latency 0.05] [--max-batch 64] [--images 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from oracle import TEACHER, load_images  # noqa: E402  (the oracle benchmark's teacher and images)

RESULTS = ROOT / "benchmarks" / "results" / "teacher_concurrency.json"
CONCURRENCIES = (1, 2, 4, 8)
TEACHERS = ("remote", "mnist")
TARGET_SPEEDUP_8 = 6.0


class RemoteModel:
    """A label backend standing in for a model on the API's machines: arg-max of a fixed linear map, seeded."""

    name, input_shape, num_classes, bounds, preferred_batch = "remote-stand-in", (1, 28, 28), 10, (0.0, 1.0), 1024

    def __init__(self):
        self.weights = np.random.default_rng(0).standard_normal((28 * 28, 10)).astype(np.float32)

    def predict_labels(self, x):
        return (np.asarray(x).reshape(len(x), -1) @ self.weights).argmax(axis=1)


def teacher(model: str):
    from db3kd.teachers import OnnxBackend

    return RemoteModel() if model == "remote" else OnnxBackend(TEACHER, threads=1)


def slow(app, latency: float):
    """`app`, waiting `latency` seconds (without blocking its event loop) before each POST /labels."""
    async def delayed(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/labels":
            await asyncio.sleep(latency)
        await app(scope, receive, send)

    delayed.state = app.state
    return delayed


def serve(model: str, latency: float, max_batch: int) -> None:
    """The slow service, in this process, on a free loopback port; prints its URL first."""
    import uvicorn

    from db3kd.serve import bind_socket, create_app, server_config, service_url

    app = create_app(teacher(model), max_batch=max_batch)
    sock = bind_socket("127.0.0.1", 0)
    print(service_url(sock), flush=True)
    config = server_config(app, log_level="warning")
    config.app = slow(app, latency)
    uvicorn.Server(config).run(sockets=[sock])


def start_service(model: str, latency: float, max_batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, __file__, "--serve", model, "--latency", str(latency), "--max-batch", str(max_batch)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise SystemExit(f"the service did not start (printed {url!r})")
    return process, url


def images_served(url: str) -> int:
    import httpx

    return httpx.get(f"{url}/info", timeout=10).json()["images_served"]


def measure(args, model: str) -> dict:
    from db3kd.oracle import LabelOracle
    from db3kd.teachers import HttpBackend

    x = load_images(args.images)
    reference = LabelOracle(teacher(model)).labels(x)
    process, url = start_service(model, args.latency, args.max_batch)
    try:
        backends = {c: HttpBackend(url, concurrency=c) for c in CONCURRENCIES}
        oracles = {c: LabelOracle(backend) for c, backend in backends.items()}
        for oracle in oracles.values():  # warm-up: connections open, code paths run once
            oracle.labels(x[:args.max_batch * oracle._backend.concurrency])
        served_before = images_served(url)
        queries_before = {c: oracle.queries for c, oracle in oracles.items()}
        seconds = {c: [] for c in CONCURRENCIES}
        same_labels = True
        for round_ in range(args.rounds):
            order = CONCURRENCIES[round_ % len(CONCURRENCIES):] + CONCURRENCIES[:round_ % len(CONCURRENCIES)]
            for c in order:
                started = time.perf_counter()
                labels = oracles[c].labels(x)
                seconds[c].append(time.perf_counter() - started)
                same_labels &= bool(np.array_equal(labels, reference))
        sent = {c: oracles[c].queries - queries_before[c] for c in CONCURRENCIES}
        served = images_served(url) - served_before
        for backend in backends.values():
            backend.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    rates = {c: args.images / statistics.median(seconds[c]) for c in CONCURRENCIES}
    return {
        "measurements": {
            str(c): {"wall_seconds": [round(s, 4) for s in seconds[c]],
                     "images_per_second_median": round(rates[c]),
                     "speedup_vs_concurrency_1": round(rates[c] / rates[1], 2),
                     "queries_counted": sent[c]}
            for c in CONCURRENCIES},
        "checks": {
            "labels_equal_in_process_teacher_for_every_concurrency": same_labels,
            "queries_counted_equal_for_every_concurrency": len(set(sent.values())) == 1,
            "oracle_queries_equal_images_served": sum(sent.values()) == served,
            "images_served": served,
        },
        "speedup_8_vs_1": round(rates[8] / rates[1], 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to each request (default 0.05)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per request (default 64)")
    parser.add_argument("--images", type=int, default=4096, help="images labelled per round (default 4096)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", choices=TEACHERS, help=argparse.SUPPRESS)  # the service's own process
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.latency, args.max_batch)
    teachers = {model: measure(args, model) for model in TEACHERS}
    result = {
        "benchmark": "teacher_concurrency",
        "service": "db3kd's label service in a subprocess, waiting added_latency_seconds before each answer",
        "teachers": {"remote": "a seeded linear classifier standing in for a model on the API's machines",
                     "mnist": "shared/teachers/lenet5_mnist.onnx, 1 ONNX Runtime thread, on this machine"},
        "added_latency_seconds": args.latency,
        "max_batch": args.max_batch,
        "images_per_round": args.images,
        "requests_per_round": -(-args.images // args.max_batch),
        "rounds": args.rounds,
        "results": teachers,
        "target": {"teacher": "remote", "speedup_8_vs_1": TARGET_SPEEDUP_8,
                   "met": teachers["remote"]["speedup_8_vs_1"] >= TARGET_SPEEDUP_8},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
