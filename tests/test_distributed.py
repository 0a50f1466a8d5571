"""The Dask executor against a local cluster started by the test: same rows as the local run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench.runner import RunConfig, run

pytest.importorskip("distributed", reason="the Dask executor needs: pip install 'histreg-bench[distributed]'")


def _key(out: Path):
    with (out / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sorted((r["pair_id"], r["method"], r["status"], r["rtre_median"], r["matrix"]) for r in rows)


@pytest.mark.distributed
def test_dask_run_equals_local_run(tiny_table: Path, tmp_path: Path):
    common = dict(dataset=tiny_table, methods="identity,preprocessed", cache_enabled=False, device="cpu")
    run(RunConfig(out=tmp_path / "local", **common))
    summary = run(RunConfig(out=tmp_path / "dask", executor="dask", workers=2, **common))
    assert summary.written == 6
    assert _key(tmp_path / "local") == _key(tmp_path / "dask")
    warped = sorted(p.name for p in (tmp_path / "dask" / "warped-landmarks" / "preprocessed").iterdir())
    assert warped == ["0.csv", "1.csv", "2.csv"]
