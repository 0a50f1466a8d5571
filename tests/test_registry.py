"""The registry: discovery, did-you-mean, duplicates, availability, typed parameters, namespacing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from bench import Method, factory, registry
from bench.method import make_params


def test_builtin_baselines_registered():
    assert {"identity", "preprocessed"} <= set(registry.names())
    assert not registry.get("identity").uses_preprocessing
    assert registry.get("preprocessed").uses_preprocessing


def test_unknown_name_suggests_close_match():
    with pytest.raises(registry.UnknownMethodError, match="did you mean 'identity'"):
        registry.get("identiy")


def test_duplicate_name_refused():
    class Other(Method):
        name = "identity"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other)


def test_select_all_skips_unavailable_with_reason():
    @registry.register
    class NeedsMissing(Method):
        name = "test-needs-missing"
        requires = ("no_such_module_xyz",)

    try:
        sel = factory.select("all")
        assert "test-needs-missing" in sel.skipped
        assert "no_such_module_xyz" in sel.skipped["test-needs-missing"]
        assert NeedsMissing not in sel.chosen
        with pytest.raises(registry.UnknownMethodError, match="unavailable"):
            factory.select("test-needs-missing")
    finally:
        registry._REGISTRY.pop("test-needs-missing")


@dataclass(frozen=True)
class _P:
    ratio: float = 0.8
    n: int = 3
    flag: bool = False
    mode: str = "a"
    size: int | None = None


def test_params_are_typed_from_strings():
    p = make_params(_P, {"ratio": "0.5", "n": "7", "flag": "true", "mode": "b", "size": "none"})
    assert p == _P(0.5, 7, True, "b", None)
    with pytest.raises(ValueError, match="did you mean 'ratio'"):
        make_params(_P, {"ration": "1"})
    with pytest.raises(ValueError, match="not a valid int"):
        make_params(_P, {"n": "x"})


def test_methods_and_datasets_are_not_top_level_names(tmp_path):
    """Installed, the project's `methods`/`datasets` live under `bench.` and shadow nothing."""
    from pathlib import Path

    import bench

    repo = Path(bench.__file__).resolve().parents[1]
    code = (
        "import importlib.util, bench.methods, bench.datasets;"
        "print(bench.methods.__name__, bench.datasets.__name__);"
        "[print(getattr(importlib.util.find_spec(n), 'origin', None)) for n in ('methods', 'datasets')]"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "bench.methods bench.datasets"
    for origin in lines[1:3]:  # None, or somebody else's package (e.g. Hugging Face datasets)
        assert origin == "None" or not Path(origin).resolve().is_relative_to(repo), origin


@pytest.mark.parametrize("bad", ["", "Upper", "two words", "a,b", "a|b", "a:b"])
def test_method_names_are_one_lower_case_word(bad):
    class Bad(Method):
        name = bad

    with pytest.raises(ValueError, match="lower-case word"):
        registry.register(Bad)


def test_plugin_error_is_an_unknown_method_error():
    """The runner turns registry errors into one error line; a plugin's import error is one of them."""
    with pytest.raises(registry.UnknownMethodError, match="no_such_plugin_xyz"):
        registry.discover(["no_such_plugin_xyz"])
