"""The Dask executor: the same rows as a local run (a local cluster), and as safe as a local run against a real
scheduler and two worker processes on loopback, started and stopped here (crashing, hanging and killed)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.record import caused_by_run
from bench.runner import RunConfig, run

pytest.importorskip("distributed", reason="the Dask executor needs: pip install 'histreg-bench[distributed]'")

PLUGIN = str(Path(__file__).resolve().parent / "faulty_methods.py")  # the conftest's ``faulty`` plugin
START_S = 90  # for the scheduler and the workers to start on a busy machine
RUN_S = 120  # for one run


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _key(out: Path):
    return sorted((r["pair_id"], r["method"], r["status"], r["rtre_median"], r["matrix"]) for r in _rows(out))


@pytest.mark.distributed
def test_dask_run_equals_local_run(tiny_table: Path, tmp_path: Path):
    common = dict(dataset=tiny_table, methods="identity,preprocessed", cache_enabled=False, device="cpu")
    run(RunConfig(out=tmp_path / "local", **common))
    summary = run(RunConfig(out=tmp_path / "dask", executor="dask", workers=2, **common))
    assert summary.written == 6
    assert _key(tmp_path / "local") == _key(tmp_path / "dask")
    warped = sorted(p.name for p in (tmp_path / "dask" / "warped-landmarks" / "preprocessed").iterdir())
    assert warped == ["0.csv", "1.csv", "2.csv"]


def test_resident_worker_is_kept_across_tasks_and_replaced_when_it_dies(tiny_table, tmp_path, faulty):
    """What each Dask task runs (from a thread, as a Dask worker runs it): one supervised child kept across
    tasks, a crash that call's row, the next task in a fresh child."""
    import threading

    from bench.plan import make_plan
    from bench.supervise import _RESIDENTS, resident
    from bench.work import run_pair

    plan = make_plan(RunConfig(dataset=tiny_table, out=tmp_path / "o", methods="identity,fault-segv",
                               plugins=faulty, cache_enabled=False, device="cpu"))
    identity, segv = plan.specs
    seen = {}

    def tasks() -> None:
        for i, specs in enumerate([(identity,), (identity,), (segv, identity), (identity,)]):
            rows = [r for res in resident([plan.task(plan.pairs[i % 3], specs)], run_pair, 1) for r in res.rows]
            seen[i] = ([(r.method, r.status, r.error) for r in rows],
                       _RESIDENTS.by_work[(run_pair, 1)].workers[0].proc.pid)
        _RESIDENTS.by_work.pop((run_pair, 1)).close()

    thread = threading.Thread(target=tasks)
    thread.start()
    thread.join(RUN_S)
    assert not thread.is_alive() and len(seen) == 4, seen
    assert seen[0][1] == seen[1][1] != seen[2][1] == seen[3][1]  # kept; replaced once, by the crash
    assert [r[:2] for r in seen[2][0]] == [("fault-segv", "failed"), ("identity", "ok")]
    assert seen[2][0][0][2].startswith("crashed: the worker process was killed by SIGSEGV")


class Cluster:
    """A Dask scheduler and two single-threaded worker processes (each under its nanny) on loopback."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.file = folder / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.logs = [(folder / f"{name}.log").open("w") for name in ("scheduler", "worker-1", "worker-2")]
        # no retry of a task whose worker died: a killed worker shows to the client as KilledWorker at once
        env = {**env, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        self._start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(self.file)], env, self.logs[0])
        deadline = time.monotonic() + START_S
        while not self.file.exists() or not self.file.read_text().strip():
            assert time.monotonic() < deadline and self.procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go; read it whole
        self.address = json.loads(self.file.read_text())["address"]
        for log in self.logs[1:]:
            self._start(["distributed.cli.dask_worker", "--scheduler-file", str(self.file), "--nworkers", "1",
                         "--nthreads", "1", "--no-dashboard"], env, log)
        self.wait_for_workers()

    def _start(self, args: list[str], env: dict[str, str], log) -> None:
        self.procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=START_S)

    def wait_for_workers(self) -> None:
        with self.client() as c:
            c.wait_for_workers(2, timeout=START_S)

    def worker_pids(self) -> dict[str, int]:
        """Dask worker address -> the PID of its process (the nanny's child, which runs the tasks)."""
        with self.client() as c:
            return c.run(os.getpid)

    def busy_workers(self) -> list[str]:
        with self.client() as c:
            return [addr for addr, keys in c.processing().items() if keys]

    def stop(self) -> None:
        """Kill every process started here and their children (nannies' workers, supervised children), by PID."""
        import psutil

        family = []
        for p in self.procs:
            try:
                family += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(family, timeout=10)
        for p in self.procs:
            p.wait(10)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, faulty):
    c = Cluster(tmp_path_factory.mktemp("dask-cluster"), dict(os.environ))
    try:
        yield c
    finally:
        c.stop()


def _command(table: Path, out: Path, scheduler: str, methods: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench", "run", "--dataset", str(table), "--out", str(out), "--no-cache",
            "--device", "cpu", "--plugin", PLUGIN, "--executor", "dask", "--scheduler", scheduler,
            "--methods", methods, *extra]


@pytest.mark.distributed
def test_crashing_methods_on_dask_are_their_rows(tiny_table, tmp_path, cluster):
    """The issue's case: on 3 pairs the run ends 0, one row per (pair, method), identity ok, crashes failed
    (``crashed:``, retried by a rerun), as a local run gives them."""
    methods = "identity,fault-segv,fault-os-exit,fault-exit"
    out = tmp_path / "dask"
    proc = subprocess.run(_command(tiny_table, out, cluster.address, methods), capture_output=True, text=True,
                          timeout=RUN_S)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = _rows(out)
    keys = sorted((r["pair_id"], r["method"]) for r in rows)
    assert keys == sorted((p, m) for p in "012" for m in methods.split(","))
    words = {"fault-segv": "SIGSEGV", "fault-os-exit": "exited with code 4", "fault-exit": "sys.exit(3)"}
    for r in rows:
        if r["method"] == "identity":
            assert r["status"] == "ok", r
        else:
            assert r["status"] == "failed" and r["error"].startswith("crashed:"), r
            assert words[r["method"]] in r["error"] and caused_by_run(r["status"], r["error"]), r
    local = tmp_path / "local"
    run(RunConfig(dataset=tiny_table, out=local, methods=methods, plugins=(PLUGIN,), cache_enabled=False,
                  device="cpu"))
    assert _key(out) == _key(local)  # status, rTRE and matrix as in a local run
    assert {(r["pair_id"], r["method"]): r["error"] for r in _rows(out)} == {
        (r["pair_id"], r["method"]): r["error"] for r in _rows(local)}


@pytest.mark.distributed
def test_hanging_method_on_dask_times_out(tiny_table, tmp_path, cluster):
    out = tmp_path / "dask"
    proc = subprocess.run(_command(tiny_table, out, cluster.address, "fault-hang,identity", "--timeout", "2",
                                   "--limit", "1"), capture_output=True, text=True, timeout=RUN_S)
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in _rows(out)}
    assert len(rows) == 2 and rows["identity"]["status"] == "ok"
    assert rows["fault-hang"]["status"] == "timeout"
    assert "exceeded the time limit of 2 s" in rows["fault-hang"]["error"]


@pytest.mark.distributed
def test_killed_dask_worker_loses_only_its_tasks_and_a_rerun_completes(tiny_table, tmp_path, cluster):
    """A Dask worker killed during the run (SIGKILL, as the memory killer does): the run still ends 0 with a
    row per (pair, method); the pairs it held are ``crashed:`` (this cluster allows no retry; by default Dask
    runs them again on another worker), the others kept, and the same command run again redoes those rows."""
    out = tmp_path / "dask"
    cmd = _command(tiny_table, out, cluster.address, "identity,fault-sleepy", "--set", "fault-sleepy.seconds=1.5")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_S
        busy = []
        while not busy:
            assert time.monotonic() < deadline and proc.poll() is None, "no task started"
            busy = cluster.busy_workers()
            time.sleep(0.2)
        time.sleep(1.0)  # inside the pair's calls
        with cluster.client() as c:
            held = len(c.processing()[busy[0]])  # its task running, and any queued on it
        victim = cluster.worker_pids()[busy[0]]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=RUN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    rows = _rows(out)
    keys = [(r["pair_id"], r["method"]) for r in rows]
    assert sorted(keys) == sorted((p, m) for p in "012" for m in ("identity", "fault-sleepy"))
    lost = [r for r in rows if r["status"] != "ok"]
    assert lost and all(r["error"].startswith("crashed: the Dask task of this pair was lost") for r in lost), lost
    assert 1 <= len({r["pair_id"] for r in lost}) <= held and "\n" not in lost[0]["error"]
    assert "KilledWorker" in lost[0]["error"]
    cluster.wait_for_workers()  # the nanny has started a new worker
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_S)
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    keys = [(r["pair_id"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6 and {r["status"] for r in rows} == {"ok"}
