"""What the label-only oracle costs on top of the teacher itself.

On `../shared/teachers/lenet5_mnist.onnx`, in one run, with the same ONNX Runtime thread count and settings
(`open_onnx`'s) everywhere:

- (a) a bare ONNX Runtime session + arg-max, batch 256: the ceiling;
- (b) `LabelOracle(OnnxBackend)`, batch 256 (target: >= 90% of (a));
- (c) `LabelOracle(HttpBackend)` against `db3kd serve` on loopback, the server in a subprocess (its own
  GIL), batch 1024 (target: >= 50% of the bare session at batch 1024, measured here too).

Measurements are interleaved round by round (the order rotates), and ratios are taken within a round, so
the drift of a shared machine hits both sides of a ratio alike; the medians over rounds are reported.
Results go to benchmarks/results/oracle.json and stdout.

`--teacher cifar10`: the same question on `../shared/teachers/alexnet_cifar10.onnx` (CIFAR-10 test images, ~100x
the work per image): a bare session with the settings `open_onnx` uses and an arg-max vs `LabelOracle(OnnxBackend)`,
both at the backend's preferred batch (target: >= 90%), after checking that both give the same labels on all
10000 test images; results in benchmarks/results/oracle_cifar10.json.

`--sweep`: which ONNX Runtime settings and batch size suit a teacher on this machine. First the session settings
(threads, execution mode, graph optimisation level, memory arena and pattern, spinning, denormals) at one batch,
then batch sizes for the two best; configurations interleaved round by round, each compared with a reference
configuration within its round, medians over rounds. Results in benchmarks/results/oracle_<teacher>_sweep.json,
which the `--teacher cifar10` report carries along.

    python benchmarks/oracle.py [--threads 2] [--images 20480] [--rounds 5]
    python benchmarks/oracle.py --teacher cifar10 [--sweep]
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
CIFAR10_TEACHER = SHARED / "teachers" / "alexnet_cifar10.onnx"
CIFAR10 = SHARED / "data" / "cifar10" / "cifar10.npz"
CIFAR10_RESULTS = ROOT / "benchmarks" / "results" / "oracle_cifar10.json"
CIFAR10_TARGET = 0.90
TEACHERS = {"mnist": TEACHER, "cifar10": CIFAR10_TEACHER}
# Images per measurement: ~2 s of the teacher's work each, on this machine.
DEFAULT_IMAGES = {"mnist": 20480, "cifar10": 1024}

# What the sweep tries, one change at a time from "intra2" (2 intra-op threads, ONNX Runtime's defaults otherwise,
# as `--threads 2` everywhere here): names -> settings in the form `session_options` takes.
SWEEP_CONFIGS = {
    "ort-defaults": {},
    "intra1": {"intra_op_num_threads": 1},
    "intra2": {"intra_op_num_threads": 2},
    "intra2-nospin": {"intra_op_num_threads": 2, "session.intra_op.allow_spinning": "0"},
    "intra2-parallel-inter2": {"intra_op_num_threads": 2, "execution_mode": "parallel", "inter_op_num_threads": 2},
    "intra1-parallel-inter2": {"intra_op_num_threads": 1, "execution_mode": "parallel", "inter_op_num_threads": 2},
    "intra2-opt-extended": {"intra_op_num_threads": 2, "graph_optimization_level": "extended"},
    "intra2-opt-basic": {"intra_op_num_threads": 2, "graph_optimization_level": "basic"},
    "intra2-no-arena": {"intra_op_num_threads": 2, "enable_cpu_mem_arena": False},
    "intra2-no-mem-pattern": {"intra_op_num_threads": 2, "enable_mem_pattern": False},
    "intra2-denormal-as-zero": {"intra_op_num_threads": 2, "session.set_denormal_as_zero": "1"},
}
SWEEP_REFERENCE = "intra2"
SWEEP_BATCHES = [32, 64, 128, 256, 512, 1024]
SWEEP_FIRST_BATCH = 256


def load_images(n: int) -> np.ndarray:
    """n MNIST test images in [0, 1], repeated as needed (seeded noise if the dataset is absent)."""
    if MNIST_TEST_IMAGES.is_file():
        with gzip.open(MNIST_TEST_IMAGES) as f:
            pool = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    else:
        pool = np.random.default_rng(0).integers(0, 256, (10000, 1, 28, 28), dtype=np.uint8)
    return (np.resize(pool, (n, 1, 28, 28)) / 255.0).astype(np.float32)


def load_cifar10(n: int) -> np.ndarray:
    """n CIFAR-10 test images, float32 (N, 3, 32, 32) in [0, 1], repeated as needed (seeded noise if absent)."""
    if CIFAR10.is_file():
        with np.load(CIFAR10) as data:
            pool = data["x_test"]  # (N, 32, 32, 3) uint8
    else:
        pool = np.random.default_rng(0).integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
    pool = np.ascontiguousarray(pool.transpose(0, 3, 1, 2))
    return (np.resize(pool, (n, 3, 32, 32)) / 255.0).astype(np.float32)


def teacher_images(teacher: str, n: int) -> tuple[np.ndarray, str]:
    if teacher == "cifar10":
        return load_cifar10(n), "CIFAR-10 test images" if CIFAR10.is_file() else "uniform noise (CIFAR-10 absent)"
    return load_images(n), "MNIST test images" if MNIST_TEST_IMAGES.is_file() else "uniform noise (MNIST absent)"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


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
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="mnist",
                        help="mnist: LeNet-5 (oracle and HTTP vs bare); cifar10: AlexNet (oracle vs bare)")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep ONNX Runtime settings and batch sizes for the teacher instead")
    parser.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads, everywhere (0: open_onnx's default)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of this process (the oracle's validation and clipping); `db3kd serve` "
                             "uses 1 with an ONNX teacher")
    parser.add_argument("--images", type=int, default=None,
                        help="images per measurement (default 20480 for mnist, 1024 for cifar10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, 7 for cifar10)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = DEFAULT_IMAGES[args.teacher] * (2 if args.teacher == "cifar10" and not args.sweep else 1)
    if args.rounds is None:
        args.rounds = 7 if args.teacher == "cifar10" and not args.sweep else 5
    if not TEACHERS[args.teacher].is_file():
        raise SystemExit(f"benchmark teacher not found: {TEACHERS[args.teacher]}")
    import torch

    torch.set_num_threads(args.torch_threads)
    if args.sweep:
        return run_sweep(args)
    if args.teacher == "cifar10":
        return run_cifar10(args)
    return run_mnist(args)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(report, indent=2))


def summary(seconds: list[float], images: int, batch: int) -> dict:
    rates = [images / s for s in seconds]
    return {
        "batch": batch,
        "images_per_round": images,
        "rounds": len(seconds),
        "wall_seconds": [round(s, 4) for s in seconds],
        "images": images * len(seconds),
        "images_per_second_median": round(statistics.median(rates)),
        "images_per_second_min": round(min(rates)),
        "images_per_second_max": round(max(rates)),
    }


def interleaved(cases: dict, x: np.ndarray, rounds: int, progress: str = "") -> list[dict[str, tuple[float, int]]]:
    """`rounds` rounds of every case (name -> (label function, batch)) on all of x, the order rotating."""
    for label, batch in cases.values():  # warm-up: allocations, arena growth, first-call costs
        throughput(label, x[: max(2 * batch, 512)], batch)
    names, results = list(cases), []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        results.append({name: throughput(cases[name][0], x, cases[name][1]) for name in order})
        if progress:
            print(f"{progress} round {r + 1}/{rounds} done, load {load_average()}", file=sys.stderr, flush=True)
    return results


def run_sweep(args) -> int:
    """ONNX Runtime settings, then batch sizes, for one teacher; see the module's docstring."""
    import onnxruntime as ort

    from db3kd.teachers.onnx_backend import session_options

    path = TEACHERS[args.teacher]
    out = args.out or RESULTS.with_name(f"oracle_{args.teacher}_sweep.json")
    load_start = load_average()
    x, data = teacher_images(args.teacher, max(args.images, max(SWEEP_BATCHES)))  # every batch size on all of x
    check = x[:1024]

    def labeller(session):
        name = session.get_inputs()[0].name
        return lambda xb: session.run(None, {name: xb})[0].argmax(axis=1)

    def measure(configs: dict[str, tuple[dict, int]], stage: str) -> list[dict]:
        """Rows of the sweep table for configs (name -> (settings, batch)), best first."""
        sessions = {}
        for name, (settings, _) in configs.items():
            key = json.dumps(settings, sort_keys=True)
            if key not in sessions:
                sessions[key] = ort.InferenceSession(str(path), session_options(settings=settings),
                                                     providers=["CPUExecutionProvider"])
        cases = {name: (labeller(sessions[json.dumps(settings, sort_keys=True)]), batch)
                 for name, (settings, batch) in configs.items()}
        labels_equal = {name: bool(np.array_equal(np.concatenate([label(check[i:i + batch])
                                                                  for i in range(0, len(check), batch)]), expected))
                        for name, (label, batch) in cases.items()}
        n = len(x)
        results = interleaved(cases, x, args.rounds, progress=f"sweep {stage}")
        reference = next(iter(configs))
        rows = []
        for name, (settings, batch) in configs.items():
            row = {"config": name, "settings": settings, **summary([r[name][0] for r in results], n, batch)}
            ratios = [r[reference][0] / r[name][0] for r in results]
            row["ratio_to_reference_median"] = round(statistics.median(ratios), 3)
            row["ratio_to_reference_per_round"] = [round(v, 3) for v in ratios]
            row["labels_equal_to_ort_defaults"] = labels_equal[name]
            for drop in ("images", "wall_seconds"):
                row.pop(drop)
            rows.append(row)
        rows.sort(key=lambda row: -row["ratio_to_reference_median"])
        return rows

    reference_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = labeller(reference_session)(check)
    first = {SWEEP_REFERENCE: (SWEEP_CONFIGS[SWEEP_REFERENCE], SWEEP_FIRST_BATCH)}
    first |= {name: (settings, SWEEP_FIRST_BATCH) for name, settings in SWEEP_CONFIGS.items()}
    settings_rows = measure(first, "settings")
    best = [row["config"] for row in settings_rows
            if row["labels_equal_to_ort_defaults"] and row["config"] != SWEEP_REFERENCE][:2]
    # Batch sizes for the two best, the reference configuration at the first stage's batch as reference.
    reference = f"{SWEEP_REFERENCE}@b{SWEEP_FIRST_BATCH}"
    second = {reference: (SWEEP_CONFIGS[SWEEP_REFERENCE], SWEEP_FIRST_BATCH)}
    second |= {f"{name}@b{batch}": (SWEEP_CONFIGS[name], batch) for name in best for batch in SWEEP_BATCHES}
    batch_rows = measure(second, "batches")
    report = {
        "benchmark": "oracle --sweep",
        "teacher": str(path.relative_to(SHARED.parent)),
        "data": data,
        "images_per_measurement": len(x),
        "rounds": args.rounds,
        "method": "configurations interleaved round by round (the order rotating); ratio_to_reference_median: "
                  "median over rounds of (the reference's seconds / this one's) within a round, the reference being "
                  f"{SWEEP_REFERENCE} at batch {SWEEP_FIRST_BATCH} in both stages (stage 2: batch sizes for stage 1's two "
                  "best other configurations); arg-max only, no oracle",
        "settings_stage": {"batch": SWEEP_FIRST_BATCH, "reference": SWEEP_REFERENCE, "rows": settings_rows},
        "batch_stage": {"configs": best, "reference": reference, "rows": batch_rows},
        "best": batch_rows[0],
        "load_average": {"start": load_start, "end": load_average()},
        "configuration": {"torch_threads": args.torch_threads, "cpu_count": os.cpu_count(),
                          "platform": platform.platform(), "versions": versions()},
    }
    write_report(report, out)
    return 0


def run_cifar10(args) -> int:
    """Bare tuned session vs LabelOracle(OnnxBackend) on the CIFAR-10 AlexNet, at the backend's preferred batch."""
    import onnxruntime as ort

    from db3kd.oracle import LabelOracle
    from db3kd.teachers import OnnxBackend
    from db3kd.teachers.onnx_backend import SESSION_SETTINGS, session_options

    out = args.out or CIFAR10_RESULTS
    threads = args.threads or None
    load_start = load_average()
    backend = OnnxBackend(CIFAR10_TEACHER, threads=threads)
    oracle = LabelOracle(backend)
    batch = oracle.chunk_size
    session = ort.InferenceSession(str(CIFAR10_TEACHER), session_options(threads), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def bare_onnx(xb: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: xb})[0].argmax(axis=1)

    x, data = teacher_images("cifar10", args.images)
    check = load_cifar10(10000)  # every test image once: the same labels, before timing anything
    expected = np.concatenate([bare_onnx(check[i:i + batch]) for i in range(0, len(check), batch)])
    if not np.array_equal(oracle.labels(check), expected):
        raise SystemExit("oracle labels differ from the bare session's")
    accuracy = None
    if CIFAR10.is_file():
        with np.load(CIFAR10) as d:
            accuracy = round(float((expected == d["y_test"]).mean()), 4)

    cases = {f"onnx_b{batch}": (bare_onnx, batch), f"oracle_b{batch}": (oracle.labels, batch)}
    rounds = interleaved(cases, x, args.rounds, progress="cifar10")
    bare, wrapped = cases
    ratios = [r[bare][0] / r[wrapped][0] for r in rounds]
    ratio = statistics.median(ratios)
    sweep_file = RESULTS.with_name("oracle_cifar10_sweep.json")
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    report = {
        "benchmark": "oracle --teacher cifar10",
        "teacher": str(CIFAR10_TEACHER.relative_to(SHARED.parent)),
        "data": data,
        "labels_checked": {"images": len(check), "equal_to_bare_session": True, "teacher_test_accuracy": accuracy},
        "measurements": {name: summary([r[name][0] for r in rounds], len(x), b) for name, (_, b) in cases.items()},
        "ratios": {f"oracle_vs_onnx_b{batch}": round(ratio, 3)},
        "ratio_per_round": [round(v, 3) for v in ratios],
        "targets": {f"oracle_vs_onnx_b{batch}": CIFAR10_TARGET},
        "targets_met": {f"oracle_vs_onnx_b{batch}": ratio >= CIFAR10_TARGET},
        "settings": {
            "session": {**SESSION_SETTINGS, **({"intra_op_num_threads": threads} if threads else {})},
            "preferred_batch": batch,
            "where": "db3kd.teachers.onnx_backend: SESSION_SETTINGS (open_onnx) and OnnxBackend.preferred_batch; "
                     "the bare session is built with the same session_options",
        },
        "load_average": {"start": load_start, "end": load_average()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "configuration": {"onnxruntime_threads": threads, "torch_threads": args.torch_threads,
                          "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": versions()},
        "sweep": None if sweep is None else {
            "file": str(sweep_file.relative_to(ROOT)),
            "load_average": sweep["load_average"],
            "settings_stage": sweep["settings_stage"],
            "batch_stage": sweep["batch_stage"],
        },
    }
    write_report(report, out)
    return 0 if ratio >= CIFAR10_TARGET else 1


def run_mnist(args) -> int:
    """The LeNet-5 case: bare session, LabelOracle(OnnxBackend) and LabelOracle(HttpBackend)."""
    import onnxruntime as ort

    from db3kd.oracle import LabelOracle
    from db3kd.teachers import OnnxBackend
    from db3kd.teachers.http_backend import HttpBackend
    from db3kd.teachers.onnx_backend import SESSION_SETTINGS, session_options

    args.out = args.out or RESULTS
    load_start = load_average()
    session = ort.InferenceSession(str(TEACHER), session_options(args.threads), providers=["CPUExecutionProvider"])
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

        sender = remote._backend.sender
        served = sender.json(sender.send("GET", "/info"), "/info")["images_served"]
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
        "load_average": {"start": load_start, "end": load_average()},
        "configuration": {
            "onnxruntime_threads": args.threads,
            "onnxruntime_settings": SESSION_SETTINGS,
            "torch_threads": args.torch_threads,
            "server": "python -m db3kd serve (subprocess, loopback, no API key, max_batch 1024)",
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(),
        },
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
