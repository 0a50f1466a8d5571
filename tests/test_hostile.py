"""Hostile inputs against composition, ``check`` and ``--plugin``: each promise the harness makes holds (one clear
``error:`` line or a failed check, never a traceback, a hang, a duplicate row or a false success)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import expression, factory
from bench.method import make_params
from bench.runner import RunConfig, run

HOSTILE_METHODS = '''
import os
import sys
import time

from bench import Method, register


@register
class Exit0(Method):
    name = "exit0"
    description = "calls sys.exit(0) in estimate"

    def estimate(self, fixed, moving, context):
        sys.exit(0)


@register
class OsExit(Method):
    name = "osexit"
    description = "ends its process with os._exit(3) in estimate"

    def estimate(self, fixed, moving, context):
        os._exit(3)


@register
class Sleeper(Method):
    name = "sleeper"
    description = "never returns"

    def estimate(self, fixed, moving, context):
        time.sleep(10_000)
'''


def _bench(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("spellings", [
    "preprocessed|sift,preprocessed | sift",
    "(preprocessed|sift), preprocessed|(sift)",
    "preprocessed>iterative,(preprocessed)>(iterative)",
])
def test_equivalent_spellings_are_one_method(spellings):
    chosen = factory.select(spellings).chosen
    assert len(chosen) == 1


def test_equivalent_spellings_write_one_row_per_pair(tiny_table, tmp_path):
    out = tmp_path / "run"
    config = dict(dataset=tiny_table, methods="preprocessed|sift,preprocessed | sift", cache_enabled=False,
                  device="cpu", limit=1, out=out)
    assert run(RunConfig(**config)).written == 1
    assert run(RunConfig(**config)).written == 0  # the rerun recognises the row: nothing refused, nothing new


def test_deep_parentheses_are_a_composition_error_not_a_recursion_error():
    deep = "(" * 400 + "sift" + ")" * 400
    with pytest.raises(expression.CompositionError, match="nested deeper than"):
        expression.parse(deep)
    assert expression.parse("(" * expression.MAX_DEPTH + "sift|surf" + ")" * expression.MAX_DEPTH).label() == "sift|surf"


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_a_non_finite_parameter_is_refused(value):
    cls = factory.resolve("preprocessed|sift")
    with pytest.raises(ValueError, match="not a finite number"):
        make_params(cls.Params, {"accept": value}, owner=cls.name)
    with pytest.raises(ValueError, match="not a finite number"):
        make_params(cls.Params, {"accept": float(value)}, owner=cls.name)


# ---------------------------------------------------------------- plugins that end the process


def test_a_plugin_that_exits_at_import_is_one_error_line(tmp_path, tiny_table):
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit(0)\n")
    for args in (["check", "identity"], ["list"],
                 ["run", "--dataset", str(tiny_table), "--methods", "identity", "--limit", "1",
                  "--out", str(tmp_path / "run")]):
        proc = _bench(*args, "--plugin", "quitter.py", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        line = _one_error_line(proc)
        assert "quitter.py" in line and "sys.exit(0)" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- check: every check ran and passed, or non-zero


@pytest.mark.parametrize(("method", "said"), [("exit0", "crashed: called sys.exit(0)"),
                                              ("osexit", "crashed: its process exited with code 3")])
def test_check_of_a_method_that_ends_its_process_fails_every_call_check(tmp_path, method, said):
    (tmp_path / "hostile.py").write_text(HOSTILE_METHODS)
    proc = _bench("check", method, "--plugin", "hostile.py", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("8 checks: 1 passed, 0 known limit(s), 7 failed"), proc.stdout
    assert sum(said in line for line in lines) == 7  # every check that calls estimate; metadata passes
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_of_a_method_that_hangs_is_bounded(tmp_path):
    (tmp_path / "hostile.py").write_text(HOSTILE_METHODS)
    t0 = time.monotonic()
    proc = _bench("check", "sleeper", "--plugin", "hostile.py", "--timeout", "2", cwd=tmp_path, timeout=240)
    assert proc.returncode == 1
    assert sum("timeout: did not finish within 2 s" in line for line in proc.stdout.splitlines()) == 7
    assert time.monotonic() - t0 < 200  # 7 checks of 2 s, plus the starts of their processes


def test_check_timeout_must_be_positive(tmp_path):
    proc = _bench("check", "identity", "--timeout", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--timeout" in _one_error_line(proc)
