"""Run the doctests of every module of the package, found by walking it (no hand-kept list).

Modules are imported under their installed names (``bench.*``, ``bench.methods.*``, ``bench.datasets.*``),
so a new module's examples run without editing this file.
"""

import doctest
import importlib
import pkgutil

import pytest

SKIP = {"bench.__main__"}  # importing it runs the command line


ROOTS = ("bench", "bench.methods", "bench.datasets")  # the last two live elsewhere in a checkout (package-dir)


def _modules() -> list[str]:
    names = set(ROOTS)
    for root in ROOTS:
        package = importlib.import_module(root)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."))
    return sorted(names - SKIP)


MODULES = _modules()


def test_discovery_finds_every_package():
    for name in ("bench.geometry", "bench.report.tables", "bench.learning.model", "bench.methods.learned",
                 "bench.methods._features", "bench.pairs", "bench.conformance"):
        assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
