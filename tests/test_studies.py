"""Smoke tests of the study scripts in studies/ on tiny inputs (they are run by hand, not by the suite)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"studies_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(*entries):
    return pd.DataFrame([{"pair_id": p, "method": m, "status": s, "rtre_median": r, "matrix": json.dumps(x)}
                         for p, m, s, r, x in entries])


def test_same_rows_finds_every_kind_of_difference():
    same_rows = _load("same_rows")
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    moved = [[1.0, 0.0, 1e-6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    ref = _rows(("0", "sift", "ok", 0.01, eye), ("1", "sift", "ok", 0.02, eye), ("2", "sift", "ok", 0.03, eye),
                ("3", "sift", "failed", "", eye))
    assert same_rows.differences(ref, ref.copy()) == []
    new = _rows(("0", "sift", "ok", 0.01, moved), ("1", "sift", "failed", 0.02, eye),
                ("2", "sift", "ok", 0.0300001, eye), ("4", "sift", "ok", 0.01, eye))
    diff = same_rows.differences(ref, new)
    assert any("('0', 'sift'): matrix" in d for d in diff)
    assert any("('1', 'sift'): status ok -> failed" in d for d in diff)
    assert any("('2', 'sift'): rtre_median" in d for d in diff)
    assert any("('3', 'sift'): only in the reference" in d for d in diff)
    assert any("('4', 'sift'): only in the new run" in d for d in diff)
    assert len(diff) == 5


def test_same_rows_references_cover_every_pair_and_method():
    same_rows = _load("same_rows")
    for name, pairs in (("sample", 24), ("anhir-mini", 12)):
        ref = pd.read_csv(same_rows.reference_path(name), dtype={"pair_id": str}, keep_default_na=False)
        assert ref.groupby("method").size().eq(pairs).all(), name
        assert not ref.duplicated(["pair_id", "method"]).any()
