"""Summarise benchmark runs on real pair sets into one Markdown table (the README's "What it measured here").

Runs are ordinary ``bench run`` folders; this script only reads their ``results.csv``. Typical use, with the
real pairs beside the checkout and the variants written outside it by ``studies/make_variants.py``::

    python -m bench run --dataset ../shared/data/anhir-mini/dataset.csv --methods all --no-cache --out /tmp/r/mini
    python -m bench run --dataset /tmp/variants/moved/dataset.csv --methods all --no-cache --out /tmp/r/moved
    python -m bench run --dataset /tmp/variants/mirrored/dataset.csv --methods all --no-cache --out /tmp/r/mirrored
    python studies/evaluate_real.py mini=/tmp/r/mini moved=/tmp/r/moved mirrored=/tmp/r/mirrored

Per method and set: successes / pairs, median over pairs of the per-pair median rTRE (failed rows scored at
the fallback, as in the report), median time per call; per set: the ROC AUC of ``quality`` for telling
successes from failures over the ok rows of every method but identity (:func:`bench.quality.roc_auc`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.quality import roc_auc


def load(folder: str) -> pd.DataFrame:
    df = pd.read_csv(Path(folder) / "results.csv", dtype={"pair_id": str})
    df["success"] = df["success"].astype(str).str.lower() == "true"
    return df


def main(argv: list[str]) -> int:
    sets = dict(a.split("=", 1) for a in argv)
    frames = {name: load(folder) for name, folder in sets.items()}
    methods = list(dict.fromkeys(m for df in frames.values() for m in df["method"]))
    head = "| method | " + " | ".join(f"{s}: success | {s}: median rTRE | {s}: median time [s]" for s in frames)
    print(head + " |")
    print("|---" * (1 + 3 * len(frames)) + "|")
    for m in methods:
        cells = []
        for df in frames.values():
            g = df[df["method"] == m]
            if g.empty:
                cells += ["-", "-", "-"]
                continue
            t = g["time_s"].median() if m != "identity" else float("nan")
            cells += [f"{int(g['success'].sum())}/{len(g)}", f"{g['rtre_median'].median():.4f}",
                      "-" if not np.isfinite(t) else f"{t:.3f}"]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print()
    for name, df in frames.items():
        ok = df[(df["status"] == "ok") & (df["method"] != "identity") & df["quality"].notna()]
        print(f"{name}: quality ROC AUC {roc_auc(ok['quality'], ok['success']):.3f} "
              f"over {len(ok)} ok rows ({int(ok['success'].sum())} successes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
