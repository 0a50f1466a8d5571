"""The runner: every chosen method over every pair, one result row per (pair, method).

It ties the modules together, each with one job:

- :mod:`bench.plan`: options validated, methods built once, the pair table read once (a :class:`Plan`);
- :mod:`bench.record`: a result row, the run manifest (``run.json``: built, checked on resume) and the one
  reader of both;
- :mod:`bench.store`: the run folder, its lock (one writer), its rows and file names;
- :mod:`bench.work`: one pair's work (:func:`bench.work.run_pair`), run inside workers;
- :mod:`bench.executors` and :mod:`bench.supervise`: where that work runs (supervised worker processes, or
  Dask), each call bounded and a crash turned into a row;
- :mod:`bench.provenance`: the commit, machine and packages recorded in ``run.json``.

Resume: the same command skips the (pair, method) rows already stored. Rows that failed because of the run
(timeouts, crashed workers) are run again; rows the method reported as failed, and bad inputs, are kept
unless ``retry_failed``. The parent is the only writer of the results store, one row at a time as each
call ends, so an interrupt keeps every finished row.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import executors, provenance, record
from bench.plan import (
    MethodSpec,
    PairTask,
    Plan,
    RunConfig,
    RunError,
    default_out,
    estimate_by_default,
    make_plan,
    parse_overrides,
    resolve_device,
)
from bench.record import RecordError, Status, caused_by_run
from bench.store import FolderInUse, ResultStore, StoreError
from bench.work import PairResult, run_pair


class RunInterrupted(Exception):
    """The run was stopped (Ctrl-C); ``stored`` rows are in the folder and the same command resumes."""

    def __init__(self, out: Path, stored: int) -> None:
        super().__init__(f"interrupted: {stored} rows stored; run the same command to resume")
        self.out, self.stored = out, stored


@dataclass
class RunSummary:
    out: Path
    n_pairs: int
    methods: list[str]
    skipped: dict[str, str]
    written: int
    already: int
    counts: dict[str, int]
    retried: int = 0  # rows of earlier runs dropped to be run again
    # rows of this run that are not ok: (method, status) -> [count, first error]
    problems: dict[tuple[str, str], list] = field(default_factory=dict)


def _to_retry(rows: list[dict[str, str]], wanted: set[tuple[str, str]], retry_failed: bool) -> set[tuple[str, str]]:
    out = set()
    for r in rows:
        key = (r["pair_id"], r["method"])
        if key not in wanted:
            continue
        if caused_by_run(r["status"], r["error"]) or (
                retry_failed and r["status"] in (Status.FAILED.value, Status.TIMEOUT.value)):
            out.add(key)
    return out


def run(config: RunConfig | Plan, progress: Callable[[PairResult, int, int], None] | None = None) -> RunSummary:
    """Run (or resume) the benchmark; raises :class:`RunError` before any work for a bad configuration and
    :class:`RunInterrupted` on Ctrl-C (every finished row kept)."""
    plan = config if isinstance(config, Plan) else make_plan(config)
    store = ResultStore(plan.out)
    try:
        with store.lock("bench run"):
            return _run_locked(plan, store, progress)
    except (FolderInUse, StoreError) as exc:
        raise RunError(str(exc)) from None
    except KeyboardInterrupt:
        raise RunInterrupted(plan.out, _stored(store)) from None


def _stored(store: ResultStore) -> int:
    """Rows in the folder (for the interrupt message; never raises)."""
    try:
        return len(store.rows())
    except (OSError, StoreError):
        return 0


# a run longer than this times the reference workload at its end too (reference_time_end_s in run.json), so the
# report's time / ref follows a machine whose speed drifted during the run; a shorter one records the start only
REFERENCE_AGAIN_AFTER_S = 60.0


def _run_locked(plan: Plan, store: ResultStore, progress: Callable | None) -> RunSummary:
    manifest = record.run_manifest(plan)
    old = store.read_manifest()
    rows = store.rows()
    try:
        record.check_resume(store.folder, old, manifest, bool(rows))
    except RecordError as exc:
        raise RunError(str(exc)) from None
    wanted = {(p.pair_id, s.name) for p in plan.pairs for s in plan.specs}
    retry = _to_retry(rows, wanted, plan.config.retry_failed)
    retried = store.drop(retry) if retry else 0
    done = {(r["pair_id"], r["method"]) for r in rows} - retry
    if old:  # keep the record of earlier methods in this folder, refresh the rest
        manifest = record.resumed(old, manifest)
    store.write_manifest(manifest)  # before any work: a resume checks against it

    def time_reference() -> None:  # called by the executor while its workers start (see bench.supervise)
        from bench.reference import reference_time

        manifest["reference_time_s"] = reference_time()
        store.write_manifest(manifest)

    tasks: list[PairTask] = []
    already = 0
    for p in plan.pairs:
        todo = tuple(s for s in plan.specs if (p.pair_id, s.name) not in done)
        already += len(plan.specs) - len(todo)
        if todo:
            tasks.append(plan.task(p, todo))
    execute = executors.get(plan.executor, plan.config.scheduler)
    summary = RunSummary(plan.out, len(plan.pairs), plan.method_names, plan.skipped, 0, already, {},
                         retried=retried)
    finished = 0
    started = time.monotonic()
    with contextlib.closing(execute(tasks, plan.workers, run_pair, time_reference)) as results:  # closing: workers end
        for res in results:
            _store_result(res, store, summary)
            if res.finished:
                finished += 1
                if progress:
                    progress(res, finished, len(tasks))
    manifest["peak_rss_mb"] = provenance.peak_rss_mb()
    if time.monotonic() - started >= REFERENCE_AGAIN_AFTER_S:  # timed again once the workers have ended
        from bench.reference import reference_time

        manifest["reference_time_end_s"] = reference_time()
    store.write_manifest(manifest)
    return summary


def _store_result(res: PairResult, store: ResultStore, summary: RunSummary) -> None:
    """Write one result (warped landmarks first, then the rows) and count it."""
    for method, pts in res.warped.items():
        store.write_warped(method, res.rows[0].pair_id, pts)
    store.append(res.rows)
    summary.written += len(res.rows)
    for r in res.rows:
        summary.counts[r.status] = summary.counts.get(r.status, 0) + 1
        if not Status(r.status).scored_by_method:
            entry = summary.problems.setdefault((r.method, r.status), [0, r.error or ""])
            entry[0] += 1


__all__ = ["MethodSpec", "PairTask", "Plan", "RunConfig", "RunError", "RunInterrupted", "RunSummary",
           "default_out", "estimate_by_default", "make_plan", "parse_overrides", "resolve_device", "run", "run_pair"]
