"""Methods from outside the project: plugin forms, entry points, one-line errors, the README's worked example.

The command-line tests run the installed ``histreg-bench`` console script from a folder outside the project,
as an outside author would.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import conformance, registry

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPT = shutil.which("histreg-bench", path=str(Path(sys.executable).parent)) or shutil.which("histreg-bench")

OUTSIDE = '''
import numpy as np

from bench import Estimate, register
from bench.methods.sift import Sift


@register
class OutsideSift(Sift):
    """A built-in method under a new name, from a file outside the project."""

    name = "outside-sift"


@register
class Backwards(Sift):
    """The same, returning the inverse: moving and fixed swapped."""

    name = "outside-backwards"

    def estimate(self, fixed, moving, context):
        return Estimate(np.linalg.inv(super().estimate(fixed, moving, context).matrix))
'''


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    if SCRIPT is None:
        pytest.skip("the histreg-bench console script is not installed in this environment")
    return subprocess.run([SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def readme_example() -> str:
    """The first python block under the README's "Adding a method" heading."""
    text = README.read_text()
    section = text.split("\n## Adding a method\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def clean_registry(monkeypatch):
    """Plugins loaded in this process are forgotten afterwards (other tests list every method)."""
    registry.discover()  # the built-in methods first: they stay
    saved = (dict(registry._REGISTRY), dict(registry._PLUGINS), dict(registry._BROKEN), list(sys.path))
    modules = set(sys.modules)
    yield
    for target, value in zip((registry._REGISTRY, registry._PLUGINS, registry._BROKEN), saved[:3], strict=True):
        target.clear()
        target.update(value)
    sys.path[:] = saved[3]
    for name in set(sys.modules) - modules:
        if name.startswith("bench_plugin_") or name.startswith("plugin_mod_"):
            del sys.modules[name]


# --------------------------------------------------------------------------------------------------
# in this process


def test_a_file_plugin_loads_once_under_a_stable_name(tmp_path, clean_registry):
    f = tmp_path / "plugin_file.py"
    f.write_text(OUTSIDE)
    first = registry.load_plugin(str(f))
    assert {c.name for c in first} == {"outside-sift", "outside-backwards"}
    cls = registry.get("outside-sift")
    assert cls.__module__ == registry.plugin_module_name(f)
    registry.discover([str(f)])  # again (as a worker does): no duplicate-name error
    registry.discover([f"{tmp_path}/./plugin_file.py"])  # another spelling of the same file
    assert registry.get("outside-sift") is cls


def test_module_and_class_forms(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "plugin_mod_a.py").write_text(
        "from bench.methods.identity import Identity\n\n"
        "class Unregistered(Identity):\n    name = 'outside-unregistered'\n"
    )
    monkeypatch.chdir(tmp_path)  # a module in the current folder, as `python -m` would find it
    with pytest.raises(registry.UnknownMethodError):
        registry.get("outside-unregistered")
    registry.load_plugin("plugin_mod_a")  # the module alone registers nothing (no @register)
    with pytest.raises(registry.UnknownMethodError):
        registry.get("outside-unregistered")
    registry.load_plugin("plugin_mod_a:Unregistered")  # module:Class registers the class
    assert registry.get("outside-unregistered").__name__ == "Unregistered"
    with pytest.raises(registry.PluginError, match="already registered by plugin_mod_a.Unregistered"):
        registry.load_plugin(f"{tmp_path / 'plugin_mod_a.py'}:Unregistered")  # the file: another module, a clash
    assert registry.get("outside-unregistered").__module__ == "plugin_mod_a"  # the first one stays


@pytest.mark.parametrize(("source", "spec", "words"), [
    ("import no_such_dependency_xyz\n", "{file}", ["plugin_bad.py", "ModuleNotFoundError", "no_such_dependency_xyz"]),
    ("x = 1\nundefined_name\n", "{file}", ["plugin_bad.py", "NameError", "line 2"]),
    ("def broken(:\n", "{file}", ["plugin_bad.py", "SyntaxError", "line 1"]),
    ("x = 1\n", "{file}:Missing", ["has no attribute 'Missing'"]),
    ("x = 1\n", "{file}:x", ["not a bench.Method subclass"]),
    ("", "{dir}/nothere.py", ["no such file"]),
    ("", "no_such_plugin_module_xyz", ["no_such_plugin_module_xyz", "no module or file"]),
])
def test_a_broken_plugin_is_one_clear_error(tmp_path, clean_registry, source, spec, words):
    f = tmp_path / "plugin_bad.py"
    f.write_text(source)
    with pytest.raises(registry.PluginError) as info:
        registry.load_plugin(spec.format(file=f, dir=tmp_path))
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)
    assert isinstance(info.value, registry.UnknownMethodError)  # what the runner maps to an error line


def test_entry_points_accept_module_and_module_class(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "plugin_mod_ep.py").write_text(
        "from bench import register\nfrom bench.methods.identity import Identity\n\n"
        "@register\nclass Decorated(Identity):\n    name = 'outside-decorated'\n\n"
        "class Plain(Identity):\n    name = 'outside-plain'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("a", "plugin_mod_ep", "bench.methods"),
           importlib.metadata.EntryPoint("b", "plugin_mod_ep:Plain", "bench.methods"),
           importlib.metadata.EntryPoint("c", "plugin_mod_missing_xyz:Thing", "bench.methods")]
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group: [e for e in eps if e.group == group])
    registry.load_entry_points()
    assert registry.get("outside-decorated").__name__ == "Decorated"
    assert registry.get("outside-plain").__name__ == "Plain"
    (key, reason), = [(k, v) for k, v in registry._BROKEN.items() if "plugin_mod_missing_xyz" in k]
    assert key == "entry point c = plugin_mod_missing_xyz:Thing" and "no module" in reason


# --------------------------------------------------------------------------------------------------
# through the installed console script, from a folder outside the project


def test_readme_example_passes_check_from_another_folder(tmp_path):
    f = tmp_path / "phasecorr.py"
    f.write_text(readme_example())
    out = _cli("check", "phasecorr", "--plugin", str(f), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len([x for x in lines if x.startswith("  ")]) == len(conformance.CHECKS)  # one line per check
    assert any(re.match(r"\s+known limit\s+recovers_known_transform .*declared: estimates a translation", x)
               for x in lines), out.stdout
    assert "0 failed" in out.stdout


def test_check_passes_a_subclass_and_fails_its_inverse(tmp_path):
    (tmp_path / "outside.py").write_text(OUTSIDE)
    good = _cli("check", "outside-sift", "--plugin", "outside.py", cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _cli("check", "outside-backwards", "--plugin", str(tmp_path / "outside.py"), cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    failed = [x for x in bad.stdout.splitlines() if x.strip().startswith("FAIL")]
    assert any("recovers_translation" in x and "swapped" in x for x in failed), bad.stdout


@pytest.mark.slow
def test_run_with_a_file_plugin_in_worker_processes(tmp_path, tiny_table):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "outside.py").write_text(OUTSIDE)
    out = _cli("run", "--plugin", "outside.py", "--methods", "outside-sift,identity", "--dataset", str(tiny_table),
               "--out", str(tmp_path / "run"), "--workers", "2", "--no-cache", cwd=folder)
    assert out.returncode == 0, out.stdout + out.stderr
    import pandas as pd

    rows = pd.read_csv(tmp_path / "run" / "results.csv")
    assert sorted(rows["method"].unique()) == ["identity", "outside-sift"]
    assert len(rows) == 6


@pytest.mark.parametrize("command", ["list", "check", "run"])
def test_a_broken_plugin_is_one_error_line_on_the_command_line(tmp_path, tiny_table, command):
    (tmp_path / "broken.py").write_text("import numpy\nraise RuntimeError('this plugin is broken')\n")
    args = {"list": ["list"], "check": ["check", "identity"],
            "run": ["run", "--methods", "identity", "--dataset", str(tiny_table), "--out", str(tmp_path / "out")]}
    out = _cli(*args[command], "--plugin", "broken.py", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), out.stderr
    assert "broken.py" in errors[0] and "RuntimeError: this plugin is broken" in errors[0], errors[0]


def test_list_fits_80_columns_and_list_name_describes_every_parameter(tmp_path):
    import os

    env = {**os.environ, "COLUMNS": "80"}
    if SCRIPT is None:
        pytest.skip("the histreg-bench console script is not installed in this environment")
    out = subprocess.run([SCRIPT, "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["name", "kind", "version", "available", "description"]
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]
    for name in registry.names():
        assert any(x.split()[:2] == [name, registry.get(name).kind] for x in lines[1:]), name
    table = lines[1:1 + len(registry.names())]
    assert {x.split()[1] for x in table} == {"affine", "nonrigid"}
    one = subprocess.run([SCRIPT, "list", "sift"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr
    assert all(len(x) <= 80 for x in one.stdout.splitlines())
    assert "  ratio: float = 0.9" in one.stdout
    assert "Lowe's ratio test" in one.stdout  # the field's # comment
    params = [x.split(":")[0].strip() for x in one.stdout.splitlines() if re.match(r"  \w+: ", x)]
    import dataclasses

    assert params == [f.name for f in dataclasses.fields(registry.get("sift").Params)]
    limits = subprocess.run([SCRIPT, "list", "identity"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert "recovers_known_transform: returns the identity by design" in limits.stdout
