"""How a teacher is asked and what it costs: `--concurrency`, `--max-rps`, `--price-per-1000` and `--budget-usd`
on every command that takes `--teacher`, through `TeacherSpec` to the backends and the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from db3kd.cli import build_parser
from db3kd.cli.common import teacher_spec
from db3kd.errors import BudgetExceededError, ConfigError, InputError
from db3kd.oracle import LabelOracle, open_oracle, queries_for_usd
from db3kd.serve import create_app
from db3kd.teachers import TeacherSpec
from test_http import ServerThread, teacher  # noqa: F401 (a fixture)

TEACHER_COMMANDS = [["soft-labels", "--dataset", "digits", "--method", "bd", "--out", "o"],
                    ["synthesize", "--per-class", "2", "--out", "o"],
                    ["distill", "--transfer", "t", "--student", "lenet5", "--dataset", "digits", "--out", "o"],
                    ["train-student", "--dataset", "digits", "--out", "o"]]


def parse(command: list[str], *extra: str):
    return build_parser().parse_args([*command, *extra])


@pytest.mark.parametrize("command", TEACHER_COMMANDS, ids=lambda c: c[0])
def test_every_teacher_command_takes_the_options(command):
    args = parse(command, "--teacher", "http://127.0.0.1:9", "--concurrency", "8", "--max-rps", "20",
                 "--price-per-1000", "1.5", "--budget-usd", "3")
    spec = teacher_spec(args)
    assert (spec.kind, spec.concurrency, spec.max_rps, spec.price_per_1000, spec.budget_usd) == ("http", 8, 20.0, 1.5,
                                                                                               3.0)


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "model.onnx", "--concurrency", "4"], r"--concurrency: applies to a label service, a V2 server or a "
                                                        r"Python teacher, not to the onnx file model.onnx"),
    (["--teacher", "model.pt", "--max-rps", "5"], r"--max-rps: applies to .* not to the torch file model.pt"),
    (["--teacher", "http://h:1", "--concurrency", "0"], r"--concurrency: expected a positive integer, got 0"),
    (["--teacher", "http://h:1", "--max-rps", "-1"], r"--max-rps: expected a positive number of requests per second"),
    (["--teacher", "http://h:1", "--max-rps", "inf"], r"--max-rps: expected a positive number"),
    (["--teacher", "http://h:1", "--price-per-1000", "nan"], r"--price-per-1000: expected a positive number of USD"),
    (["--teacher", "http://h:1", "--price-per-1000", "0"], r"--price-per-1000: expected a positive number of USD"),
    (["--teacher", "http://h:1", "--price-per-1000", "1", "--budget-usd", "-2"],
     r"--budget-usd: expected a non-negative number of USD, got -2.0"),
    (["--teacher", "http://h:1", "--budget-usd", "10"], r"--budget-usd: needs the teacher's price \(--price-per-1000, "
                                                        r"USD per 1000 images\)"),
    (["--concurrency", "2"], r"--concurrency applies to a teacher: give --teacher too"),
])
def test_bad_teacher_options_name_the_flag(extra, message):
    with pytest.raises(ConfigError, match=message):
        teacher_spec(parse(TEACHER_COMMANDS[3], *extra))


def test_file_teachers_take_a_price():
    spec = teacher_spec(parse(TEACHER_COMMANDS[1], "--teacher", "m.onnx", "--price-per-1000", "2", "--budget-usd", "1"))
    assert (spec.price_per_1000, spec.budget_usd, spec.concurrency) == (2.0, 1.0, None)


@pytest.mark.parametrize("usd, price, queries", [(0.3, 0.1, 3000), (1, 0.5, 2000), (10, 3, 3333), (0, 1, 0),
                                                 (0.07, 0.007, 10000), (2.5, 0.4, 6250)])
def test_a_money_budget_is_exact_on_the_decimals_written(usd, price, queries):
    assert queries_for_usd(usd, price) == queries


def test_a_money_budget_needs_a_price():
    with pytest.raises(InputError, match=r"a budget of 5 USD needs the teacher's price: pass price_per_1000 "
                                         r"\(--price-per-1000 on the command line\)"):
        queries_for_usd(5, None)


def counting_teacher():
    def labels(batch):
        return np.zeros(len(batch), dtype=np.int64)

    labels.input_shape, labels.num_classes, labels.bounds = (1, 2, 2), 3, (0.0, 1.0)
    return labels


def test_the_oracle_turns_a_money_budget_into_queries_and_shows_the_cost():
    oracle = open_oracle(counting_teacher(), price_per_1000=0.25, budget_usd=0.01)  # 40 queries
    assert (oracle.budget, oracle.price_per_1000, oracle.price_per_query) == (40, 0.25, 0.00025)
    oracle.labels(np.zeros((30, 1, 2, 2), np.float32))
    assert oracle.cost_usd == pytest.approx(0.0075)
    with pytest.raises(BudgetExceededError, match=r"30 of 40 queries used, this call needs 11 more"):
        oracle.labels(np.zeros((11, 1, 2, 2), np.float32))
    # The smaller of the two budgets holds.
    assert open_oracle(counting_teacher(), budget=25, price_per_1000=0.25, budget_usd=0.01).budget == 25
    assert open_oracle(counting_teacher(), budget=99, price_per_1000=0.25, budget_usd=0.01).budget == 40
    unpriced = LabelOracle(open_oracle(counting_teacher())._backend)
    assert unpriced.price_per_query is None and unpriced.cost_usd is None


def test_a_spec_carries_its_price_and_money_budget_to_the_oracle(teacher):
    running = ServerThread(create_app(teacher, max_batch=16)).start()
    try:
        spec = TeacherSpec.parse(running.url).with_options(concurrency=3, max_rps=1000.0, price_per_1000=2.0,
                                                           budget_usd=0.1)
        assert hash(spec) == hash(TeacherSpec.parse(running.url).with_options(concurrency=3, max_rps=1000.0,
                                                                                 price_per_1000=2.0, budget_usd=0.1))
        oracle = open_oracle(spec, budget=1000)
        assert (oracle.budget, oracle.price_per_1000) == (50, 2.0)
        assert (oracle._backend.concurrency, oracle._backend.max_rps, oracle.chunk_size) == (3, 1000.0, 48)
        oracle.labels(np.random.default_rng(0).random((50, 1, 28, 28), dtype=np.float32))
        assert oracle.queries == running.service.images_served == 50 and oracle.cost_usd == pytest.approx(0.1)
        oracle._backend.close()
    finally:
        running.stop()
