"""The downstream section of the report: what a start is worth to a nonrigid stage (docs/report.md, "Downstream
success: the paper's definition, measured").

A row is *downstream* when a nonrigid stage produced it (``M>STAGE``, ``--then STAGE``, or a nonrigid method
alone, which starts from the preprocessing): the run stored its start's median rTRE (``start_rtre_median``) or
its stage time (``time_nonrigid_s``); every row of a method with such a row belongs to it (its failed rows too).

- :func:`downstream_table`: per method, the final Median-Median / Average-Median rTRE, the start's, downstream
  success, convergence, pairs made worse, the stage's time;
- :func:`proxy_table`: how well the affine proxy (start rTRE <= the run's success threshold) predicts downstream
  success, and the start threshold that would predict it best on these rows;
- :func:`capture_plot`: final against start rTRE, one point per pair and method (the capture range).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench import metrics
from bench.report import plots

PAIR_COLUMNS = ("start_rtre_median", "time_nonrigid_s")


def downstream_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of nonrigid methods, with ``start``, ``final``, ``converged`` and ``downstream`` columns."""
    if not set(PAIR_COLUMNS) <= set(df.columns):
        return df.iloc[0:0].assign(start=[], final=[], converged=[], downstream=[], stage=[], start_method=[])
    marked = df[list(PAIR_COLUMNS)].notna().any(axis=1)
    labels = set(df.loc[marked, "label"])
    rows = df[df["label"].isin(labels)].copy()
    rows["start"] = pd.to_numeric(rows["start_rtre_median"], errors="coerce")
    rows["final"] = pd.to_numeric(rows["rtre_median"], errors="coerce").where(rows["status"] == "ok")
    rows["converged"] = [metrics.converged(s, f) for s, f in zip(rows["start"], rows["final"], strict=True)]
    rows["downstream"] = [metrics.downstream_success(st, s, f)
                          for st, s, f in zip(rows["status"], rows["start"], rows["final"], strict=True)]
    split = rows["method"].map(_split)
    rows["start_method"], rows["stage"] = split.str[0], split.str[1]
    return rows


def _split(method: str) -> tuple[str, str]:
    """``(start method, stage)`` of a composed name's last refinement step: ``sift>deformable`` ->
    ``("sift", "deformable")``, ``(sift|surf)>demons`` -> ``("sift|surf", "demons")``; a nonrigid method alone
    starts from the preprocessing.

    >>> _split("(sift|surf)>demons"), _split("deformable")
    (('sift|surf', 'demons'), ('preprocessed', 'deformable'))
    """
    depth, cut = 0, -1
    for i, ch in enumerate(method):
        depth += (ch == "(") - (ch == ")")
        if ch == ">" and depth == 0:
            cut = i
    if cut < 0:
        return "preprocessed", method
    start = method[:cut]
    if start.startswith("(") and start.endswith(")"):
        start = start[1:-1]
    return start, method[cut + 1:]


def downstream_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per nonrigid method label: Table 1's accuracy columns after the stage, and the start's."""
    rows = downstream_rows(df)
    records = []
    for label, g in rows.groupby("label", sort=False):
        scored = g.dropna(subset=["final"])
        stage_time = pd.to_numeric(g["time_nonrigid_s"], errors="coerce").dropna()
        records.append({
            "label": label, "start_method": g["start_method"].iloc[0], "stage": g["stage"].iloc[0],
            "pairs": len(g), "failed": int((g["status"] != "ok").sum()),
            "start_median_rtre": g["start"].median(), "final_median_rtre": scored["final"].median(),
            "final_average_rtre": scored["final"].mean(),
            "downstream_success_pct": 100.0 * g["downstream"].mean() if len(g) else math.nan,
            "converged_pct": 100.0 * g["converged"].mean() if len(g) else math.nan,
            "worse_than_start": int(((scored["final"] > scored["start"] + metrics.CONVERGENCE_SLACK)).sum()),
            "stage_time_median_s": stage_time.median() if len(stage_time) else math.nan,
        })
    return pd.DataFrame(records, columns=["label", "start_method", "stage", "pairs", "failed", "start_median_rtre",
                                          "final_median_rtre", "final_average_rtre", "downstream_success_pct",
                                          "converged_pct", "worse_than_start", "stage_time_median_s"])


def _confusion(start: np.ndarray, actual: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = start <= threshold
    tp, fp = int((predicted & actual).sum()), int((predicted & ~actual).sum())
    fn, tn = int((~predicted & actual).sum()), int((~predicted & ~actual).sum())
    return {"threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "accuracy_pct": 100.0 * (tp + tn) / max(1, len(start))}


def proxy_table(df: pd.DataFrame, threshold: float = metrics.SUCCESS_THRESHOLD) -> pd.DataFrame:
    """Does the affine success (start rTRE <= ``threshold``) predict downstream success? Per stage and over all,
    the confusion counts at ``threshold`` and at the start threshold with the best accuracy on these rows
    (ties: the largest), over the rows whose start was scored."""
    rows = downstream_rows(df).dropna(subset=["start"])
    records = []
    for stage, g in [("all stages", rows), *rows.groupby("stage", sort=False)]:
        if g.empty:
            continue
        start, actual = g["start"].to_numpy(float), g["downstream"].to_numpy(bool)
        candidates = np.unique(np.r_[start, threshold])
        best = max((_confusion(start, actual, t) for t in candidates), key=lambda c: (c["accuracy_pct"], c["threshold"]))
        now = _confusion(start, actual, threshold)
        records.append({"stage": stage, "rows": len(g), "downstream_successes": int(actual.sum()), **now,
                        "best_threshold": best["threshold"], "best_accuracy_pct": best["accuracy_pct"]})
    return pd.DataFrame(records)


def capture_plot(df: pd.DataFrame, colours: dict, out_dir: Path,
                 threshold: float = metrics.SUCCESS_THRESHOLD) -> dict[str, Path] | None:
    """Final against start median rTRE, one point per pair and nonrigid method (log-log): below the diagonal
    the stage improved its start; the dotted lines are the affine success threshold and the downstream one."""
    rows = downstream_rows(df).dropna(subset=["start", "final"])
    if rows.empty:
        return None
    with mpl.rc_context(plots.STYLE):
        fig = Figure(figsize=(plots.WIDTH, 4.2))
        ax = fig.subplots()
        for label, g in rows.groupby("label", sort=False):
            ax.scatter(g["start"], g["final"], s=18, alpha=0.8, color=colours.get(label, "0.4"),
                       label=f"{label} (n={len(g)})", edgecolors="none")
        lo = max(1e-4, 0.7 * float(np.nanmin(np.r_[rows["start"], rows["final"]])))
        hi = max(1.5 * float(np.nanmax(np.r_[rows["start"], rows["final"]])), 2 * threshold)
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, label="final = start")
        ax.axvline(threshold, color="0.3", ls=":", lw=1, label=f"affine success threshold {threshold:g}")
        ax.axhline(metrics.DOWNSTREAM_THRESHOLD, color="0.3", ls="--", lw=1,
                   label=f"downstream success {metrics.DOWNSTREAM_THRESHOLD:g}")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
               xlabel="start: median rTRE of the initial alignment", ylabel="final: median rTRE after the stage")
        plots.tidy_log_axis(ax.xaxis, max_decades=2)  # 0.0001 and 0.0002 side by side collide
        plots.tidy_log_axis(ax.yaxis)
        plots.outside_legend(ax)
        fig.tight_layout()
        return plots.save(fig, out_dir, "capture_range")


__all__ = ["capture_plot", "downstream_rows", "downstream_table", "proxy_table"]
