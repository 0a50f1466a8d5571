"""Import a submission in ANHIR's layout into a run folder, so tools that cannot run as a Method here (another
Python environment, a GPU cluster, another language) are scored and reported beside the built-in methods.

This module writes run folders, so it lives outside the report package (which only reads them); it reads the
run through the report's loader (:func:`bench.report.load.load_run`), builds its rows with
:meth:`bench.record.Row.begin` and takes the layout's column names from the layout's writer,
:mod:`bench.report.export`.

The submission is the challenge's pair table plus two columns (as :func:`bench.report.export.export_anhir`
writes it, and as BIRL-compatible tools write it)::

    <first column: pair index>, Source image, ..., Warped source landmarks, Execution time [minutes]

``Warped source landmarks`` names an ANHIR landmark CSV (``,X,Y``): the source landmarks moved into the target
frame by the tool; a relative path is read relative to the table's folder. Only files inside the table's folder
are read: a path that leaves it (``../..``, an absolute path elsewhere, a link out) is that pair's ``failed``
row naming the column, and no error message ever quotes a file's content. :func:`import_anhir` adds one row
per pair of the submission to the run folder:

* pairs are matched by the table's **pair index** to the run's own dataset table (``run.json``
  ``dataset.path``); a pair the dataset does not have refuses the whole import, and where both tables name
  the image and landmark files their last three path parts must agree (so another dataset is refused);
* only the **run's own pairs** are imported: those its runs planned (``run.json`` ``dataset.pairs``; for a
  folder written before the plan was recorded, the pairs it has rows for). A submission row for another
  pair of the dataset (a run made with ``--limit``) is ignored and counted (:attr:`ImportSummary.ignored`),
  so the imported method's success rate is over the same pairs as the run's other methods;
* each row is scored by :func:`bench.metrics.score_pair` against the run dataset's target landmarks, with the
  run's success threshold, exactly as the runner scores its own methods;
* ``time_s`` is the table's minutes x 60 with ``time_source = reported`` (reported by the tool, not measured
  by the harness); no matrix, no preprocessing time, no ``quality`` (the images are not re-aligned here);
* a missing, empty or malformed warped landmark file, or a blank cell, makes a ``failed`` row with a one-line
  message, as for any bad input; an optional ``Method status`` column (written by ``export-anhir``) saying
  ``failed`` or ``timeout`` keeps that verdict (the row is scored with the landmarks given, as a fallback); a pair of the run that the table lacks gets a ``failed`` row too, so a tool
  that skipped hard pairs is not flattered;
* the warped landmarks are stored like the run's own; ``run.json`` records the import under ``methods``
  (version ``imported``, the table's path and SHA-256) and in ``imports``.

A method name already in the run is refused unless ``replace=True`` (then its rows and warped landmarks are
removed first); only an imported method (rows with ``time_source`` reported) can be replaced, never a method
the harness measured. The run folder is written under the store's lock (:meth:`bench.store.ResultStore.lock`), so an
import never interleaves with a ``bench run`` writing the same folder: it is refused at once instead.
"""

from __future__ import annotations

import contextlib
import csv
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import metrics, record
from bench.pairs import (
    COL_SOURCE_IMAGE,
    COL_SOURCE_LANDMARKS,
    COL_TARGET_IMAGE,
    COL_TARGET_LANDMARKS,
    DatasetError,
    LandmarkError,
    Pair,
    file_digest,
    load_table,
    one_line,
    read_landmarks,
)
from bench.record import TIME_REPORTED, Row
from bench.report.export import COL_ERROR, COL_STATUS, COL_TIME, COL_WARPED
from bench.report.load import DEFAULT_THRESHOLD, ReportError, load_run
from bench.store import FolderInUse, ResultStore, StoreError, warped_path

IMPORTED_VERSION = "imported"
IMPORTED_DEVICE = "external"
PATH_COLUMNS = (COL_SOURCE_IMAGE, COL_SOURCE_LANDMARKS, COL_TARGET_IMAGE, COL_TARGET_LANDMARKS)


@dataclass
class ImportSummary:
    """What :func:`import_anhir` wrote."""

    run: Path
    method: str
    table: Path
    sha256: str
    counts: dict[str, int] = field(default_factory=dict)  # status -> rows
    replaced: int = 0  # rows of an earlier import removed (replace=True)
    ignored: list[str] = field(default_factory=list)  # submission pair ids not in the run's plan (not imported)


def _submission(table: Path) -> tuple[pd.DataFrame, list[str]]:
    """The submission table as strings and the pair id of each row (its index column, else the row number)."""
    if not table.is_file():
        raise ReportError(f"{table}: submission table not found")
    try:
        sub = pd.read_csv(table, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReportError(f"{table}: cannot read the submission table ({str(exc).splitlines()[0]})") from None
    sub.columns = [str(c).strip() for c in sub.columns]
    if COL_WARPED not in sub.columns:
        raise ReportError(
            f"{table}: not an ANHIR submission (no {COL_WARPED!r} column; columns: {', '.join(sub.columns)})"
        )
    first = sub.columns[0]
    if first.startswith("Unnamed") or first.lower() in ("", "index"):
        ids = [one_line(v) for v in sub[first]]  # the form pair ids have in the run
    else:
        ids = [str(i) for i in range(len(sub))]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ReportError(f"{table}: duplicate pair index {', '.join(dup[:5])}")
    return sub, ids


def _tail(path: str, n: int = 3) -> tuple[str, ...]:
    return Path(path.strip().replace("\\", "/")).parts[-n:]


def _check_same_pairs(sub: pd.DataFrame, ids: list[str], raw: dict[str, dict[str, str]], table: Path) -> None:
    """Refuse a submission whose file columns name other files than the run's table for the same index."""
    for col in PATH_COLUMNS:
        if col not in sub.columns:
            continue
        for pid, value in zip(ids, sub[col], strict=True):
            mine = raw.get(pid, {}).get(col, "")
            if value.strip() and mine.strip() and _tail(value) != _tail(mine):
                raise ReportError(
                    f"{table}: pair {pid}: {col} {value!r} is not the run dataset's {mine!r} "
                    "(a submission for another dataset?)"
                )


def _raw_table(path: Path) -> dict[str, dict[str, str]]:
    """The run's pair table as written: pair id -> column -> cell."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip() for h in rows[0]]
    has_index = header[0] == "" or header[0].lower() in ("index", "unnamed: 0")
    out = {}
    for n, row in enumerate(r for r in rows[1:] if r and any(c.strip() for c in r)):
        pid = one_line(row[0]) if has_index else str(n)
        out[pid] = dict(zip(header, row, strict=False))
    return out


def _minutes(text: str) -> tuple[float, str]:
    """Seconds from a minutes cell, and a note when it is missing or not a non-negative number."""
    if not text.strip():
        return math.nan, "no execution time in the table"
    try:
        minutes = float(text)
    except ValueError:
        return math.nan, f"execution time {text!r} is not a number"
    if not math.isfinite(minutes) or minutes < 0:
        return math.nan, f"execution time {text!r} is not a non-negative number"
    return minutes * 60.0, ""


def _diagonal(pair: Pair) -> float:
    if pair.diagonal:
        return float(pair.diagonal)
    if pair.target_size:
        return metrics.image_diagonal(*pair.target_size)
    from bench import imageio

    return metrics.image_diagonal(*imageio.read_size(pair.target_image))


def _row(pair: Pair, method: str, info: dict[str, Any]) -> Row:
    row = Row.begin(pair, method, IMPORTED_VERSION, {}, IMPORTED_DEVICE, TIME_REPORTED)
    return row.update(fallback=False, preprocess_cached=False, diagnostics=info)


def _score_row(pair: Pair, method: str, cell: str, minutes: str, table: Path, line: int, threshold: float,
               verdict: tuple[str, str] = ("", "")) -> tuple[Row, np.ndarray | None]:
    """One result row (and the warped points to store) for one pair of the submission. ``verdict``: the
    tool's own (status, error) when the table has a ``Method status`` column: a ``failed`` or ``timeout``
    there keeps the row failed, scored with the landmarks given (as the runner scores a fallback)."""
    seconds, time_note = _minutes(minutes)
    info: dict[str, Any] = {"imported_from": str(table), "table_line": line, "reported_minutes": minutes}
    if time_note:
        info["time_note"] = time_note
    row = _row(pair, method, info)
    row.time_s = seconds
    if not cell.strip():
        row.update(status="failed", error=f"{table}: line {line}: no warped landmark file named for pair {pair.pair_id}")
        return row, None
    path, problem = _confined(cell, table)
    if problem:
        row.update(status="failed", error=f"{table}: line {line}: pair {pair.pair_id}: {problem}")
        return row, None
    info["warped_landmarks"] = str(path)
    try:
        warped = read_landmarks(path, allow_negative=True)
    except LandmarkError as exc:
        why = f"not a landmark table: {exc.reason}" if exc.malformed else exc.reason
        row.update(status="failed", error=f"warped landmarks of pair {pair.pair_id}: {path}: {why}")
        return row, None
    row.status = "ok"
    if pair.problem:
        row.update(status="failed", error=pair.problem)
        return row, warped
    try:
        src = read_landmarks(pair.source_landmarks) if pair.source_landmarks else None
        tgt = read_landmarks(pair.target_landmarks) if pair.target_landmarks else None
    except LandmarkError as exc:
        row.update(status="failed", error=str(exc))
        return row, warped
    if src is not None and len(warped) != len(src):
        row.update(status="failed", error=f"warped landmarks of pair {pair.pair_id}: {path}: {len(warped)} points "
                   f"for {len(src)} source landmarks")
        return row, warped
    if tgt is None or src is None:
        row.status = "unscored"
        return row, warped
    try:
        diagonal = _diagonal(pair)
    except Exception as exc:  # noqa: BLE001 - an unreadable target image fails this row only
        row.update(status="failed", error=f"pair {pair.pair_id}: no image diagonal ({type(exc).__name__}: {exc})")
        return row, warped
    row.diagonal = diagonal
    scores = metrics.score_pair(warped, src, tgt, diagonal, threshold)
    row.update(**scores)
    row.success = bool(scores["success"])
    status, error = verdict
    if status.strip().lower() in ("failed", "timeout"):
        row.update(status=status.strip().lower(), success=False, fallback=True,
                   error=f"reported by the tool: {error.strip() or status}")
    return row, warped


def _confined(cell: str, table: Path) -> tuple[Path | None, str]:
    """The warped landmark file a submission cell names (relative to the table's folder, or absolute), and
    why it is not read: a path that leaves the submission folder (``..``, an absolute path elsewhere, a link
    out) or that is not a regular file. The table can name any path; only the submission's own files are
    read, and nothing of a file's content is ever quoted."""
    text = cell.strip()
    folder = table.parent.resolve()
    shown = text if len(text) <= 120 else text[:117] + "..."
    try:
        path = (folder / text).resolve()  # an absolute cell replaces the folder
    except (OSError, RuntimeError, ValueError) as exc:
        return None, f"column {COL_WARPED!r}: path {shown!r} cannot be resolved ({type(exc).__name__})"
    if not path.is_relative_to(folder):
        return None, (f"column {COL_WARPED!r}: path {shown!r} leaves the submission folder {folder}; not read "
                      "(name files inside the table's folder)")
    if path.exists() and not path.is_file():
        return None, f"column {COL_WARPED!r}: path {shown!r} is not a regular file; not read"
    return path, ""


def _check_replaceable(folder: Path, method: str, rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Refuse to replace ``method`` unless it was imported before: its rows' times were reported by a tool
    (``time_source`` reported), and with no rows, its manifest entry records an import. ``--replace`` swaps
    one submission for another; it never discards rows this harness measured."""
    times = [str(r.get("time_source") or "") for r in rows if r.get("method") == method]
    entry = (manifest.get("methods") or {}).get(method) or {}
    imported = all(t == TIME_REPORTED for t in times) if times else (
        entry.get("time_source") == TIME_REPORTED or "source" in entry)
    if not imported:
        measured = sum(t != TIME_REPORTED for t in times)
        raise ReportError(f"{folder}: method {method!r} was measured by this run ({measured} row(s)), not imported: "
                          "--replace replaces imported methods only; choose another --method name")


def _drop_method(store: ResultStore, method: str) -> int:
    """Remove ``method``'s rows (atomically, by the store) and its warped landmark files; rows removed."""
    rows = [r for r in store.rows() if r["method"] == method]
    removed = store.drop({(r["pair_id"], r["method"]) for r in rows})
    for r in rows:
        with contextlib.suppress(FileNotFoundError):
            warped_path(store.folder, method, r["pair_id"]).unlink()
    folder = warped_path(store.folder, method, "x").parent
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def import_anhir(run_dir: str | Path, method: str, table: str | Path, replace: bool = False) -> ImportSummary:
    """Add ``method``'s rows, read from the ANHIR submission ``table``, to the run folder ``run_dir``.

    Raises :class:`bench.report.ReportError` (one line) when nothing can be imported: no such run, a
    table that is not a submission, a pair the run's dataset does not have, a name already used.
    """
    run = load_run(run_dir, require_scored=False)
    table = Path(table).resolve()
    method = method.strip()
    if not method or any(c in method for c in "/\\\n\r\t,") or method in (".", ".."):
        raise ReportError(f"--method {method!r}: give a name without '/', '\\\\', ',' or line breaks")
    existing = set(run.results["method"]) | set((run.manifest.get("methods") or {}).keys())
    if method in existing and not replace:
        raise ReportError(f"{run.path}: method {method!r} is already in this run; choose another name or replace it "
                          "(--replace)")
    if method in existing:
        _check_replaceable(run.path, method, run.results[["method", "time_source"]].to_dict("records"),
                           run.manifest)
    ds = run.manifest.get("dataset") or {}
    ds_path = Path(ds.get("path") or "")
    if not ds.get("path") or not ds_path.is_file():
        raise ReportError(f"{run.path}: the run's dataset table {str(ds_path)!r} is gone: cannot score an import")
    try:
        pairs = {p.pair_id: p for p in load_table(ds_path, ds.get("data_roots") or ())}
    except DatasetError as exc:
        raise ReportError(str(exc)) from None
    sub, ids = _submission(table)
    unknown = [i for i in ids if i not in pairs]
    if unknown:
        raise ReportError(f"{table}: pair(s) {', '.join(unknown[:8])} not in the run's dataset {ds_path} "
                          f"(it has {len(pairs)} pairs)")
    _check_same_pairs(sub, ids, _raw_table(ds_path), table)
    # the run's own pairs only: a submission row for a pair the run never planned (a run made with --limit)
    # is ignored, so the imported method is scored on the pairs the run's other methods were
    planned = [pid for pid in record.planned_pairs(run.manifest, run.results.to_dict("records")) if pid in pairs]
    mine = set(planned)
    keep = [n for n, pid in enumerate(ids) if pid in mine]
    ignored = [pid for pid in ids if pid not in mine]
    sub, ids = sub.iloc[keep].reset_index(drop=True), [ids[n] for n in keep]
    lines = [n + 2 for n in keep]
    threshold = float(run.manifest.get("success_threshold", DEFAULT_THRESHOLD))
    blank = pd.Series([""] * len(sub), index=sub.index)
    times = sub[COL_TIME] if COL_TIME in sub.columns else blank
    verdicts = zip(sub[COL_STATUS] if COL_STATUS in sub.columns else blank,
                   sub[COL_ERROR] if COL_ERROR in sub.columns else blank, strict=True)
    rows, warped = [], {}
    for line, pid, cell, minutes, verdict in zip(lines, ids, sub[COL_WARPED], times, verdicts, strict=True):
        row, pts = _score_row(pairs[pid], method, cell, minutes, table, line, threshold, verdict)
        rows.append(row)
        if pts is not None:
            warped[pid] = pts
    given = set(ids)
    for pid in planned:  # pairs the run planned but the table lacks count against the tool
        if pid not in given:
            row = _row(pairs[pid], method, {"imported_from": str(table)})
            row.update(status="failed", error=f"{table}: no row for pair {pid} of the run")
            rows.append(row)
    digest = file_digest(table)
    summary = ImportSummary(run=run.path, method=method, table=table, sha256=digest, ignored=ignored)
    store = ResultStore(run.path)
    try:
        with store.lock("import-anhir"):  # one writer per run folder (a running `bench run` refuses us)
            now = store.rows()
            stored = {r["method"] for r in now}
            if method in stored and not replace:  # written since we looked
                raise ReportError(f"{run.path}: method {method!r} is already in this run (--replace)")
            if method in stored:
                _check_replaceable(run.path, method, now, store.read_manifest() or run.manifest)
                summary.replaced = _drop_method(store, method)
            for pid, pts in warped.items():
                store.write_warped(method, pid, pts)
            store.append(rows)
            manifest = store.read_manifest() or dict(run.manifest)
            record.note_import(manifest, method, IMPORTED_VERSION, table, digest, len(rows), summary.replaced)
            store.write_manifest(manifest)
    except (StoreError, FolderInUse) as exc:
        raise ReportError(str(exc)) from None
    for r in rows:
        summary.counts[r.status] = summary.counts.get(r.status, 0) + 1
    return summary


def summary_line(s: ImportSummary) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
    extra = f"; replaced {s.replaced} earlier rows" if s.replaced else ""
    if s.ignored:
        shown = ", ".join(s.ignored[:8]) + (", ..." if len(s.ignored) > 8 else "")
        extra += f"; ignored {len(s.ignored)} submission row(s) for pairs not in the run's plan ({shown})"
    else:
        extra += "; ignored 0 submission rows"
    return f"imported {s.method!r} into {s.run}: {counts}{extra} (table sha256 {s.sha256[:12]})"


__all__ = ["ImportSummary", "import_anhir", "summary_line"]
