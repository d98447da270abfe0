"""Executors: soft labels and synthesis on a local Ray instance equal the local executor's, one query budget
holds across workers, a killed worker's shard is retried and counted once, a lost driver leaves finished
shards for a resumed run, and the accounting (attempts.jsonl, manifest) adds up."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from db3kd import open_oracle
from db3kd.cli import main
from db3kd.errors import BudgetExceededError, ConfigError, ExecutorError, TeacherError
from db3kd.executors import ATTEMPTS_FILE, AttemptLog, LocalExecutor
from db3kd.executors.ray import RayExecutor, SharedBudget
from db3kd.oracle import LabelOracle
from db3kd.teachers import TeacherSpec

BD = ["--method", "bd", "--subset", "40", "--shard-size", "8"]  # 5 shards of 72 pairs
PAIRS_PER_SHARD = 8 * 9


def soft_labels(teacher, out, *extra):
    return main(["soft-labels", "--teacher", str(teacher), "--dataset", "digits", "--out", str(out), *extra])


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_same_arrays(a_path, b_path):
    a, b = load(a_path), load(b_path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def attempts(out):
    return AttemptLog(out / ATTEMPTS_FILE).entries()


@pytest.fixture(scope="module")
def local_bd(digits_teacher, tmp_path_factory):
    """The reference: BD soft labels of 40 digits samples with the local executor."""
    out = tmp_path_factory.mktemp("local-bd")
    assert soft_labels(digits_teacher, out, *BD) == 0
    return out


# --- without Ray --------------------------------------------------------------------------------------------


class CountingLedger:
    """A QueryLedger that grants up to `budget` and records every call."""

    def __init__(self, budget):
        self.budget, self.used, self.calls = budget, 0, []

    def reserve(self, n):
        self.calls.append(("reserve", n))
        if self.used + n > self.budget:
            raise BudgetExceededError(self.used, self.budget, n)
        self.used += n

    def settle(self, reserved, sent):
        self.calls.append(("settle", reserved, sent))
        self.used -= reserved - sent


class FailsOnSecondChunk:
    name, input_shape, num_classes, bounds, preferred_batch = "flaky", (1, 2, 2), 3, (0.0, 1.0), 4

    def __init__(self):
        self.seen = 0

    def predict_labels(self, x):
        if self.seen:
            raise TeacherError("the teacher went away")
        self.seen += len(x)
        return np.zeros(len(x), dtype=np.int64)


def test_oracle_reserves_before_sending_and_settles_what_was_sent():
    backend = FailsOnSecondChunk()
    ledger = CountingLedger(budget=10)
    oracle = LabelOracle(backend, ledger=ledger)
    with pytest.raises(BudgetExceededError):
        oracle.labels(np.zeros((11, 1, 2, 2), np.float32))
    assert backend.seen == 0 and oracle.queries == 0  # refused by the shared budget: nothing sent
    with pytest.raises(TeacherError, match="went away"):
        oracle.labels(np.zeros((6, 1, 2, 2), np.float32))  # chunks of 4: the first is answered, the second fails
    assert ledger.calls[-2:] == [("reserve", 6), ("settle", 6, 4)]
    assert ledger.used == oracle.queries == 4  # the unsent 2 are released


def test_shared_budget_never_grants_beyond_it_and_keeps_unsettled_reservations():
    ledger = SharedBudget(100)
    a, b = ledger.begin(0), ledger.begin(1)
    assert ledger.reserve(0, a, 60) == (True, 60, 100)
    assert ledger.reserve(1, b, 50) == (False, 60, 100)  # 60 reserved + 50 > 100
    ledger.settle(0, a, 60, 45)  # 15 were not sent: released
    assert ledger.reserve(1, b, 50) == (True, 95, 100)
    retry = ledger.begin(1)  # attempt b's worker died holding its reservation: it may have sent those 50
    assert retry == 2
    assert ledger.reserve(1, retry, 6) == (False, 95, 100)
    assert ledger.attempts(1) == [{"queries": 0, "in_flight": 50}, {"queries": 0, "in_flight": 0}]
    assert ledger.totals() == {"shared_budget": 100, "worker_queries": 45, "worker_unconfirmed": 50}


def test_local_run_records_every_attempt_and_the_manifest_adds_up(local_bd):
    m = manifest(local_bd)
    assert m["executor"] == {"name": "local"}
    assert len(m["shard_queries"]) == 5 and sum(m["shard_queries"]) == m["estimator_queries"]
    assert m["total_queries"] == sum(m["shard_queries"]) + m["reference_label_queries"]
    assert m["queries_sent"] == m["total_queries"] and m["queries_discarded"] == 0
    entries = attempts(local_bd)
    assert [e["shard"] for e in entries] == [None, 0, 1, 2, 3, 4] and all(e["kept"] for e in entries)


def test_local_budget_stop_records_the_discarded_attempt(digits_teacher, local_bd, tmp_path):
    m = manifest(local_bd)
    budget = m["reference_label_queries"] + m["shard_queries"][0] + 100  # shard 1 sends a round of 72, then stops
    assert soft_labels(digits_teacher, tmp_path, *BD, "--budget-total", str(budget)) == 2
    cut = [e for e in attempts(tmp_path) if not e["kept"]]
    assert len(cut) == 1 and cut[0]["shard"] == 1 and 0 < cut[0]["queries"] <= 100
    assert soft_labels(digits_teacher, tmp_path, *BD) == 0
    assert_same_arrays(local_bd / "soft_labels.npz", tmp_path / "soft_labels.npz")
    resumed = manifest(tmp_path)
    assert resumed["queries_discarded"] == cut[0]["queries"]
    assert resumed["queries_sent"] == resumed["total_queries"] + cut[0]["queries"]


def test_executor_ray_without_ray_says_how_to_install(digits_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert soft_labels(digits_teacher, tmp_path / "run", *BD, "--executor", "ray") == 2
    assert "pip install 'db3kd[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any query


def test_an_unreachable_ray_head_is_refused_before_any_query(digits_teacher, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens at once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert soft_labels(digits_teacher, tmp_path / "run", *BD, "--executor", "ray",
                       "--ray-address", f"127.0.0.1:{port}") == 2
    assert f"no Ray cluster head answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["--workers", "2"], "--workers applies to --executor ray only"),
    (["--ray-address", "auto"], "--ray-address applies to --executor ray only"),
    (["--max-retries", "1"], "--max-retries applies to --executor ray only"),
], ids=["workers", "address", "retries"])
def test_ray_options_need_executor_ray(digits_teacher, tmp_path, capsys, extra, message):
    assert soft_labels(digits_teacher, tmp_path / "run", *BD, *extra) == 2
    assert message in capsys.readouterr().err


def test_teacher_spec_ships_the_file_and_refuses_what_it_cannot(digits_teacher, tmp_path):
    spec = TeacherSpec.parse(digits_teacher).shippable()
    assert "payload" not in repr(spec) and spec.payload == digits_teacher.read_bytes()
    assert spec.identity() == TeacherSpec.parse(digits_teacher).identity()
    assert spec.identity() == "sha256:" + hashlib.sha256(digits_teacher.read_bytes()).hexdigest()
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    expected = open_oracle(digits_teacher).labels(x)
    elsewhere = TeacherSpec("/nowhere/model.onnx", "onnx", payload=spec.payload)  # a worker without the driver's files
    np.testing.assert_array_equal(LabelOracle(elsewhere.load(threads=1)).labels(x), expected)
    checkpoint = TeacherSpec.parse(digits_teacher.with_name("model.pt")).shippable()  # written beside it by the fixture
    np.testing.assert_array_equal(LabelOracle(checkpoint.load()).labels(x), expected)
    with pytest.raises(TeacherError, match="teacher not found"):
        TeacherSpec.parse(tmp_path / "missing.onnx").shippable()
    with pytest.raises(ConfigError, match="expected a .pt checkpoint, an .onnx file"):
        TeacherSpec.parse(tmp_path / "model.h5")
    assert "secret" not in repr(TeacherSpec.parse("http://127.0.0.1:1", api_key="secret"))


# --- on a local Ray instance ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (starting one takes seconds): 2 CPUs, as this machine has."""
    ray = pytest.importorskip("ray")  # a fallback only: CI installs the dev extra, which has Ray
    # The fault-injecting jobs below are defined here; workers cannot import a test module, so ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # "local": a new instance even if this machine runs a cluster (`ray start`), whose CPUs the test cannot set.
    ray.init(address="local", num_cpus=2, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


class DiesOnce:
    """A shard job whose worker spends `queries` queries on `shard`, then dies (os._exit), on the first attempt.

    "First" is decided by a marker file, not by timing: the retried attempt finds it and runs the real job.
    """

    def __init__(self, job, shard: int, marker, queries: int = 7, always: bool = False):
        self.job, self.shard, self.marker, self.queries, self.always = job, shard, str(marker), queries, always

    def __call__(self, oracle, shard):
        if shard == self.shard and (self.always or not os.path.exists(self.marker)):
            with open(self.marker, "a") as f:
                f.write("died\n")
            oracle.labels(np.zeros((self.queries, *oracle.input_shape), np.float32))
            os._exit(1)
        return self.job(oracle, shard)


class FaultyRay(RayExecutor):
    """The Ray executor with a fault injected into the shard job it ships."""

    def __init__(self, *args, fault, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault = fault

    def run(self, job, shards, oracle, log):
        return super().run(self.fault(job), shards, oracle, log)


def test_ray_soft_labels_equal_the_local_executors(ray_instance, digits_teacher, local_bd, tmp_path):
    assert soft_labels(digits_teacher, tmp_path, *BD, "--executor", "ray", "--workers", "2") == 0
    assert_same_arrays(local_bd / "soft_labels.npz", tmp_path / "soft_labels.npz")
    m, reference = manifest(tmp_path), manifest(local_bd)
    assert m["executor"]["name"] == "ray" and m["executor"]["workers"] == 2
    assert m["shard_queries"] == reference["shard_queries"]
    assert m["total_queries"] == sum(m["shard_queries"]) + m["reference_label_queries"] == reference["total_queries"]
    assert m["executor"]["worker_queries"] == sum(m["shard_queries"]) and m["executor"]["worker_unconfirmed"] == 0
    assert m["queries_sent"] == m["total_queries"] and m["queries_discarded"] == 0
    assert sorted(e["shard"] for e in attempts(tmp_path) if e["executor"] == "ray") == [0, 1, 2, 3, 4]


def test_total_budget_holds_across_workers_then_a_local_rerun_resumes(ray_instance, digits_teacher, local_bd, tmp_path,
                                                                      capsys):
    reference = manifest(local_bd)
    budget = reference["reference_label_queries"] + int(2.5 * reference["shard_queries"][0])
    assert soft_labels(digits_teacher, tmp_path, *BD, "--executor", "ray", "--workers", "2",
                       "--budget-total", str(budget)) == 2
    assert f"of {budget} queries used" in capsys.readouterr().err
    sent = sum(e["queries"] + e["unconfirmed"] for e in attempts(tmp_path))
    # Never more than the budget, over the driver and both workers; and a refused call asks for at most one
    # query per pair of a shard, so less than that was left unused.
    assert budget - PAIRS_PER_SHARD < sent <= budget
    written = sorted(p.name for p in (tmp_path / "shards").glob("*.npz"))
    assert 1 <= len(written) <= 3 and not (tmp_path / "soft_labels.npz").exists()
    assert soft_labels(digits_teacher, tmp_path, *BD) == 0  # resumed with the local executor
    assert_same_arrays(local_bd / "soft_labels.npz", tmp_path / "soft_labels.npz")
    m = manifest(tmp_path)
    assert m["queries_discarded"] > 0 and m["queries_sent"] == m["total_queries"] + m["queries_discarded"]


def test_a_killed_workers_shard_is_retried_and_counted_once(ray_instance, digits_teacher, local_bd, tmp_path):
    from db3kd.data import load_split
    from db3kd.jobs.soft_labels import SoftLabelConfig, compute_soft_labels

    x, _ = load_split("digits", "train")
    run = dict(x=x, indices=np.arange(40), config=SoftLabelConfig(method="bd", shard_size=8), out_dir=tmp_path,
               run_info={"teacher": str(digits_teacher), "dataset": "digits", "split": "train"}, progress=False)
    reference = manifest(local_bd)
    # Started locally, stopped by its budget after shard 0...
    stop = reference["reference_label_queries"] + reference["shard_queries"][0]
    with pytest.raises(BudgetExceededError):
        compute_soft_labels(open_oracle(digits_teacher, budget=stop), **run)
    # ...resumed on Ray, where the worker computing shard 2 dies once after sending 7 queries.
    marker = tmp_path / "died"
    executor = FaultyRay(digits_teacher, workers=2, fault=lambda job: DiesOnce(job, 2, marker))
    driver = open_oracle(digits_teacher)
    m = compute_soft_labels(driver, **run, executor=executor)
    assert marker.read_text() == "died\n"  # exactly one attempt died
    assert_same_arrays(local_bd / "soft_labels.npz", tmp_path / "soft_labels.npz")
    ray_attempts = [e for e in attempts(tmp_path) if e["executor"] == "ray"]
    died = [e for e in ray_attempts if not e["kept"]]
    assert len(died) == 1 and died[0]["shard"] == 2 and died[0]["attempt"] == 1
    assert died[0]["queries"] + died[0]["unconfirmed"] == 7  # unconfirmed if its settle died with it
    assert sorted((e["shard"], e["attempt"]) for e in ray_attempts if e["kept"]) == [(1, 1), (2, 2), (3, 1), (4, 1)]
    # The driver's oracle counts what its workers sent (the reference labels were cached by the local start).
    assert driver.queries == sum(e["queries"] + e["unconfirmed"] for e in ray_attempts)
    # Results count shard 2 once; what was sent counts the dead attempt too.
    assert m["shard_queries"] == reference["shard_queries"] and m["total_queries"] == reference["total_queries"]
    assert m["queries_discarded"] == 7 + next(e["queries"] for e in attempts(tmp_path) if not e["kept"]
                                              and e["executor"] == "local")
    assert m["queries_sent"] == m["total_queries"] + m["queries_discarded"]


def test_a_shard_failing_every_attempt_stops_the_run_and_keeps_the_others(ray_instance, digits_teacher, local_bd,
                                                                         tmp_path):
    from db3kd.data import load_split
    from db3kd.jobs.soft_labels import SoftLabelConfig, compute_soft_labels

    x, _ = load_split("digits", "train")
    executor = FaultyRay(digits_teacher, workers=2, max_retries=1,
                         fault=lambda job: DiesOnce(job, 4, tmp_path / "died", always=True))
    with pytest.raises(ExecutorError, match="shard 4 failed on all 2 attempts"):
        compute_soft_labels(open_oracle(digits_teacher), x, np.arange(40), SoftLabelConfig(method="bd", shard_size=8),
                            tmp_path / "run", {"teacher": str(digits_teacher), "dataset": "digits", "split": "train"},
                            progress=False, executor=executor)
    assert (tmp_path / "died").read_text() == "died\n" * 2
    assert sorted(p.name for p in (tmp_path / "run" / "shards").glob("*.npz")) == [f"0000{s}.npz" for s in range(4)]
    for s in range(4):  # shard files also hold their timings: compare the results
        a, b = load(local_bd / "shards" / f"0000{s}.npz"), load(tmp_path / "run" / "shards" / f"0000{s}.npz")
        for key in ("indices", "labels", "distances", "queries", "shard_queries"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"shard {s} {key}")


def test_synthesis_on_ray_equals_the_local_executors(ray_instance, digits_teacher, tmp_path):
    import torch

    from db3kd.jobs.synthesis import SynthesisConfig, synthesize

    config = dict(per_class=2, queries_per_sample=300, rounds=2, shard_size=10, draw_batch=200, seed=0)
    info = {"teacher": str(digits_teacher)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `db3kd synthesize` does for an ONNX teacher
    try:
        local = synthesize(open_oracle(digits_teacher), SynthesisConfig(**config), tmp_path / "local", info,
                           progress=False)
    finally:
        torch.set_num_threads(threads)
    driver = open_oracle(digits_teacher)
    on_ray = synthesize(driver, SynthesisConfig(**config), tmp_path / "ray", info, progress=False,
                        executor=RayExecutor(digits_teacher, workers=2))
    assert_same_arrays(tmp_path / "local" / "pseudo_samples.npz", tmp_path / "ray" / "pseudo_samples.npz")
    assert on_ray["shard_queries"] == local["shard_queries"] and len(local["shard_queries"]) == 2
    assert sum(on_ray["shard_queries"]) == on_ray["total_queries"] == on_ray["queries_sent"] == local["total_queries"]
    assert driver.queries == on_ray["queries_sent"]


def test_mixtures_on_ray_equal_the_local_executors(ray_instance, digits_teacher, tmp_path):
    from db3kd.jobs.mixtures import MixtureConfig, label_mixtures

    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    config = MixtureConfig(count=500, shard_size=200, max_shift=1)
    local = label_mixtures(open_oracle(digits_teacher), x, config, tmp_path / "local", {}, progress=False)
    driver = open_oracle(digits_teacher)
    on_ray = label_mixtures(driver, x, config, tmp_path / "ray", {}, progress=False,
                            executor=RayExecutor(digits_teacher, workers=2))
    assert_same_arrays(tmp_path / "local" / "mixtures.npz", tmp_path / "ray" / "mixtures.npz")
    assert on_ray["shard_queries"] == local["shard_queries"] == [200, 200, 100]
    assert on_ray["total_queries"] == on_ray["queries_sent"] == driver.queries == 500
    assert on_ray["executor"]["name"] == "ray" and local["executor"]["name"] == "local"


def test_workers_query_an_http_service_with_the_key(ray_instance, digits_teacher, local_bd, tmp_path):
    from test_http import ServerThread

    from db3kd.serve import create_app
    from db3kd.teachers import OnnxBackend

    key = "ray-test-key"
    server = ServerThread(create_app(OnnxBackend(digits_teacher), api_key=key)).start()
    try:
        assert soft_labels(server.url, tmp_path, *BD, "--api-key", key, "--executor", "ray", "--workers", "2") == 0
        served = server.service.images_served
    finally:
        server.stop()
    assert_same_arrays(local_bd / "soft_labels.npz", tmp_path / "soft_labels.npz")
    m = manifest(tmp_path)
    # The service labelled exactly what the run recorded as sent: driver's reference labels + workers' shards.
    assert served == m["queries_sent"] == m["total_queries"] == manifest(local_bd)["total_queries"]


def test_a_lost_driver_leaves_finished_shards_for_a_local_resume(ray_instance, digits_teacher, tmp_path):
    args = ["--method", "bd", "--subset", "48", "--shard-size", "4"]  # 12 shards, one at a time
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert soft_labels(digits_teacher, full, *args) == 0
    address = ray_instance.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "db3kd", "soft-labels", "--teacher", str(digits_teacher), "--dataset", "digits",
           "--out", str(killed), *args, "--executor", "ray", "--ray-address", address, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while not (killed / "shards" / "00000.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for a file, not sleeping to synchronise
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not (killed / "soft_labels.npz").exists()
    assert soft_labels(digits_teacher, killed, *args) == 0
    assert_same_arrays(full / "soft_labels.npz", killed / "soft_labels.npz")


def test_a_recipe_run_on_ray_equals_the_local_run(ray_instance, digits_teacher, tmp_path):
    """`db3kd run --executor ray`: the synthesize and soft-label stages on Ray, one executor for both; every
    stage's results equal the local run's, and its stage hashes too."""
    import yaml

    from db3kd.pipeline import run_recipe
    from db3kd.recipe import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "zs-ray", "dataset": {"name": "digits"}, "teacher": str(digits_teacher),
        "transfer": {"synthesize": {"per_class": 2, "queries_per_sample": 300, "rounds": 2, "shard_size": 10,
                                    "draw_batch": 200}},
        "soft_labels": {"bd": {"method": "bd", "params": {"queries_per_pair": 10}, "shard_size": 8}},  # 3 shards
        "students": {"arch": ["lenet5-fifth"], "seeds": [0], "train": {"epochs": 1, "batch_size": 16}},
        "baselines": ["ce"]}, sort_keys=False))
    run_recipe(load_recipe(recipe), tmp_path / "local", progress=False)
    assert main(["run", str(recipe), "--out", str(tmp_path / "ray"), "--quiet", "--executor", "ray",
                 "--workers", "2"]) == 0
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert_same_arrays(local / "synthesize" / "pseudo_samples.npz", ray / "synthesize" / "pseudo_samples.npz")
    assert_same_arrays(local / "soft_labels/bd/soft_labels.npz", ray / "soft_labels/bd/soft_labels.npz")
    for stage in ("synthesize", "soft_labels/bd"):
        m = manifest(ray / stage)
        assert m["executor"]["name"] == "ray" and m["executor"]["workers"] == 2
        assert m["executor"]["worker_queries"] == sum(m["shard_queries"]) > 0
        assert m["total_queries"] == manifest(local / stage)["total_queries"]
    assert len(manifest(ray / "soft_labels/bd")["shard_queries"]) == 3
    for stage in ("synthesize", "soft_labels/bd", "students/bd-lenet5-fifth-seed0", "students/ce-lenet5-fifth-seed0"):
        a, b = (json.loads((d / stage / "stage.json").read_text()) for d in (local, ray))
        assert a["hash"] == b["hash"] and a["teacher_queries"] == b["teacher_queries"], stage
        if stage.startswith("students/"):
            assert (a["test_accuracy"], a["fidelity"]) == (b["test_accuracy"], b["fidelity"]), stage
    assert yaml.safe_load((ray / "recipe.resolved.yaml").read_text())["executor"]["kind"] == "ray"
