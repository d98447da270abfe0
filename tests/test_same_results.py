"""The upper layer was rebuilt without changing a result: a recipe run's soft labels, pseudo samples, mixtures
and students, and the demo's table, equal those of the code before (tests/same_results.py says what is
compared; tests/data/same_results.json holds the reference, made by the earlier code on this machine class)."""

from __future__ import annotations

import json

import pytest
import torch

from same_results import REFERENCE, fingerprint


@pytest.fixture
def two_torch_threads():
    """The reference was made with torch on 2 threads; another count may round training sums differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_recipes_and_demo_give_the_reference_results(tmp_path, two_torch_threads):
    expected = json.loads(REFERENCE.read_text())
    got = json.loads(json.dumps(fingerprint(tmp_path)))  # tuples -> lists, as in the file
    assert got["data"] == expected["data"]
    assert got["zero-shot"] == expected["zero-shot"]
    assert got["demo"] == expected["demo"]
