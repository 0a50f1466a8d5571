"""The runner end to end on tiny tables: rows, scores, bad input, failures, timeouts, resume, workers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import registry
from bench.pairs import load_table, read_landmarks
from bench.record import COLUMNS
from bench.runner import RunConfig, RunError, run


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _run(table, out, methods="identity,preprocessed", **kw):
    return run(RunConfig(dataset=table, out=out, methods=methods, cache_enabled=False, device="cpu", **kw))


def test_rows_scores_and_outputs(tiny_table: Path, tmp_path: Path):
    out = tmp_path / "run"
    summary = _run(tiny_table, out)
    rows = _rows(out)
    assert summary.written == 6 and len(rows) == 6
    assert list(rows[0]) == list(COLUMNS)
    assert {r["status"] for r in rows} == {"ok"}
    for pair in load_table(tiny_table):  # identity: rTRE equals the initial error, computed here
        row = next(r for r in rows if r["pair_id"] == pair.pair_id and r["method"] == "identity")
        err = np.linalg.norm(read_landmarks(pair.source_landmarks) - read_landmarks(pair.target_landmarks), axis=1)
        assert float(row["rtre_median"]) == pytest.approx(np.median(err) / pair.diagonal, rel=1e-9)
        assert float(row["ire_median"]) == pytest.approx(float(row["rtre_median"]), rel=1e-9)
        np.testing.assert_allclose(np.array(json.loads(row["matrix"])), np.eye(3), atol=1e-9)
        warped = read_landmarks(out / "warped-landmarks" / "identity" / f"{pair.pair_id}.csv")
        np.testing.assert_allclose(warped, read_landmarks(pair.source_landmarks), atol=1e-9)
        assert row["tissue"] == pair.tissue
    manifest = json.loads((out / "run.json").read_text())
    for key in ("command", "git_commit", "packages", "machine", "dataset", "preprocess", "methods",
                "reference_time_s", "success_threshold"):
        assert key in manifest
    assert len(manifest["dataset"]["sha256"]) == 64


def test_bad_inputs_fail_their_rows_only(tiny_table: Path, tmp_path: Path):
    root = tiny_table.parent
    (root / "kidney_1/scale-100pc/s0_source.jpg").unlink()  # missing image
    (root / "kidney_2/scale-100pc/s1_target.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines = tiny_table.read_text().splitlines()
    extra = lines[3].replace("2,", "3,", 1)  # a 4th pair whose landmark file has a bad header
    bad_lnd = root / "bad.csv"
    bad_lnd.write_text(",A,B\n1,2,3\n")
    extra = extra.replace("lung-lesion_1/scale-100pc/s2_source.csv", "bad.csv")
    tiny_table.write_text("\n".join([*lines, extra]) + "\n")
    out = tmp_path / "run"
    _run(tiny_table, out)
    by_pair = {}
    for r in _rows(out):
        by_pair.setdefault(r["pair_id"], set()).add((r["status"], r["error"].split(":")[0]))
    status = {p: {s for s, _ in v} for p, v in by_pair.items()}
    assert status == {"0": {"failed"}, "1": {"failed"}, "2": {"ok"}, "3": {"failed"}}
    errors = {r["pair_id"]: r["error"] for r in _rows(out)}
    assert "s0_source.jpg" in errors["0"] and "not found" in errors["0"]
    assert "s1_target.jpg" in errors["1"] and "decode" in errors["1"]
    assert "bad.csv" in errors["3"] and "header" in errors["3"]


def test_flat_image_is_a_clear_error(tiny_table: Path, tmp_path: Path):
    import cv2

    flat = tiny_table.parent / "kidney_1/scale-100pc/s0_target.jpg"
    cv2.imwrite(str(flat), np.full((180, 240, 3), 240, np.uint8))
    out = tmp_path / "run"
    _run(tiny_table, out, methods="preprocessed")
    row = next(r for r in _rows(out) if r["pair_id"] == "0")
    assert row["status"] == "failed" and "s0_target.jpg" in row["error"]


TEST_METHODS = """
import time

import numpy as np

from bench import Estimate, Method, RegistrationFailed, geometry, register


@register
class Crashes(Method):
    name = "test-crashes"
    uses_preprocessing = False

    def estimate(self, fixed, moving, context):
        raise ZeroDivisionError("boom")


@register
class Gives(Method):
    name = "test-gives-up"
    uses_preprocessing = False

    def estimate(self, fixed, moving, context):
        raise RegistrationFailed("only 2 inliers")


@register
class Slow(Method):
    name = "test-slow"
    uses_preprocessing = False
    calls = 0

    def estimate(self, fixed, moving, context):
        type(self).calls += 1
        if type(self).calls > 1:  # the warm-up call is quick, the timed ones are not
            time.sleep(5)
        return Estimate(np.eye(3))


@register
class Shifts(Method):
    name = "test-shift"
    uses_preprocessing = False

    def estimate(self, fixed, moving, context):
        return Estimate(geometry.translation(2.0, 0.0))
"""


@pytest.fixture
def test_methods(tmp_path: Path, monkeypatch):
    """A plugin module (the methods run in worker processes, which import it) with methods that fail, time out
    or report failure; returns the plugins argument."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "bench_test_methods.py").write_text(TEST_METHODS)
    monkeypatch.syspath_prepend(str(folder))
    yield ("bench_test_methods",)
    for n in ("test-crashes", "test-gives-up", "test-slow", "test-shift"):
        registry._REGISTRY.pop(n, None)
    sys.modules.pop("bench_test_methods", None)
    getattr(registry, "_PLUGINS", {}).pop("bench_test_methods", None)


def test_failures_and_timeouts_become_rows(tiny_table: Path, tmp_path: Path, test_methods):
    out = tmp_path / "run"
    _run(tiny_table, out, methods="test-crashes,test-gives-up,test-slow,identity", timeout_s=0.5,
         plugins=test_methods)
    rows = _rows(out)
    assert len(rows) == 12
    got = {(r["method"], r["status"]) for r in rows}
    assert got == {("test-crashes", "failed"), ("test-gives-up", "failed"), ("test-slow", "timeout"),
                   ("identity", "ok")}
    crash = next(r for r in rows if r["method"] == "test-crashes")
    assert crash["error"] == "ZeroDivisionError: boom" and crash["success"] == "False"
    assert crash["fallback"] == "True" and crash["rtre_median"]  # scored with the fallback matrix
    gave = next(r for r in rows if r["method"] == "test-gives-up")
    assert "only 2 inliers" in gave["error"]


def test_matrix_is_in_original_coordinates(tiny_table: Path, tmp_path: Path, test_methods):
    """A working-frame translation of 2 px becomes 2/scale px in the original frame."""
    out = tmp_path / "run"
    _run(tiny_table, out, methods="test-shift", overrides={"preprocess": {"working_size": "120"}},
         plugins=test_methods)
    row = _rows(out)[0]
    m = np.array(json.loads(row["matrix"]))
    assert m[0, 2] == pytest.approx(2.0 * 240 / 120, rel=1e-6)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 2] == pytest.approx(0.0, abs=1e-9)


def test_resume_skips_stored_rows_and_repairs_a_cut_line(tiny_table: Path, tmp_path: Path):
    out = tmp_path / "run"
    _run(tiny_table, out, limit=1)
    assert len(_rows(out)) == 2
    with (out / "results.csv").open("a") as fh:  # a line half-written when the run was killed
        fh.write("1,kidney,identity,1,ok,,12,0.01")
    summary = _run(tiny_table, out)
    rows = _rows(out)
    keys = [(r["pair_id"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    assert summary.already == 2 and summary.written == 4


def test_resume_refuses_other_parameters(tiny_table: Path, tmp_path: Path):
    out = tmp_path / "run"
    _run(tiny_table, out, limit=1)
    with pytest.raises(RunError, match="other preprocessing parameters"):
        _run(tiny_table, out, overrides={"preprocess": {"working_size": "100"}})


def test_killed_run_resumes_without_duplicates(tiny_table: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out),
           "--methods", "identity,preprocessed", "--no-cache", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.csv").exists() and len((out / "results.csv").read_text().splitlines()) >= 2:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True)
    keys = [(r["pair_id"], r["method"]) for r in _rows(out)]
    assert sorted(keys) == sorted({(p, m) for p in "012" for m in ("identity", "preprocessed")})


def test_workers_give_the_same_results(tiny_table: Path, tmp_path: Path):
    _run(tiny_table, tmp_path / "one")
    _run(tiny_table, tmp_path / "two", workers=2)
    def key(rows):
        return sorted((r["pair_id"], r["method"], r["rtre_median"], r["matrix"]) for r in rows)
    assert key(_rows(tmp_path / "one")) == key(_rows(tmp_path / "two"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'"),
        (["--methods", "identty"], "did you mean 'identity'"),
        (["--methods", "identity", "--set", "identity.foo=1"], "unknown parameter 'foo'"),
        (["--methods", "identity", "--set", "nonsense"], "expected METHOD.PARAM=VALUE"),
        (["--methods", "identity", "--set", "preprocess.working_size=abc"], "not a valid int"),
    ],
)
def test_cli_refuses_bad_arguments_before_work(tiny_table: Path, tmp_path: Path, args, message):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--dataset", str(tiny_table), "--out", str(out),
                           *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in " ".join(proc.stderr.split())
    assert not (out / "results.csv").exists()


def test_cli_unknown_option_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_list_shows_methods():
    proc = subprocess.run([sys.executable, "-m", "bench", "list"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "identity" in proc.stdout and "preprocessed" in proc.stdout


def test_identity_is_exactly_the_identity_for_images_of_different_sizes(tmp_path: Path):
    """The 'Initial' row: resampling two images of different sizes rounds their working sizes differently,
    so a working-frame identity is not exactly the original-pixel identity; ``identity`` must be."""
    rng = np.random.default_rng(0)
    for name, (h, w) in (("source", (733, 1001)), ("target", (787, 1164))):
        cv2.imwrite(str(tmp_path / f"{name}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        np.savetxt(tmp_path / f"{name}.csv", np.c_[np.arange(1, 4), [[10, 20], [300, 400], [700, 600]]],
                   delimiter=",", header=",X,Y", comments="", fmt=["%d", "%.1f", "%.1f"])
    table = tmp_path / "table.csv"
    table.write_text(",Source image,Source landmarks,Target image,Target landmarks,Image diagonal [pixels],"
                     'Image size [pixels],status\n0,source.png,source.csv,target.png,target.csv,1405.1,"(787, 1164)",'
                     "training\n")
    out = tmp_path / "run"
    _run(table, out)
    rows = {r["method"]: r for r in _rows(out)}
    np.testing.assert_array_equal(np.array(json.loads(rows["identity"]["matrix"])), np.eye(3))
    src = read_landmarks(tmp_path / "source.csv")
    err = np.linalg.norm(src - read_landmarks(tmp_path / "target.csv"), axis=1)
    assert float(rows["identity"]["rtre_median"]) == pytest.approx(np.median(err) / 1405.1, rel=1e-12)
    # a working-frame identity composed back is off by the rounding (what the frame flag avoids)
    from bench.preprocess import prepare_pair

    composed = prepare_pair(tmp_path / "source.png", tmp_path / "target.png", full=False).to_original(np.eye(3))
    assert not np.allclose(composed, np.eye(3), rtol=0, atol=1e-6)


def test_split_tasks_prepare_their_pair_once_per_process(tiny_table: Path, monkeypatch):
    """A parallel run's last pairs become one task per method; a worker prepares such a pair once (as a
    serial run does, even without the disk cache) and its rows equal those of the unsplit task."""
    from dataclasses import replace

    from bench import work
    from bench.plan import make_plan

    plan = make_plan(RunConfig(dataset=tiny_table, methods="identity,preprocessed,sift", cache_enabled=False,
                               device="cpu", out=tiny_table.parent / "unused"))
    calls = []
    real = work._prepare_now
    monkeypatch.setattr(work, "_prepare_now", lambda task, full: calls.append(full) or real(task, full))
    monkeypatch.setattr(work, "_PREPARED", type(work._PREPARED)())
    whole = work.run_pair(plan.task(plan.pairs[0], plan.specs))
    n_whole = len(calls)
    assert n_whole == 2  # the full stage (preprocessed, sift) and the light one (identity)
    calls.clear()
    split = [work.run_pair(replace(plan.task(plan.pairs[0], (s,)), split=True)) for s in plan.specs]
    assert len(calls) == n_whole  # not once per task
    calls.clear()
    work._PREPARED.clear()
    [work.run_pair(plan.task(plan.pairs[0], (s,))) for s in plan.specs]
    assert len(calls) == len(plan.specs)  # unsplit tasks are not kept in memory
    split_rows = [r for res in split for r in res.rows]
    # preprocessed and sift share one preparation, as in the unsplit task
    assert split_rows[1].time_preprocess_s == split_rows[2].time_preprocess_s
    volatile = ("time_s", "time_cpu_s", "time_preprocess_s", "diagnostics")  # timings measured again
    for a, b in zip(whole.rows, split_rows, strict=True):
        assert {k: str(v) for k, v in a.as_dict().items() if k not in volatile} == {
            k: str(v) for k, v in b.as_dict().items() if k not in volatile}


def test_workers_end_by_themselves_after_the_last_pair(tiny_table: Path):
    """At the end the workers are asked to stop and exit at once with code 0 (not killed, not left)."""
    from bench.plan import make_plan
    from bench.supervise import Supervisor
    from bench.work import run_pair

    plan = make_plan(RunConfig(dataset=tiny_table, methods="identity", cache_enabled=False, device="cpu",
                               out=tiny_table.parent / "unused"))
    sup = Supervisor([plan.task(p, plan.specs) for p in plan.pairs], 2, run_pair, threads=1)
    assert len([r for res in sup for r in res.rows]) == len(plan.pairs)
    assert sup.exit_codes == [0, 0]


@pytest.mark.parametrize("workers,threads", [(1, None), (2, 1)])
def test_reference_workload_gets_a_core_of_its_own(tiny_table: Path, monkeypatch, workers, threads):
    """The runner's reference workload runs while the workers start, but only beside workers that leave it a
    core: on 2 cores, one single-threaded worker of two; never beside a serial run's worker (all cores)."""
    from bench import supervise
    from bench.plan import make_plan
    from bench.work import run_pair

    monkeypatch.setattr(supervise.os, "cpu_count", lambda: 2)
    plan = make_plan(RunConfig(dataset=tiny_table, methods="identity", cache_enabled=False, device="cpu",
                               out=tiny_table.parent / "unused"))
    seen = []
    sup = supervise.Supervisor([plan.task(p, plan.specs) for p in plan.pairs], workers, run_pair, threads,
                               meanwhile=lambda: seen.append(len(sup.workers)))
    rows = [r for res in sup for r in res.rows]
    assert seen == [workers - 1]
    assert sorted(r.pair_id for r in rows) == sorted(p.pair_id for p in plan.pairs)


def test_a_plan_does_not_import_torch_when_no_gpu_can_be_there(tmp_path: Path):
    """Importing torch costs the parent of every run about a second; without a GPU device file it is skipped
    (the device is still 'cpu')."""
    from bench.plan import cuda_possible, resolve_device

    if cuda_possible():
        pytest.skip("a GPU device file exists here: torch must be asked")
    code = ("import sys, pathlib; from bench.plan import make_plan, RunConfig; "
            f"p = make_plan(RunConfig(methods='all', out=pathlib.Path({str(tmp_path)!r}))); "
            "print(p.device, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["cpu", "False"]
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RunError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_long_run_times_the_reference_workload_at_its_end_too(tiny_table, tmp_path, monkeypatch):
    from bench import runner as runner_mod

    common = dict(dataset=tiny_table, methods="identity", cache_enabled=False, device="cpu", limit=1)
    run(RunConfig(out=tmp_path / "short", **common))
    short = json.loads((tmp_path / "short" / "run.json").read_text())
    assert short["reference_time_s"] > 0 and "reference_time_end_s" not in short
    monkeypatch.setattr(runner_mod, "REFERENCE_AGAIN_AFTER_S", 0.0)  # every run counts as long
    run(RunConfig(out=tmp_path / "long", **common))
    long = json.loads((tmp_path / "long" / "run.json").read_text())
    assert long["reference_time_s"] > 0 and long["reference_time_end_s"] > 0


def test_worker_thread_caps_reach_libraries_imported_later():
    """A worker caps its libraries' threads without importing torch or SimpleITK (a second of every worker's start
    for torch); imported later, they still take the cap (from the environment the cap sets)."""
    import subprocess
    import sys

    code = ("import sys\nfrom bench.supervise import limit_threads\nlimit_threads(1)\n"
            "print('torch' in sys.modules, 'SimpleITK' in sys.modules)\n"
            "import torch, SimpleITK as sitk\n"
            "print(torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", "False", "1", "1"]


def test_then_stage_parameters_reach_every_follower(tiny_table, tmp_path):
    from bench.plan import make_plan

    config = RunConfig(dataset=tiny_table, methods="preprocessed,sift", then="demons", out=tmp_path / "o",
                       overrides={"demons": {"levels": "2"}}, cache_enabled=False, device="cpu")
    followers = {s.name: json.loads(s.params)["demons"] for s in make_plan(config).specs if ">" in s.name}
    assert followers == {"preprocessed>demons": "levels=2", "sift>demons": "levels=2"}
    bad = RunConfig(**{**config.__dict__, "overrides": {"demons": {"nope": "1"}}})
    with pytest.raises(RunError, match="nope"):
        make_plan(bad)
