"""Large images end to end at a reduced scale: a generated pyramidal tiled TIFF and a JPEG pair decode
at reduced size (never full size) and give the same alignment through the whole pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.largescale import write_large_pair
from bench.runner import RunConfig, run


@pytest.mark.slow
def test_large_pair_jpeg_and_tiled_tiff(tmp_path: Path):
    tables = write_large_pair(tmp_path / "data", long_side=4096, factor=4)
    results = {}
    for fmt, table in tables.items():
        out = tmp_path / fmt
        run(RunConfig(dataset=table, out=out, methods="identity,preprocessed", cache_enabled=False,
                      device="cpu"))
        with (out / "results.csv").open() as fh:
            rows = {r["method"]: r for r in csv.DictReader(fh)}
        assert {r["status"] for r in rows.values()} == {"ok"}
        diag = json.loads(rows["preprocessed"]["diagnostics"])["preprocess"]
        assert any(k in diag["decode_source"] for k in ("dct", "level", "bands")), diag["decode_source"]
        results[fmt] = rows
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["peak_rss_mb"]["self"] > 0
    for method in ("identity", "preprocessed"):
        a, b = (float(results[f][method]["rtre_median"]) for f in ("jpeg", "tiff"))
        assert a == pytest.approx(b, abs=2e-3)
    assert float(results["tiff"]["preprocessed"]["rtre_median"]) < float(results["tiff"]["identity"]["rtre_median"])
