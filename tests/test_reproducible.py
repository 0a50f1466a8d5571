"""A method's row depends on its inputs and parameters only: not on where the preprocessing came from (computed,
the worker's memory, the disk cache) nor on what ran before it in the process (issue: a result that seemed to
depend on hidden state). Compared exactly: status, error, matrix, per-pair rTRE and quality of every row."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from bench import work
from bench.plan import make_plan
from bench.runner import RunConfig, run

METHOD = "surf"  # the method whose rows were reported to move; its input is the full preprocessing's output
OTHERS = "sift,learned,iterative,preprocessed"


def _key(status, error, matrix, rtre, quality) -> tuple:
    number = (lambda v: None if v in ("", None) or v != v else float(v))  # noqa: E731 - a tiny local converter
    return (status, error or "", np.asarray(matrix, float).round(12).tobytes(), number(rtre), number(quality))


def _rows(out: Path) -> dict[str, tuple]:
    with (out / "results.csv").open(newline="") as fh:
        return {r["pair_id"]: _key(r["status"], r["error"], json.loads(r["matrix"]), r["rtre_median"], r["quality"])
                for r in csv.DictReader(fh) if r["method"] == METHOD}


def _reference(table: Path, out: Path) -> dict[str, tuple]:
    """``surf`` alone, its preprocessing computed, in a fresh worker process."""
    run(RunConfig(dataset=table, methods=METHOD, cache_enabled=False, device="cpu", out=out))
    return _rows(out)


def test_rows_do_not_depend_on_what_ran_before_in_the_process(tiny_table, tmp_path):
    ref = _reference(tiny_table, tmp_path / "ref")
    out = tmp_path / "after-others"
    run(RunConfig(dataset=tiny_table, methods=f"{OTHERS},{METHOD}", cache_enabled=False, device="cpu", out=out))
    assert _rows(out) == ref


def test_rows_do_not_depend_on_the_disk_cache(tiny_table, tmp_path):
    ref = _reference(tiny_table, tmp_path / "ref")
    cache, first, second = tmp_path / "cache", tmp_path / "fill", tmp_path / "read"
    for out in (first, second):
        run(RunConfig(dataset=tiny_table, methods=METHOD, cache_dir=cache, device="cpu", out=out))
    with (second / "results.csv").open(newline="") as fh:
        assert all(r["preprocess_cached"] == "True" for r in csv.DictReader(fh))  # read from disk
    assert _rows(first) == ref
    assert _rows(second) == ref


def test_rows_do_not_depend_on_the_workers_memory_or_the_order_of_methods(tiny_table, tmp_path):
    """In this long-lived test process (other tests ran before): split tasks keep the pair's preprocessing in
    memory, so the method reads it from there, after other methods ran on the pair."""
    ref = _reference(tiny_table, tmp_path / "ref")
    plan = make_plan(RunConfig(dataset=tiny_table, methods=f"{METHOD},{OTHERS}", cache_enabled=False,
                               device="cpu", out=tmp_path / "unused"))
    specs = {s.name: s for s in plan.specs}
    work._PREPARED.clear()
    got = {}
    for pair in plan.pairs:
        for name in ("sift", "learned", METHOD):
            result = work.run_pair(dataclasses.replace(plan.task(pair, (specs[name],)), split=True))
            if name == METHOD:
                r = result.rows[0]
                got[r.pair_id] = _key(r.status, r.error, r.matrix, r.rtre_median, r.quality)
    assert len(work._PREPARED) == len(plan.pairs)  # every pair was prepared once and then read from memory
    assert got == ref
