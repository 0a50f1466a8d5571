"""The runner: every chosen method over every pair, one result row per (pair, method).

It ties the modules together, each with one job:

- :mod:`bench.plan`: options validated, methods built once, the pair table read once (a :class:`Plan`);
- :mod:`bench.store`: the run folder, its lock (one writer), its checked rows and file names;
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
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import executors, provenance
from bench.pairs import file_digest
from bench.plan import (
    MethodSpec,
    PairTask,
    Plan,
    RunConfig,
    RunError,
    default_out,
    make_plan,
    parse_overrides,
    resolve_device,
)
from bench.schema import SCHEMA_VERSION, Status, caused_by_run
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


def _manifest(plan: Plan) -> dict[str, Any]:
    c = plan.config
    return {
        "schema_version": SCHEMA_VERSION,
        "command": c.command,
        "git_commit": provenance.git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": provenance.machine_info(),
        "packages": provenance.package_versions(),
        "dataset": {
            "path": str(plan.table.resolve()),
            "embedded_sample": plan.embedded,
            "sha256": file_digest(plan.table),
            "n_pairs": len(plan.pairs),
            "data_roots": [str(r) for r in c.data_roots],
        },
        "preprocess": dataclasses.asdict(plan.preprocess),
        "methods": {s.name: {"version": s.version, "params": s.params_dict()} for s in plan.specs},
        "skipped_methods": plan.skipped,
        "device": plan.device,
        "seed": c.seed,
        "workers": plan.workers,
        "executor": plan.executor,
        "timeout_s": plan.timeout_s,
        "success_threshold": plan.success_threshold,
    }


def _check_resume(store: ResultStore, old: dict[str, Any] | None, manifest: dict[str, Any], has_rows: bool) -> None:
    if old is None:
        if has_rows:
            raise RunError(f"{store.folder} holds {store.results.name} but no {store.manifest.name}: its rows "
                           "cannot be checked against this run; use a new --out")
        return
    if old.get("schema_version") != SCHEMA_VERSION:
        raise RunError(f"{store.folder}: results of schema {old.get('schema_version')}, this is {SCHEMA_VERSION}: "
                       "use a new --out")
    if old.get("dataset", {}).get("sha256") != manifest["dataset"]["sha256"]:
        raise RunError(f"{store.folder} holds results of another dataset ({old.get('dataset', {}).get('path')}): "
                       "use a new --out")
    if old.get("preprocess") != manifest["preprocess"]:
        raise RunError(f"{store.folder} holds results made with other preprocessing parameters: use a new --out")
    if old.get("success_threshold", manifest["success_threshold"]) != manifest["success_threshold"]:
        raise RunError(f"{store.folder} holds results scored with --success-threshold "
                       f"{old.get('success_threshold')}: use a new --out")
    for name, info in manifest["methods"].items():
        prev = old.get("methods", {}).get(name)
        if prev and (prev.get("params") != info["params"] or prev.get("version") != info["version"]):
            raise RunError(
                f"{store.folder} holds {name!r} results made with other parameters or another version "
                f"({prev}); use a new --out to compare them"
            )


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


def _run_locked(plan: Plan, store: ResultStore, progress: Callable | None) -> RunSummary:
    manifest = _manifest(plan)
    old = store.read_manifest()
    rows = store.rows()
    _check_resume(store, old, manifest, bool(rows))
    wanted = {(p.pair_id, s.name) for p in plan.pairs for s in plan.specs}
    retry = _to_retry(rows, wanted, plan.config.retry_failed)
    retried = store.drop(retry) if retry else 0
    done = {(r["pair_id"], r["method"]) for r in rows} - retry
    if old:  # keep the record of earlier methods in this folder, refresh the rest
        manifest["methods"] = {**old.get("methods", {}), **manifest["methods"]}
        manifest["created"] = old.get("created", manifest["created"])
        manifest["resumed"] = datetime.now(UTC).isoformat(timespec="seconds")
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
    with contextlib.closing(execute(tasks, plan.workers, run_pair, time_reference)) as results:  # closing: workers end
        for res in results:
            _store_result(res, store, summary)
            if res.finished:
                finished += 1
                if progress:
                    progress(res, finished, len(tasks))
    manifest["peak_rss_mb"] = provenance.peak_rss_mb()
    store.write_manifest(manifest)
    return summary


def _store_result(res: PairResult, store: ResultStore, summary: RunSummary) -> None:
    """Write one result (warped landmarks first, then the rows) and count it."""
    for method, pts in res.warped.items():
        store.write_warped(method, res.rows[0]["pair_id"], pts)
    store.append(res.rows)
    summary.written += len(res.rows)
    for r in res.rows:
        summary.counts[r["status"]] = summary.counts.get(r["status"], 0) + 1
        if not Status(r["status"]).scored_by_method:
            entry = summary.problems.setdefault((r["method"], r["status"]), [0, r.get("error") or ""])
            entry[0] += 1


__all__ = ["MethodSpec", "PairTask", "Plan", "RunConfig", "RunError", "RunInterrupted", "RunSummary",
           "default_out", "make_plan", "parse_overrides", "resolve_device", "run", "run_pair"]
