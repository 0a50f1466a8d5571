"""Export one method of a run in the ANHIR challenge's submission layout.

The layout BIRL's ``evaluate_submission.py`` reads::

    <out>/registration-results.csv   the pair table (all its columns, unchanged) plus
                                     ``Warped source landmarks`` (path relative to <out>) and
                                     ``Execution time [minutes]``; and, not ANHIR's, ``Method status`` and
                                     ``Method error`` (a failed row's warped landmarks are its fallback's)
    <out>/warped-landmarks/<pair_id>.csv   the source landmarks warped into the target frame (,X,Y)
    <out>/export.json                what was exported, from which run, how time was counted

The evaluator merges the submission into its own table on the four path columns, so they are copied from
the run's pair table as written there. Execution time is the method's time plus the pair's preprocessing
time (the challenge timed whole registrations); ``include_preprocess=False`` gives the method alone.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from bench import pairs
from bench.report.load import WARPED, ReportError, Run, load_run
from bench.store import safe_name, warped_path

RESULTS_NAME = "registration-results.csv"
COL_WARPED = "Warped source landmarks"
COL_TIME = "Execution time [minutes]"
# not ANHIR's: the method's own verdict, so a failure scored with its fallback landmarks stays a failure when
# the submission is imported again (BIRL's evaluator ignores columns it does not know)
COL_STATUS = "Method status"
COL_ERROR = "Method error"


def _pair_table(run: Run) -> tuple[pd.DataFrame, list[str]] | None:
    """The run's pair table as strings, and the pair id of each of its rows (None when it is gone)."""
    path = (run.manifest.get("dataset") or {}).get("path")
    if not path or not Path(path).is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    first = table.columns[0]
    if first.startswith("Unnamed") or first.strip().lower() in ("", "index"):
        table = table.rename(columns={first: ""})
        ids = [pairs.one_line(v) for v in table[""]]  # the form pair ids have in the run
    else:
        ids = [str(i) for i in range(len(table))]
    extra = (COL_WARPED, COL_TIME, COL_STATUS, COL_ERROR)
    return table.drop(columns=[c for c in extra if c in table.columns]), ids


def _table_from_results(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A pair table rebuilt from results.csv when the original is no longer where the run found it."""
    table = pd.DataFrame(
        {
            "": rows["pair_id"].to_numpy(),
            pairs.COL_SOURCE_IMAGE: rows["source_image"].to_numpy(),
            pairs.COL_SOURCE_LANDMARKS: rows["source_landmarks"].to_numpy(),
            pairs.COL_TARGET_IMAGE: rows["target_image"].to_numpy(),
            pairs.COL_TARGET_LANDMARKS: rows["target_landmarks"].to_numpy(),
            pairs.COL_DIAGONAL: rows["diagonal"].to_numpy(),
        }
    )
    return table, list(rows["pair_id"])


def _minutes(row: pd.Series, include_preprocess: bool) -> float:
    t = row["time_s"]
    if include_preprocess and math.isfinite(row["time_preprocess_s"]):
        t += row["time_preprocess_s"]
    return float(t) / 60.0 if math.isfinite(t) else math.nan


def export_anhir(run_dir: str | Path, method: str, out_dir: str | Path | None = None,
                 include_preprocess: bool = True) -> Path:
    """Write ``method``'s results of ``run_dir`` as an ANHIR submission folder; return that folder.

    Default folder: ``<run_dir>/anhir-export/<method>``. Raises :class:`ReportError` for an unknown method.
    """
    run = load_run(run_dir, require_scored=False)
    df = run.results
    methods = list(dict.fromkeys(df["method"]))
    if method not in methods:
        raise ReportError(f"{run.path}: method {method!r} not in this run (it has: {', '.join(methods)})")
    rows = df[df["method"] == method].drop_duplicates("pair_id", keep="last").set_index("pair_id", drop=False)
    out = Path(out_dir) if out_dir is not None else run.path / "anhir-export" / safe_name(method)
    found = _pair_table(run)
    table, ids = found if found is not None else _table_from_results(rows)
    (out / WARPED).mkdir(parents=True, exist_ok=True)
    warped_col, time_col, status_col, error_col, missing = [], [], [], [], []
    for pid in ids:
        src = warped_path(run.path, method, pid)
        if pid not in rows.index or not src.is_file():
            warped_col.append("")
            time_col.append("")
            status_col.append(str(rows.loc[pid, "status"]) if pid in rows.index else "")
            error_col.append(str(rows.loc[pid, "error"]) if pid in rows.index else "not in the run")
            missing.append(pid)
            continue
        rel = f"{WARPED}/{safe_name(pid)}.csv"
        shutil.copyfile(src, out / rel)
        warped_col.append(rel)
        minutes = _minutes(rows.loc[pid], include_preprocess)
        time_col.append(repr(minutes) if math.isfinite(minutes) else "")
        status_col.append(str(rows.loc[pid, "status"]))
        error_col.append(str(rows.loc[pid, "error"]))
    table[COL_WARPED] = warped_col
    table[COL_TIME] = time_col
    table[COL_STATUS] = status_col
    table[COL_ERROR] = error_col
    table.to_csv(out / RESULTS_NAME, index=False)
    info = {
        "run": str(run.path),
        "method": method,
        "method_version": str(rows["method_version"].iloc[0]),
        "pair_table": "copied from the run's dataset table"
        if found is not None
        else "rebuilt from results.csv",
        "pairs": len(ids),
        "pairs_without_warped_landmarks": missing,
        "execution_time": "method + preprocessing" if include_preprocess else "method only",
        "note": "computer-performances.json (BIRL's machine benchmark for time normalisation) is not produced",
    }
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
