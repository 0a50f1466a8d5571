"""Run the doctests of the pure modules under their installed names (bench.*, bench.datasets.*)."""

import doctest
import importlib

import pytest

MODULES = ["bench.geometry", "bench.metrics", "bench.datasets.anhir", "bench.method", "bench.report.tables",
           "bench.report.stats", "bench.methods.learned", "bench.methods._features"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
    if name != "bench.method":
        assert result.attempted > 0, f"{name} has no doctests"
