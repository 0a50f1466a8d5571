"""Hostile inputs against composition, ``check``, ``--plugin``, resume, the report and ``import-anhir``: each promise the harness makes holds (one clear
``error:`` line or a failed check, never a traceback, a hang, a duplicate row or a false success)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import conformance, expression, factory, record
from bench.anhir_import import import_anhir
from bench.method import make_params
from bench.pairs import DatasetError, load_table, read_landmarks
from bench.report import export_anhir
from bench.runner import RunConfig, run
from bench.store import ResultStore, warped_path


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


@pytest.mark.parametrize(("method", "said"), [("fault-exit", "crashed: called sys.exit(3)"),
                                              ("fault-os-exit", "crashed: its process exited with code 4")])
def test_check_of_a_method_that_ends_its_process_fails_every_call_check(tmp_path, faulty, method, said):
    proc = _bench("check", method, "--plugin", faulty[0], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    n = len(conformance.CHECKS)
    assert lines[-1].startswith(f"{n} checks: 1 passed, 0 known limit(s), {n - 1} failed"), proc.stdout
    assert sum(said in line for line in lines) == n - 1  # every check that calls estimate; metadata passes
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_of_a_method_that_hangs_is_bounded(tmp_path, faulty):
    t0 = time.monotonic()
    proc = _bench("check", "fault-hang", "--plugin", faulty[0], "--timeout", "2", cwd=tmp_path, timeout=240)
    assert proc.returncode == 1
    n = len(conformance.CHECKS) - 1  # every check but metadata calls estimate
    assert sum("timeout: did not finish within 2 s" in line for line in proc.stdout.splitlines()) == n
    assert time.monotonic() - t0 < 200  # n checks of 2 s, plus the starts of their processes


def test_check_timeout_must_be_positive(tmp_path):
    proc = _bench("check", "identity", "--timeout", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--timeout" in _one_error_line(proc)


# ---------------------------------------------------------------- shared: a small real run folder


def _identity_run(table: Path, out: Path, limit: int | None = None) -> Path:
    summary = run(RunConfig(dataset=table, methods="identity", cache_enabled=False, device="cpu", limit=limit,
                            out=out))
    assert summary.written > 0
    return out


def _with_ids(table: Path, ids: list[str]) -> Path:
    """``table`` with its pair index column replaced by ``ids`` (written with CSV quoting)."""
    with table.open(newline="") as fh:
        rows = list(csv.reader(fh))
    for row, pid in zip(rows[1:], ids, strict=True):
        row[0] = pid
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return table


# ---------------------------------------------------------------- resume: pair ids compared as stored


def test_pair_ids_with_whitespace_runs_resume_as_stored(tiny_table, tmp_path):
    _with_ids(tiny_table, ["a  b", "c\nd", " e \t f "])
    pairs = load_table(tiny_table)
    assert [p.pair_id for p in pairs] == ["a b", "c d", "e f"]  # planned in the form the store writes
    out = tmp_path / "run"
    config = dict(dataset=tiny_table, methods="identity", cache_enabled=False, device="cpu", out=out)
    assert run(RunConfig(**config)).written == 3
    for _ in range(2):  # the second and third runs recognise every row: nothing new, nothing refused
        again = run(RunConfig(**config))
        assert (again.written, again.already) == (0, 3)
    rows = record.read_rows(out / record.RESULTS)
    assert sorted(r["pair_id"] for r in rows) == ["a b", "c d", "e f"]
    for p in pairs:  # the warped landmarks sit where the report looks for them
        assert warped_path(out, "identity", p.pair_id).is_file()


def test_pair_ids_equal_up_to_whitespace_are_one_duplicate(tiny_table):
    _with_ids(tiny_table, ["a  b", "a\nb", "c"])
    with pytest.raises(DatasetError, match="duplicate pair index 'a b' .*whitespace run as one space"):
        load_table(tiny_table)


# ---------------------------------------------------------------- report: file names from method names bounded


def test_report_of_a_300_member_chain_has_bounded_file_names(tiny_table, tmp_path):
    out = _identity_run(tiny_table, tmp_path / "run")
    chain = "|".join(["sift", "surf", "iterative"] * 100)  # a 300-member fallback chain: ~4,000 characters
    rows = record.read_rows(out / record.RESULTS)
    with ResultStore(out).lock("test") as store:  # the row written through the record's Row and the store
        (out / record.RESULTS).unlink()
        store.append([record.Row(**{**r, "method": chain}) for r in rows])
        for r in rows:
            store.write_warped(chain, r["pair_id"], read_landmarks(warped_path(out, "identity", r["pair_id"])))
        manifest = store.read_manifest()
        manifest["methods"] = {chain: manifest["methods"]["identity"]}
        store.write_manifest(manifest)
    proc = _bench("report", "--run", str(out), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [p.name for p in (tmp_path / "report").rglob("*")] + [p.name for p in out.rglob("*")]
    assert max(len(n.encode()) for n in names) <= 160
    assert any(n.startswith("worst_") for n in names)


def test_report_refuses_junk_and_duplicated_rows_with_one_error_line(tiny_table, tmp_path):
    out = _identity_run(tiny_table, tmp_path / "run")
    lines = (out / record.RESULTS).read_text().splitlines()
    for extra, said in ((lines[1], "a second row for pair"), ("not,a,result,row", "not a result row")):
        (out / record.RESULTS).write_text("\n".join([*lines, extra]) + "\n")
        proc = _bench("report", "--run", str(out), "--out", str(tmp_path / "report"), cwd=tmp_path)
        assert proc.returncode == 2
        assert said in _one_error_line(proc)


# ---------------------------------------------------------------- import-anhir: scope, paths, --replace


def _submission(tiny_table: Path, tmp_path: Path) -> Path:
    """An ANHIR submission of every pair of ``tiny_table`` (identity's rows, exported)."""
    full = _identity_run(tiny_table, tmp_path / "full")
    return export_anhir(full, "identity", tmp_path / "sub") / "registration-results.csv"


def _import(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _bench("import-anhir", *args, cwd=cwd)


def test_import_takes_the_runs_own_pairs_only_and_says_what_it_ignored(tiny_table, tmp_path):
    table = _submission(tiny_table, tmp_path)
    small = _identity_run(tiny_table, tmp_path / "small", limit=1)
    assert record.read_manifest(small / record.MANIFEST)["dataset"]["pairs"] == ["0"]  # the plan is recorded
    proc = _import(str(table), "--run", str(small), "--method", "outside", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ignored 2 submission row(s) for pairs not in the run's plan (1, 2)" in proc.stderr
    rows = [r for r in record.read_rows(small / record.RESULTS) if r["method"] == "outside"]
    assert [r["pair_id"] for r in rows] == ["0"]
    assert not warped_path(small, "outside", "1").exists()
    # a folder written before the plan was recorded: its rows' pairs are the run's pairs
    manifest = record.read_manifest(small / record.MANIFEST)
    del manifest["dataset"]["pairs"]
    (small / record.MANIFEST).write_text(json.dumps(manifest))
    summary = import_anhir(small, "outside", table, replace=True)
    assert summary.ignored == ["1", "2"] and summary.counts == {"ok": 1} and summary.replaced == 1


def test_import_confines_paths_to_the_submission_folder_and_never_echoes_files(tiny_table, tmp_path):
    table = _submission(tiny_table, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET-LINE\n")
    sub = pd.read_csv(table, dtype=str, keep_default_na=False)
    sub.loc[0, "Warped source landmarks"] = "../" * 12 + "etc/passwd"
    sub.loc[1, "Warped source landmarks"] = str(secret)  # absolute, outside the submission folder
    (table.parent / "garbage.csv").write_text("root:x:0:0:SECRET-LINE\nmore SECRET-LINE\n")
    sub.loc[2, "Warped source landmarks"] = "garbage.csv"
    sub.to_csv(table, index=False)
    out = _identity_run(tiny_table, tmp_path / "run")
    summary = import_anhir(out, "outside", table)
    assert summary.counts == {"failed": 3}
    rows = {r["pair_id"]: r for r in record.read_rows(out / record.RESULTS) if r["method"] == "outside"}
    for pid in ("0", "1"):
        assert "'Warped source landmarks'" in rows[pid]["error"]
        assert "leaves the submission folder" in rows[pid]["error"]
    assert "garbage.csv: not a landmark table: bad landmark header" in rows["2"]["error"]
    text = (out / record.RESULTS).read_text()
    assert "SECRET-LINE" not in text and "root:" not in text


def test_replace_is_limited_to_imported_methods(tiny_table, tmp_path):
    table = _submission(tiny_table, tmp_path)
    out = _identity_run(tiny_table, tmp_path / "run")
    before = (out / record.RESULTS).read_text()
    proc = _import(str(table), "--run", str(out), "--method", "identity", "--replace", cwd=tmp_path)
    assert proc.returncode == 2
    assert "measured by this run" in _one_error_line(proc)
    assert (out / record.RESULTS).read_text() == before  # the measured rows are kept
    assert import_anhir(out, "outside", table).counts == {"ok": 3}
    again = import_anhir(out, "outside", table, replace=True)  # an imported method is replaced
    assert again.replaced == 3


def test_all_combines_with_named_methods_once():
    chosen = [c.name for c in factory.select("all,learned>affine-io,sift").chosen]
    assert chosen[-1] == "learned>affine-io" and chosen.count("sift") == 1
    assert all(factory.resolve(n).kind == "affine" for n in chosen)
