"""Read and validate run folders (``results.csv`` + ``run.json`` + ``warped-landmarks/``).

The report only reads what a run stored; it never re-runs a method. :func:`load_runs` returns one tidy
frame over every run with the columns of the results schema (numbers as floats, booleans as bools) plus:

``run``          the run folder's name
``label``        how the method is shown everywhere: its name, plus ``[device]`` when the same method ran
                 on several devices, plus ``(run)`` when the same (method, device) comes from several runs
``pair_key``     ``<dataset checksum prefix>:<pair_id>``, so pairs compare across runs of one dataset only
``scored``       the row has a finite ``rtre_median``
``evaluable``    scored, or a failed/timeout row (it counts against the success rate)
``pair_status``  the ANHIR table's ``status`` (training/evaluation) when it can be found, else ``unknown``
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.datasets.anhir import DatasetError, LandmarkError, load_table, read_landmarks
from bench.schema import (
    BOOL_COLUMNS,
    COLUMNS,
    FAILURE_STATUSES,
    MANIFEST,
    NUMERIC_COLUMNS,
    RESULTS,
    SCHEMA_VERSION,
    WARPED,
)

DEFAULT_THRESHOLD = 0.035
REQUIRED_COLUMNS = COLUMNS
# the paper's row order (Initial, Preprocessed, Proposed, SIFT, SURF, Iterative); other methods follow
PAPER_ORDER = ("identity", "preprocessed", "learned", "sift", "surf", "iterative", "elastix")


class ReportError(Exception):
    """A run folder cannot be reported (one-line message naming the folder and the fault)."""


@dataclass
class Run:
    """One validated run folder."""

    path: Path
    manifest: dict[str, Any]
    results: pd.DataFrame
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return float(self.manifest.get("success_threshold", DEFAULT_THRESHOLD))

    @property
    def dataset_dir(self) -> Path | None:
        ds = (self.manifest.get("dataset") or {}).get("path")
        return Path(ds).parent if ds else None


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ReportError(f"{path}: no {MANIFEST} beside {RESULTS}: not a run folder written by `bench run`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{file}: not a run manifest (unreadable JSON: {exc})") from None
    if not isinstance(manifest, dict):
        raise ReportError(f"{file}: not a run manifest (a JSON object is expected)")
    version = manifest.get("schema_version")
    if version is None:
        raise ReportError(
            f"{file}: older results schema (no schema_version; this report reads {SCHEMA_VERSION})"
        )
    if not isinstance(version, int):
        raise ReportError(f"{file}: bad schema_version {version!r} (an integer is expected)")
    if version < SCHEMA_VERSION:
        raise ReportError(
            f"{file}: older results schema {version} (this report reads {SCHEMA_VERSION}); re-run the benchmark"
        )
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{file}: newer results schema {version} (this report reads {SCHEMA_VERSION}); update histreg-bench"
        )
    return manifest


def _read_results(path: Path) -> pd.DataFrame:
    file = path / RESULTS
    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ReportError(f"{file}: results file is empty") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ReportError(f"{file}: cannot read results ({str(exc).splitlines()[0]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ReportError(f"{file}: not a histreg-bench results file (missing columns: {', '.join(missing)})")
    if df.empty:
        raise ReportError(f"{file}: results file has no rows")
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in BOOL_COLUMNS:
        df[col] = df[col].str.strip().str.lower().isin(["true", "1", "yes"])
    df["status"] = df["status"].str.strip().str.lower()
    return df


def load_run(path: str | Path, require_scored: bool = True) -> Run:
    """Read and validate one run folder; raise :class:`ReportError` on any fault.

    ``require_scored=False`` accepts a run without any scored pair (the ANHIR evaluation set, whose target
    landmarks are withheld: it can still be exported).
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: run folder not found")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder (give the run folder, not a file in it)")
    if not (path / RESULTS).is_file():
        raise ReportError(
            f"{path}: not a run folder (no {RESULTS}); write one with `python -m bench run --out DIR`"
        )
    manifest = _read_manifest(path)
    df = _read_results(path)
    scored = np.isfinite(df["rtre_median"].to_numpy())
    if require_scored and not scored.any():
        counts = ", ".join(f"{k}: {v}" for k, v in df["status"].value_counts().items())
        raise ReportError(f"{path}: no scored pairs (no row has an rTRE; statuses {counts})")
    return Run(path=path.resolve(), manifest=manifest, results=df, name=path.resolve().name)


def resolve_file(value: str, run: Run) -> Path | None:
    """An existing file named in results.csv: as written, else relative to the run or the dataset folder."""
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value.strip())
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, run.path / p]
    if not p.is_absolute() and run.dataset_dir is not None:
        candidates.append(run.dataset_dir / p)
    return next((c for c in candidates if c.is_file()), None)


def _pair_status(run: Run) -> dict[str, str]:
    """pair_id -> training/evaluation from the run's pair table (empty when it cannot be read)."""
    ds = (run.manifest.get("dataset") or {}).get("path")
    if not ds or not Path(ds).is_file():
        return {}
    try:
        return {p.pair_id: p.status or "unknown" for p in load_table(ds)}
    except (DatasetError, OSError, ValueError):
        return {}


def _labels(df: pd.DataFrame) -> pd.Series:
    devices = df.groupby("method")["device"].nunique()
    runs = df.groupby(["method", "device"])["run"].nunique()
    labels = []
    for method, device, run in zip(df["method"], df["device"], df["run"], strict=True):
        label = method
        if devices[method] > 1:
            label += f" [{device}]"
        if runs[(method, device)] > 1:
            label += f" ({run})"
        labels.append(label)
    return pd.Series(labels, index=df.index)


def _in_paper_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows reordered so labels first appear in the paper's method order, then in their stored order."""
    first = {label: i for i, label in enumerate(dict.fromkeys(df["label"]))}
    rank = {m: i for i, m in enumerate(PAPER_ORDER)}
    key = [(rank.get(m, len(rank)), first[lab]) for m, lab in zip(df["method"], df["label"], strict=True)]
    order = sorted(range(len(df)), key=lambda i: key[i])
    return df.iloc[order].reset_index(drop=True)


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run.name = f"{base}-{seen[base]}"


def load_runs(paths: list[str | Path]) -> tuple[list[Run], pd.DataFrame]:
    """Load several run folders into one frame (see the module docstring for the added columns)."""
    if not paths:
        raise ReportError("no run folder given")
    runs = [load_run(p) for p in paths]
    _unique_names(runs)
    frames = []
    for run in runs:
        df = run.results.copy()
        df["run"] = run.name
        # machine-normalised time: method time / the run's fixed reference workload time (BIRL's idea)
        df["reference_time_s"] = float(run.manifest.get("reference_time_s") or np.nan)
        digest = str((run.manifest.get("dataset") or {}).get("sha256") or run.name)[:12]
        df["pair_key"] = digest + ":" + df["pair_id"].astype(str)
        status = _pair_status(run)
        if "pair_status" not in df.columns:
            df["pair_status"] = [status.get(p, "unknown") for p in df["pair_id"]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["device"] = df["device"].replace("", "unknown")
    df["label"] = _labels(df)
    df = _in_paper_order(df)
    df["scored"] = np.isfinite(df["rtre_median"].to_numpy())
    df["evaluable"] = df["scored"] | df["status"].isin(FAILURE_STATUSES)
    return runs, df


def latest_run(reports_root: str | Path) -> Path:
    """The most recently written run folder (holding results.csv and run.json) at or below ``reports_root``.

    Looks at the folder itself and two levels below it; "most recent" is the newest results.csv.
    """
    root = Path(reports_root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder; run `python -m bench run` first or give --run DIR")
    found = []
    for depth in ("", "*", "*/*"):
        for res in root.glob(f"{depth}/{RESULTS}" if depth else RESULTS):
            if (res.parent / MANIFEST).is_file():
                found.append((res.stat().st_mtime, res.parent))
    if not found:
        raise ReportError(f"{root}: no run folder (results.csv + run.json) found; give --run DIR")
    return max(found, key=lambda t: t[0])[1]


def _landmarks(path: Path | None) -> np.ndarray | None:
    return None if path is None else _cached_landmarks(str(path))


@functools.lru_cache(maxsize=4096)
def _cached_landmarks(path: str) -> np.ndarray | None:
    """A dataset landmark file (read once per report: target files recur for every method)."""
    try:
        pts = read_landmarks(path)
    except LandmarkError:
        return None
    pts.setflags(write=False)
    return pts


def read_points(path: Path) -> np.ndarray | None:
    """Warped landmarks ``(N, 2)`` from an ANHIR CSV, or None when missing or unreadable.

    Unlike the dataset's landmark files these may lie outside the image (negative coordinates) after a
    poor registration, so only finiteness is required.
    """
    try:
        return read_landmarks(path, allow_negative=True)
    except LandmarkError:
        return None


def landmark_errors(runs: list[Run], df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Per-landmark rTRE recomputed from the stored warped landmarks and the target landmark files.

    Returns
    -------
    after : DataFrame
        One row per landmark of every scored row whose files could be read: ``label``, ``pair_key``,
        ``rtre`` (float). Landmarks pair by row, first N common rows.
    before : DataFrame
        The initial error (unwarped source landmarks) once per pair: ``pair_key``, ``rtre``.
    notes : list of str
        Pairs whose files are missing, and pairs whose recomputed median disagrees with results.csv.
    """
    by_name = {r.name: r for r in runs}
    after, before, notes = [], {}, []
    missing, mismatch = 0, []
    for row in df[df["scored"]].itertuples(index=False):
        run = by_name[row.run]
        warped = read_points(run.path / WARPED / row.method / f"{row.pair_id}.csv")
        target = _landmarks(resolve_file(row.target_landmarks, run))
        if warped is None or target is None or not (row.diagonal > 0):
            missing += 1
            continue
        n = min(len(warped), len(target))
        err = np.linalg.norm(warped[:n] - target[:n], axis=1) / row.diagonal
        if not math.isclose(float(np.median(err)), row.rtre_median, rel_tol=1e-6, abs_tol=1e-9):
            mismatch.append(f"{row.label}/{row.pair_id}")
        after.append(pd.DataFrame({"label": row.label, "pair_key": row.pair_key, "rtre": err}))
        if row.pair_key not in before:
            source = _landmarks(resolve_file(row.source_landmarks, run))
            if source is not None:
                m = min(len(source), len(target))
                before[row.pair_key] = np.linalg.norm(source[:m] - target[:m], axis=1) / row.diagonal
    if missing:
        notes.append(
            f"{missing} scored row(s) lack a readable warped or target landmark file; left out of Figure 2"
        )
    if mismatch:
        notes.append(
            f"recomputed median rTRE differs from results.csv for {len(mismatch)} row(s): "
            + ", ".join(mismatch[:5])
        )
    after_df = (
        pd.concat(after, ignore_index=True) if after else pd.DataFrame(columns=["label", "pair_key", "rtre"])
    )
    before_df = pd.DataFrame([(k, e) for k, v in before.items() for e in v], columns=["pair_key", "rtre"])
    return after_df, before_df, notes


def relpath(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` with forward slashes (for links inside the report)."""
    return Path(os.path.relpath(path, start)).as_posix()
