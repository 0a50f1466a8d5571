"""The results store of one run folder: ``results.csv``, ``warped-landmarks/`` and ``run.json``.

Rows are appended one (pair, method) at a time and flushed to disk, so killing a run loses at most the
calls in flight; reopening the folder repairs a half-written last line and reports which
(pair, method) keys are already stored, so the same command resumes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.datasets.anhir import write_landmarks
from bench.schema import COLUMNS, MANIFEST, RESULTS, SCHEMA_VERSION, STATUSES, WARPED

__all__ = ["COLUMNS", "SCHEMA_VERSION", "STATUSES", "ResultStore"]



def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return "True" if value else "False"
    if isinstance(value, float | np.floating):
        return "" if not math.isfinite(float(value)) else repr(float(value))
    if isinstance(value, dict | list | tuple | np.ndarray):
        return json.dumps(_jsonable(value), sort_keys=True)
    return " ".join(str(value).split())  # one line, always


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class ResultStore:
    """Append-only access to one run folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.results = self.folder / RESULTS
        self.manifest = self.folder / MANIFEST
        self.folder.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a half-written last line left by a killed run."""
        if not self.results.exists():
            return
        data = self.results.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.results.open("r+b") as fh:
                fh.truncate(keep)
        if self.results.stat().st_size > 0:
            with self.results.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != COLUMNS:
                raise ValueError(
                    f"{self.results}: written by another version of the results schema; "
                    "use a new --out folder"
                )

    def rows(self) -> list[dict[str, str]]:
        if not self.results.exists() or self.results.stat().st_size == 0:
            return []
        with self.results.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def done_keys(self) -> set[tuple[str, str]]:
        return {(r["pair_id"], r["method"]) for r in self.rows()}

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        new = not self.results.exists() or self.results.stat().st_size == 0
        with self.results.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(COLUMNS)
            for row in rows:
                unknown = set(row) - set(COLUMNS)
                if unknown:
                    raise KeyError(f"not result columns: {sorted(unknown)}")
                w.writerow([_cell(row.get(c)) for c in COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())

    def write_warped(self, method: str, pair_id: str, points: np.ndarray) -> Path:
        path = self.folder / WARPED / method / f"{pair_id}.csv"
        write_landmarks(path, points)
        return path

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest.exists():
            return None
        return json.loads(self.manifest.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.manifest)
