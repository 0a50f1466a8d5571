"""The result record, declared once: a row of ``results.csv`` and the run manifest ``run.json``.

- :class:`Row`: one (pair, method) and what happened to it. Its fields are the columns of ``results.csv``, in
  order, each with its kind (text, number, bool, JSON): adding a column is one line there, and the writer,
  the reader and the report's typed frame follow. Rows are made by its builders only: :meth:`Row.failed`
  (a bad input, a method that cannot start), :meth:`Row.answered` (a method call that returned: ``ok``, or
  ``failed``/``timeout`` scored with its pair's :class:`Fallback`), :meth:`Row.lost` (a call that never
  returned: a crashed or killed worker), :meth:`Row.unsendable` (a row the worker could not send) and
  :meth:`Row.begin` (the identity columns, for tools outside the harness: :mod:`bench.anhir_import`).
- The manifest: :func:`run_manifest` builds it (with :data:`SCHEMA_VERSION`), :func:`check_resume` says
  whether a folder's stored manifest allows resuming into it, :func:`resumed` merges the two.
- The one reader of a run folder: :func:`read_rows` (every row checked: a junk line or a second row for
  one (pair, method) is refused, naming its line), :func:`read_manifest` (a JSON object of this schema
  version) and :func:`frame` (checked rows as a typed table). The runner, its resume, the report and the
  import all read through them; the store (:mod:`bench.store`) writes under its lock, each row through
  :meth:`Row.cells`.

>>> Status("ok").scored_by_method, caused_by_run("timeout")
(True, True)
>>> "quality" in COLUMNS and "time_source" in COLUMNS and "matrix" in JSON_COLUMNS
True
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.pairs import one_line

if TYPE_CHECKING:
    import pandas as pd

    from bench.pairs import Pair
    from bench.plan import MethodSpec, Plan

SCHEMA_VERSION = 4  # 2: quality and time_source columns; 3: start_rtre_median and time_nonrigid_s (nonrigid stages);
# 4: error_estimate (bench.quality.estimated_error)
RESULTS = "results.csv"
MANIFEST = "run.json"
WARPED = "warped-landmarks"


class RecordError(ValueError):
    """A results file or manifest that is not this schema's (one line naming the file and the fault)."""


class Status(StrEnum):
    """What happened to one (pair, method)."""

    OK = "ok"  # the method returned a matrix; scored when target landmarks exist
    FAILED = "failed"  # bad input, a crash, or the method reported failure (see ``error``)
    TIMEOUT = "timeout"  # the call ran past ``--timeout``
    UNSCORED = "unscored"  # ok, but no target landmarks (registered and exported only)

    @property
    def scored_by_method(self) -> bool:
        """The method produced its own answer (ok or unscored)."""
        return self in (Status.OK, Status.UNSCORED)


STATUSES = tuple(s.value for s in Status)
FAILURE_STATUSES = (Status.FAILED.value, Status.TIMEOUT.value)

# ``error`` of a ``failed`` row whose call never ended normally: the worker process died (a signal, an
# ``os._exit``, the memory killer) or the method called ``sys.exit``. Such failures are the run's, like
# timeouts: a rerun retries them (a method that reported failure, or a bad input, is not retried).
CRASHED = "crashed:"
RUN_FAULT_PREFIXES = (CRASHED,)


def caused_by_run(status: str, error: str = "") -> bool:
    """True for rows a rerun retries by default: timeouts and crashes.

    >>> caused_by_run("timeout"), caused_by_run("failed", "crashed: killed by signal SIGSEGV")
    (True, True)
    >>> caused_by_run("failed", "method reported failure: 3 inliers"), caused_by_run("ok")
    (False, False)
    """
    if status == Status.TIMEOUT.value:
        return True
    return status == Status.FAILED.value and str(error).startswith(RUN_FAULT_PREFIXES)


# Where ``time_s`` came from: the harness's own clock, or the figure a tool reported (imported submissions).
TIME_MEASURED = "measured"
TIME_REPORTED = "reported"

TEXT, NUMBER, BOOL, JSON = "text", "number", "bool", "json"  # column kinds (how the report types them)


def _column(kind: str = TEXT) -> Any:
    return field(default=None, metadata={"kind": kind})


# ------------------------------------------------------------------------------------------------ the row


@dataclass(frozen=True)
class Scores:
    """One matrix scored on one pair: what a row takes from the landmarks."""

    matrix: np.ndarray  # (3, 3), original pixel coordinates
    diagonal: float  # the diagonal the rTRE columns are divided by
    values: dict[str, Any]  # bench.metrics.score_pair's columns; empty without both landmark files
    warped: np.ndarray | None  # the source landmarks moved by ``matrix`` (None without source landmarks)
    has_target: bool  # the pair has target landmarks (else an answered row is ``unscored``)


@dataclass(frozen=True)
class Fallback:
    """What the rows of one pair and preprocessing stage share: the stage's diagnostics, compute time and
    cache hit, and ``scores``, the preprocessing alone scored (the answer of a call that gives none). Made
    once per pair and stage by the worker, sent before each call, so a row can be built for any call."""

    scores: Scores
    diagnostics: dict[str, Any]  # the stage's scalar diagnostics (a row's ``diagnostics.preprocess``)
    time_s: float
    cached: bool


@dataclass(slots=True)
class Row:
    """One row of ``results.csv``. The fields are the columns in file order, each with its kind; a field
    left ``None`` is an empty cell. Make rows with the builders (class methods)."""

    pair_id: str = _column()
    tissue: str = _column()
    method: str = _column()
    method_version: str = _column()
    status: str = _column()
    error: str = _column()
    n_landmarks: int = _column(NUMBER)
    rtre_median: float = _column(NUMBER)
    rtre_mean: float = _column(NUMBER)
    rtre_max: float = _column(NUMBER)
    rtre_min: float = _column(NUMBER)
    rtre_std: float = _column(NUMBER)
    ire_median: float = _column(NUMBER)
    robustness: float = _column(NUMBER)
    success: bool = _column(BOOL)
    quality: float = _column(NUMBER)
    error_estimate: float = _column(NUMBER)  # an ok affine answer: landmark-free estimate of its rTRE
    start_rtre_median: float = _column(NUMBER)  # a nonrigid answer: the median rTRE of the affine it started from
    time_s: float = _column(NUMBER)
    time_cpu_s: float = _column(NUMBER)
    time_nonrigid_s: float = _column(NUMBER)  # a nonrigid answer: the time of its nonrigid stage (part of time_s)
    time_source: str = _column()
    time_preprocess_s: float = _column(NUMBER)
    preprocess_cached: bool = _column(BOOL)
    device: str = _column()
    params: dict = _column(JSON)
    matrix: np.ndarray = _column(JSON)
    diagnostics: dict = _column(JSON)
    fallback: bool = _column(BOOL)
    source_image: str = _column()
    target_image: str = _column()
    source_landmarks: str = _column()
    target_landmarks: str = _column()
    diagonal: float = _column(NUMBER)

    # -- builders ----------------------------------------------------------------------------------------
    @classmethod
    def begin(cls, pair: Pair, method: str, version: str, params: dict[str, Any], device: str = "",
              time_source: str = TIME_MEASURED) -> Row:
        """The columns every row of (pair, method) has, whatever happened (no status yet)."""
        return cls(pair_id=pair.pair_id, tissue=pair.tissue, method=method, method_version=version,
                   params=params, source_image=str(pair.source_image), target_image=str(pair.target_image),
                   source_landmarks=str(pair.source_landmarks or ""),
                   target_landmarks=str(pair.target_landmarks or ""), diagonal=pair.diagonal, success=False,
                   time_source=time_source, device=device)

    @classmethod
    def failed(cls, pair: Pair, spec: MethodSpec, error: str, device: str = "") -> Row:
        """A ``failed`` row with nothing scored: a bad input, a method that cannot start."""
        return cls.begin(pair, spec.name, spec.version, spec.params_dict(), device).update(
            status=Status.FAILED.value, error=error)

    @classmethod
    def answered(cls, pair: Pair, spec: MethodSpec, device: str, fallback: Fallback, status: str, error: str,
                 diagnostics: dict[str, Any], wall: float | None, cpu: float | None,
                 scores: Scores | None = None, quality: float | None = None,
                 error_estimate: float | None = None) -> Row:
        """The row of one method call: ``ok`` with the method's ``scores`` (``unscored`` when the pair has no
        target landmarks), or ``failed``/``timeout`` scored with ``fallback`` (and never a success)."""
        ok = status == Status.OK.value
        scores = scores if scores is not None and ok else fallback.scores
        row = cls.begin(pair, spec.name, spec.version, spec.params_dict(), device)
        row.update(status=status, error=error, time_s=wall, time_cpu_s=cpu, matrix=scores.matrix,
                   diagnostics={**diagnostics, "preprocess": fallback.diagnostics}, fallback=not ok,
                   time_preprocess_s=fallback.time_s, preprocess_cached=fallback.cached, diagonal=scores.diagonal)
        row.update(**scores.values)
        row.success = bool(scores.values.get("success", False)) and ok
        if ok and not scores.has_target:
            row.status = Status.UNSCORED.value
        if ok and quality is not None:
            row.quality = quality
        if ok and error_estimate is not None:
            row.error_estimate = error_estimate
        return row

    @classmethod
    def lost(cls, pair: Pair, spec: MethodSpec, device: str, fallback: Fallback | None, status: str, error: str,
             wall: float) -> Row:
        """A call that never returned (its worker crashed, or was stopped past the time limit): ``status``
        (``failed`` with a :data:`CRASHED` error, or ``timeout``), scored with ``fallback`` when it came."""
        if fallback is None:
            return cls.failed(pair, spec, error, device).update(status=status, time_s=wall, fallback=True)
        return cls.answered(pair, spec, device, fallback, status, error, {}, wall, None)

    def unsendable(self, error: str) -> Row:
        """This row's ``failed`` stand-in (its identity columns only) when the row itself cannot be sent."""
        keep = ("pair_id", "tissue", "method", "method_version", "params", "source_image", "target_image",
                "source_landmarks", "target_landmarks", "diagonal", "device", "time_source")
        return Row(**{c: getattr(self, c) for c in keep}).update(status=Status.FAILED.value, success=False,
                                                                  error=error)

    # -- access --------------------------------------------------------------------------------------------
    def update(self, **values: Any) -> Row:
        """Set columns (an unknown name raises AttributeError); returns the row."""
        for name, value in values.items():
            setattr(self, name, value)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}

    def cells(self) -> list[str]:
        """The row as written to ``results.csv``: one string per column."""
        return [_cell(getattr(self, c)) for c in COLUMNS]


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
NUMERIC_COLUMNS = tuple(f.name for f in dataclasses.fields(Row) if f.metadata["kind"] == NUMBER)
BOOL_COLUMNS = tuple(f.name for f in dataclasses.fields(Row) if f.metadata["kind"] == BOOL)
JSON_COLUMNS = tuple(f.name for f in dataclasses.fields(Row) if f.metadata["kind"] == JSON)


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars, tuples and paths turned into JSON types (others kept)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return "True" if value else "False"
    if isinstance(value, float | np.floating):
        return "" if not math.isfinite(float(value)) else repr(float(value))
    if isinstance(value, dict | list | tuple | np.ndarray):
        return json.dumps(jsonable(value), sort_keys=True)
    return one_line(value)  # one line, always



# ------------------------------------------------------------------------------------------ the reader


def check_header(header: list[str], path: Path) -> None:
    """Refuse a results file whose header is not this schema's."""
    if tuple(header) != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        detail = f"missing columns: {', '.join(missing[:6])}" if missing else "columns out of order or unknown"
        raise RecordError(f"{path}: not a histreg-bench results file, or not written by this version of the "
                          f"results schema {SCHEMA_VERSION} ({detail})")


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Every row of the results file ``path`` as stored (strings), checked: a line that is not a result row
    (another tool's crash, a hand edit) or a second row for one (pair, method) raises :class:`RecordError`
    naming its line. A missing or empty file has no rows; a last line being written is left out."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    if not text.endswith("\n"):  # a line being written right now (read without the writer's lock)
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(text.splitlines(keepends=True))
    check_header(next(reader, []), path)
    out: list[dict[str, str]] = []
    first: dict[tuple[str, str], int] = {}
    for cells in reader:
        line = reader.line_num
        problem = None
        if len(cells) != len(COLUMNS):
            problem = f"{len(cells)} fields, expected {len(COLUMNS)}"
        else:
            row = dict(zip(COLUMNS, cells, strict=True))
            if row["status"] not in STATUSES:
                problem = f"unknown status {row['status']!r}"
            elif not row["method"] or not row["method_version"]:
                problem = "no method"
        if problem:
            raise RecordError(f"{path}: line {line}: not a result row ({problem}); remove the line")
        key = (row["pair_id"], row["method"])
        if key in first:
            raise RecordError(f"{path}: line {line}: a second row for pair {key[0]!r}, method {key[1]!r} "
                              f"(first on line {first[key]}); remove one")
        first[key] = line
        out.append(row)
    return out


def frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    """Checked rows (:func:`read_rows`) as a table: numbers as floats (NaN when empty), booleans as bools,
    text and JSON as stored."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(COLUMNS), dtype=str)
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in BOOL_COLUMNS:
        df[col] = df[col].str.strip().str.lower().isin(["true", "1", "yes"])
    return df


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The run manifest ``path`` (None when there is none), checked: a JSON object of this schema version."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable, not a run manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise RecordError(f"{path}: not a run manifest (a JSON object is expected)")
    version = manifest.get("schema_version")
    if version is None:
        raise RecordError(f"{path}: older results schema (no schema_version; this version reads {SCHEMA_VERSION})")
    if not isinstance(version, int):
        raise RecordError(f"{path}: bad schema_version {version!r} (an integer is expected)")
    if version < SCHEMA_VERSION:
        raise RecordError(f"{path}: older results schema {version} (this version reads {SCHEMA_VERSION}); "
                          "re-run the benchmark")
    if version > SCHEMA_VERSION:
        raise RecordError(f"{path}: newer results schema {version} (this version reads {SCHEMA_VERSION}); "
                          "update histreg-bench")
    return manifest


# ------------------------------------------------------------------------------------------ the manifest


def run_manifest(plan: Plan) -> dict[str, Any]:
    """``run.json`` of a run of ``plan``: the schema version, command, provenance, dataset, parameters."""
    from bench import preprocess, provenance
    from bench.pairs import file_digest

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
            "pairs": [p.pair_id for p in plan.pairs],  # the run's plan (--limit, --pairs): what imports match
            "data_roots": [str(r) for r in c.data_roots],
        },
        "preprocess": dataclasses.asdict(plan.preprocess),
        "preprocess_code": preprocess.stage_fingerprint(),  # the stage's code and libraries (bench.preprocess.fingerprint)
        "methods": {s.name: {"version": s.version, "params": s.params_dict()} for s in plan.specs},
        "skipped_methods": plan.skipped,
        "device": plan.device,
        "seed": c.seed,
        "workers": plan.workers,
        "executor": plan.executor,
        "timeout_s": plan.timeout_s,
        "success_threshold": plan.success_threshold,
        "error_estimate": plan.config.error_estimate,
    }


def check_resume(folder: Path, old: dict[str, Any] | None, new: dict[str, Any], has_rows: bool) -> None:
    """Refuse (:class:`RecordError`) to add the rows of a run with manifest ``new`` to ``folder``, whose
    stored manifest is ``old`` (read by :func:`read_manifest`), when they could not be compared."""
    if old is None:
        if has_rows:
            raise RecordError(f"{folder} holds {RESULTS} but no {MANIFEST}: its rows cannot be checked against "
                              "this run; use a new --out")
        return
    if old.get("dataset", {}).get("sha256") != new["dataset"]["sha256"]:
        raise RecordError(f"{folder} holds results of another dataset ({old.get('dataset', {}).get('path')}): "
                          "use a new --out")
    if old.get("preprocess") != new["preprocess"]:
        raise RecordError(f"{folder} holds results made with other preprocessing parameters: use a new --out")
    if old.get("success_threshold", new["success_threshold"]) != new["success_threshold"]:
        raise RecordError(f"{folder} holds results scored with --success-threshold "
                          f"{old.get('success_threshold')}: use a new --out")
    for name, info in new["methods"].items():
        prev = old.get("methods", {}).get(name)
        if prev and (prev.get("params") != info["params"] or prev.get("version") != info["version"]):
            raise RecordError(
                f"{folder} holds {name!r} results made with other parameters or another version "
                f"({prev}); use a new --out to compare them"
            )


def resumed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` for a folder resumed from ``old``: earlier methods and planned pairs kept, the first creation
    time kept, the resume time added."""
    new["methods"] = {**old.get("methods", {}), **new["methods"]}
    old_pairs = (old.get("dataset") or {}).get("pairs")
    if isinstance(old_pairs, list):  # the folder's plan is every pair any of its runs planned
        new["dataset"]["pairs"] = list(dict.fromkeys([*map(str, old_pairs), *new["dataset"]["pairs"]]))
    new["created"] = old.get("created", new["created"])
    new["resumed"] = datetime.now(UTC).isoformat(timespec="seconds")
    return new


def planned_pairs(manifest: dict[str, Any], rows: list[dict[str, str]]) -> list[str]:
    """The pair ids a run folder's runs planned (``run.json`` ``dataset.pairs``), else, for a folder written
    before the plan was recorded, the pair ids of its rows, in order."""
    pairs = (manifest.get("dataset") or {}).get("pairs")
    if isinstance(pairs, list):
        return [str(p) for p in pairs]
    return list(dict.fromkeys(r["pair_id"] for r in rows))


def note_import(manifest: dict[str, Any], method: str, version: str, table: Path, sha256: str, rows: int,
                replaced: int) -> None:
    """Record in ``manifest`` a method whose rows were imported from a submission ``table``."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    entry = {"version": version, "params": {}, "source": {"table": str(table), "sha256": sha256},
             "imported": now, "time_source": TIME_REPORTED}
    manifest.setdefault("methods", {})[method] = entry
    manifest.setdefault("imports", []).append({"method": method, **entry["source"], "imported": now,
                                               "rows": rows, "replaced": replaced})
