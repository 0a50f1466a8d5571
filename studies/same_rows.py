"""Same rows before and after a change: run the benchmark on a set and compare every row with a stored reference.

A refactor must not change what the methods answer. This script runs ``python -m bench run --methods all
--no-cache`` on the embedded sample (``--set sample``) or on the real pairs of ``../shared/data/anhir-mini``
(``--set anhir-mini``, evaluation data: read, never copied into the project), then compares each (pair, method)
row's status, matrix and per-pair rTRE with ``studies/reference/<set>.csv`` (made from a run of the code before
the change; only those columns, no image or landmark data). Exit status 1 and one line per difference when a
row differs, 0 when every row is the same.

    python studies/same_rows.py --set sample                 # run, compare
    python studies/same_rows.py --set anhir-mini --run DIR   # compare an existing run folder instead
    python studies/same_rows.py --set sample --methods identity,sift   # only these methods (run and compare)
    python studies/same_rows.py --set anhir-mini --update    # store a new reference (after a wanted change)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SETS = {"sample": None, "anhir-mini": HERE.parent.parent / "shared" / "data" / "anhir-mini" / "dataset.csv"}
KEEP = ["pair_id", "method", "status", "rtre_median", "matrix"]
TOLERANCE = 1e-9  # absolute, on matrix entries (pixels) and rTRE: the rows of one machine are bit-identical


def reference_path(name: str) -> Path:
    return HERE / "reference" / f"{name}.csv"


def run_set(name: str, out: Path, methods: str, workers: int) -> Path:
    """Run the benchmark on ``name`` into ``out`` (no cache: every stage computed)."""
    cmd = [sys.executable, "-m", "bench", "run", "--methods", methods, "--no-cache", "--workers", str(workers),
           "--out", str(out)]
    if SETS[name] is not None:
        if not SETS[name].is_file():
            raise SystemExit(f"error: {SETS[name]} not found (the real pairs live in ../shared/data)")
        cmd += ["--dataset", str(SETS[name])]
    subprocess.run(cmd, check=True)
    return out


def rows(run: Path, methods: str = "all", file: str = "results.csv") -> pd.DataFrame:
    """The compared columns of a run folder's results.csv (or another ``file`` there, e.g. a reference), one row
    per (pair, method); only ``methods`` (a comma-separated list) unless ``all``."""
    df = pd.read_csv(run / file, dtype={"pair_id": str}, keep_default_na=False)
    if methods != "all":
        df = df[df["method"].isin([m.strip() for m in methods.split(",")])]
    return df[KEEP].sort_values(["method", "pair_id"]).reset_index(drop=True)


def differences(ref: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """One line per (pair, method) whose status, matrix or rTRE differs, or that is missing on one side."""
    out = []
    a, b = ref.set_index(["pair_id", "method"]), new.set_index(["pair_id", "method"])
    for key in sorted(set(a.index) ^ set(b.index)):
        out.append(f"{key}: only in the {'reference' if key in a.index else 'new run'}")
    for key in sorted(set(a.index) & set(b.index)):
        r, n = a.loc[key], b.loc[key]
        if r["status"] != n["status"]:
            out.append(f"{key}: status {r['status']} -> {n['status']}")
            continue
        for col in ("rtre_median", "matrix"):
            x = np.asarray(json.loads(r[col]) if col == "matrix" else float(r[col] or "nan"), float)
            y = np.asarray(json.loads(n[col]) if col == "matrix" else float(n[col] or "nan"), float)
            if x.shape != y.shape or not np.allclose(x, y, rtol=0, atol=TOLERANCE, equal_nan=True):
                out.append(f"{key}: {col} {r[col]} -> {n[col]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="sample")
    ap.add_argument("--run", type=Path, help="compare this run folder instead of running the benchmark")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--update", action="store_true", help="store the run as the new reference")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or run_set(args.set, Path(tmp) / args.set, args.methods, args.workers)
        new = rows(run, args.methods)
        if args.update:
            reference_path(args.set).parent.mkdir(parents=True, exist_ok=True)
            new.to_csv(reference_path(args.set), index=False)
            print(f"stored {len(new)} rows as {reference_path(args.set)}")
            return 0
    ref = rows(reference_path(args.set).parent, args.methods, reference_path(args.set).name)
    diff = differences(ref, new)
    for line in diff:
        print(line)
    print(f"{len(new)} rows compared with {reference_path(args.set).name}: {len(diff)} differ")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
