"""Fault-proof runs: misbehaving methods, concurrent runs, interrupts, killed parents, hostile ids and options.

Every misbehaving method lives in a plugin module written to a temporary folder (the calls run in worker
processes, which import it). Time limits are short so the suite stays fast; no test asserts on wall time
beyond generous bounds for a process to end.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.pairs import load_table
from bench.record import caused_by_run
from bench.runner import RunConfig, RunError, run
from bench.store import ResultStore, StoreError, safe_name, warped_path


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _keys(rows):
    return [(r["pair_id"], r["method"]) for r in rows]


def _run(table, out, methods, **kw):
    return run(RunConfig(dataset=table, out=out, methods=methods, cache_enabled=False, device="cpu", **kw))


FAULTS = [  # method, expected status, words in the error, retried on rerun
    ("fault-hang", "timeout", "first (warm-up) call exceeded the time limit", True),
    ("fault-native-hang", "timeout", "did not return", True),
    ("fault-segv", "failed", "SIGSEGV", True),
    ("fault-exit", "failed", "sys.exit(3)", True),
    ("fault-os-exit", "failed", "exited with code 4", True),
    ("fault-diagnostics", "failed", "not JSON-serialisable", False),
    ("fault-zero", "failed", "singular matrix", False),
    ("fault-nan", "failed", "non-finite", False),
]


@pytest.mark.parametrize("method,status,words,retried", FAULTS, ids=[f[0] for f in FAULTS])
def test_misbehaving_method_becomes_its_row(tiny_table, tmp_path, faulty, method, status, words, retried):
    """One row per (pair, method); identity, after the fault in the same worker, still ok; a rerun finishes
    and retries only the run's own failures."""
    out = tmp_path / "run"
    summary = _run(tiny_table, out, f"{method},identity", timeout_s=1, plugins=faulty, limit=2)
    rows = _rows(out)
    assert sorted(_keys(rows)) == sorted((p, m) for p in "01" for m in (method, "identity"))
    for r in rows:
        if r["method"] == "identity":
            assert r["status"] == "ok", r
        else:
            assert r["status"] == status and words in r["error"], r
            assert "\n" not in r["error"] and r["fallback"] == "True" and r["rtre_median"]  # scored fallback
            assert caused_by_run(r["status"], r["error"]) == retried
    assert summary.problems[(method, status)][0] == 2
    again = _run(tiny_table, out, f"{method},identity", timeout_s=1, plugins=faulty, limit=2)
    assert sorted(_keys(_rows(out))) == sorted(_keys(rows))  # still exactly one row per key
    assert again.retried == (2 if retried else 0) and again.written == again.retried


def test_cli_run_with_faults_finishes(tiny_table, tmp_path, faulty):
    """The issue's check, through the command line: the run ends 0 without a traceback, the end names the
    non-ok rows."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out), "--no-cache",
           "--device", "cpu", "--plugin", faulty[0], "--limit", "1", "--timeout", "1",
           "--methods", "fault-hang,fault-segv,fault-exit,fault-diagnostics,fault-zero,identity"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert "fault-segv: 1 failed; first: crashed: the worker process was killed by SIGSEGV" in text
    assert "fault-hang: 1 timeout" in text
    assert len(_rows(out)) == 6


def test_two_runs_on_one_folder_never_duplicate(tiny_table, tmp_path, faulty):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out), "--no-cache",
           "--device", "cpu", "--plugin", faulty[0], "--methods", "fault-sleepy,identity"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=120) for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], outs
    refused = outs[[first.returncode, second.returncode].index(2)][1]
    other = first.pid if second.returncode == 2 else second.pid
    assert f"is in use by process {other}" in " ".join(refused.split())
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0
    keys = _keys(_rows(out))
    assert len(keys) == len(set(keys)) == 6


def test_stale_lock_of_a_killed_run_is_recovered(tiny_table, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bench.store import ResultStore\n"
        f"s = ResultStore({str(out)!r})\n"
        "with s.lock('holder'):\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
        _run(tiny_table, out, "identity")
    holder.kill()
    holder.wait()
    _run(tiny_table, out, "identity")  # the kernel dropped the dead holder's lock
    assert len(_rows(out)) == 3


def test_hostile_pair_ids_stay_inside_out(tiny_table, tmp_path):
    lines = tiny_table.read_text().splitlines()
    ids = ["../../escape_x", "a/b", "a%2Fb"]
    lines[1:4] = [ids[i] + line[line.index(","):] for i, line in enumerate(lines[1:4])]
    tiny_table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "deep" / "run"
    _run(tiny_table, out, "identity")
    rows = _rows(out)
    assert sorted(r["pair_id"] for r in rows) == sorted(ids) and {r["status"] for r in rows} == {"ok"}
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "escape" in p.name)
    assert all(out in p.parents for p in files) and len(files) == 1
    written = {p.name for p in (out / "warped-landmarks" / "identity").iterdir()}
    assert written == {f"{safe_name(i)}.csv" for i in ids} and len(written) == 3  # no two ids share a file
    assert all(warped_path(out, "identity", i).is_file() for i in ids)


def test_bom_table_keeps_its_index(tiny_table):
    text = tiny_table.read_text().replace("\n0,", "\n100,").replace("\n1,", "\n101,")
    tiny_table.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [p.pair_id for p in load_table(tiny_table)][:2] == ["100", "101"]


def test_table_inconsistent_with_images_fails_that_pair(tiny_table, tmp_path):
    text = tiny_table.read_text()
    lines = text.splitlines()
    lines[1] = lines[1].replace('"(180, 240)"', '"(10, 10)"')  # pair 0: size wrong
    lines[2] = lines[2].replace(",300.00,", ",3000,")  # pair 1: diagonal wrong
    tiny_table.write_text("\n".join(lines) + "\n")
    far = tiny_table.parent / "lung-lesion_1/scale-100pc/s2_source.csv"
    far.write_text(far.read_text() + "13,1e9,5\n")  # pair 2: a landmark far outside its image
    out = tmp_path / "run"
    _run(tiny_table, out, "identity,preprocessed")
    errors = {r["pair_id"]: r["error"] for r in _rows(out)}
    assert {r["status"] for r in _rows(out)} == {"failed"}
    assert "(10, 10) differs from the image read from disk (180, 240)" in errors["0"]
    assert "diagonal 3000 differs" in errors["1"]
    assert "landmark 13 (1e+09, 5) lies far outside the source image" in errors["2"]


def test_diagonal_column_is_filled_when_the_table_has_none(tiny_table, tmp_path):
    lines = tiny_table.read_text().splitlines()
    head = lines[0].split(",")
    drop = [head.index("Image diagonal [pixels]"), head.index("Image size [pixels]")]
    table = []
    for line in lines:
        cells = next(csv.reader([line]))
        table.append(",".join(f'"{c}"' if "," in c else c for i, c in enumerate(cells) if i not in drop))
    tiny_table.write_text("\n".join(table) + "\n")
    out = tmp_path / "run"
    _run(tiny_table, out, "identity")
    assert [float(r["diagonal"]) for r in _rows(out)] == pytest.approx([300.0] * 3)


def test_junk_rows_and_missing_manifest_are_refused(tiny_table, tmp_path):
    out = tmp_path / "run"
    _run(tiny_table, out, "identity", limit=1)
    with (out / "results.csv").open("a") as fh:
        fh.write("not,a,result,row\n")
    with pytest.raises(RunError, match=r"results.csv: line 3: not a result row"):
        _run(tiny_table, out, "identity")
    lines = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join([*lines[:2], lines[1]]) + "\n")  # a repeated row
    with pytest.raises(StoreError, match="line 3: a second row for pair '0'"):
        ResultStore(out).rows()
    (out / "results.csv").write_text("\n".join(lines[:2]) + "\n")
    (out / "run.json").unlink()
    with pytest.raises(RunError, match="no run.json"):
        _run(tiny_table, out, "identity")


@pytest.mark.parametrize("option,value,words", [
    ("--limit", "0", "--limit 0: expected a whole number >= 1"),
    ("--limit", "-1", "--limit -1"),
    ("--workers", "0", "--workers 0"),
    ("--success-threshold", "0", "--success-threshold 0.0"),
    ("--success-threshold", "-1", "--success-threshold -1.0"),
    ("--success-threshold", "nan", "--success-threshold nan"),
    ("--timeout", "0", "--timeout 0.0"),
    ("--timeout", "-1", "--timeout -1.0"),
    ("--timeout", "nan", "--timeout nan"),
    ("--timeout", "inf", "--timeout inf"),
])
def test_bad_options_are_one_line_before_work(tiny_table, tmp_path, option, value, words):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out),
                           "--methods", "identity", option, value], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("setup,words", [
    ("file", "exists and is not a folder"),
    ("header", "not written by this version of the results schema"),
    ("manifest", "run.json: unreadable"),
    ("brackets", "pair table not found"),
])
def test_fatal_errors_are_one_line(tiny_table, tmp_path, setup, words):
    out = tmp_path / "out"
    args = ["--dataset", str(tiny_table)]
    if setup == "file":
        out.write_text("x")
    elif setup == "header":
        out.mkdir()
        (out / "results.csv").write_text("a,b\n1,2\n")
        (out / "run.json").write_text("{}")
    elif setup == "manifest":
        out.mkdir()
        (out / "run.json").write_text("{not json")
    else:
        args = ["--dataset", str(tmp_path / "[red]x[/red].csv")]
    proc = subprocess.run([sys.executable, "-m", "bench", "run", *args, "--out", str(out), "--methods", "identity",
                           "--no-cache"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    if setup == "brackets":
        assert "[red]x[/red].csv" in lines[0]  # printed literally, not read as markup


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_for_rows(out: Path, n: int, proc, limit_s: float = 90) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline and proc.poll() is None:
        res = out / "results.csv"
        if res.exists() and len(res.read_text().splitlines()) >= n + 1:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not store rows in time")


def _as_in_a_terminal() -> None:
    """Ctrl-C handled as in a terminal's foreground job, even when these tests run in a background job of a
    shell (which starts it, and so everything it starts, with SIGINT ignored, as Python then leaves it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tiny_table, out, faulty, *extra):
    cmd = [sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out), "--no-cache",
           "--device", "cpu", "--plugin", faulty[0], "--methods", "identity,fault-sleepy", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)  # noqa: PLW1509 - a fresh child of a test, no threads


def test_killed_parent_takes_its_workers_along(tiny_table, tmp_path, faulty):
    import psutil

    proc = _start(tiny_table, tmp_path / "run", faulty, "--workers", "2")
    try:
        _wait_for_rows(tmp_path / "run", 1, proc)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=12)
        assert not alive, alive
    finally:
        for p in _descendants(proc.pid):
            p.kill()
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_stops_promptly_and_keeps_rows(tiny_table, tmp_path, faulty, workers):
    import psutil

    out = tmp_path / "run"
    proc = _start(tiny_table, out, faulty, "--workers", workers)
    try:
        _wait_for_rows(out, 1, proc)
        workers_ = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stored = len(_rows(out))
    assert f"interrupted: {stored} rows stored; run the same command to resume" in " ".join(err.split())
    _, alive = psutil.wait_procs(workers_, timeout=5)
    assert not alive
    done = subprocess.run(proc.args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = _keys(_rows(out))
    assert len(keys) == len(set(keys)) == 6


def test_a_plugin_that_does_not_import_is_one_line(tiny_table, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out",
                           str(tmp_path / "o"), "--plugin", "no_such_plugin_xyz"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_plugin_xyz" in lines[0], proc.stderr


def test_warped_points_match_the_safe_path(tiny_table, tmp_path):
    out = tmp_path / "run"
    _run(tiny_table, out, "identity", limit=1)
    pts = np.loadtxt(warped_path(out, "identity", "0"), delimiter=",", skiprows=1)[:, 1:]
    assert pts.shape[1] == 2


def test_retry_failed_runs_reported_failures_again(tiny_table, tmp_path, faulty):
    out = tmp_path / "run"
    _run(tiny_table, out, "fault-zero,identity", plugins=faulty, limit=1)
    assert _run(tiny_table, out, "fault-zero,identity", plugins=faulty, limit=1).retried == 0
    again = _run(tiny_table, out, "fault-zero,identity", plugins=faulty, limit=1, retry_failed=True)
    assert again.retried == 1 and again.written == 1
    assert sorted(_keys(_rows(out))) == [("0", "fault-zero"), ("0", "identity")]
