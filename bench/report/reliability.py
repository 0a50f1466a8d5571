"""How well the landmark-free ``quality`` column predicts success, and which rows it says likely failed.

``quality`` (:func:`bench.quality.alignment_quality`, computed by the harness on every ``ok`` row, higher =
better aligned) needs no landmarks, so it is what a user of ANHIR's ``evaluation`` split (target landmarks
withheld) has. The report checks it against the rows that *are* scored:

* :func:`auc`: ROC AUC of ``quality`` as a predictor of ``success``, by the Mann-Whitney statistic
  (the probability that a random success has a higher quality than a random failure, ties counted half);
* :func:`roc_points`: the ROC curve (false positive rate, true positive rate) over every quality cut;
* :func:`quality_table`: n, successes, failures and AUC, over all methods and per method label, over the
  **scored ok rows with a finite quality** (failed rows carry no quality: their method already said so);
* :func:`likely_failed`: every row, scored or not, whose quality is below a threshold (the report
  passes :data:`bench.quality.LIKELY_FAILED_BELOW`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench import quality

# one definition of the ROC statistics, in bench.quality (its doctests and tests hold them)
auc = quality.roc_auc
roc_points = quality.roc_curve


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """(fpr, tpr) when rows with a score >= ``threshold`` are predicted successes."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    keep = s >= threshold
    tpr = float(keep[y].mean()) if y.any() else math.nan
    fpr = float(keep[~y].mean()) if (~y).any() else math.nan
    return fpr, tpr


def rated_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows on which quality is checked: scored, status ok, finite quality."""
    q = df["quality"].to_numpy(dtype=float) if "quality" in df.columns else np.full(len(df), np.nan)
    return df[df["scored"].to_numpy(bool) & (df["status"] == "ok").to_numpy() & np.isfinite(q)]


def quality_table(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row for all methods together, then one per method label: rows rated, successes, failures, AUC,
    and how the ``threshold`` splits them (rows flagged "likely failed" that did fail / succeed)."""
    rated = rated_rows(df)
    groups = [("all methods", rated)] + [(lab, g) for lab, g in rated.groupby("label", sort=False)]
    records = []
    for label, rows in groups:
        q = rows["quality"].to_numpy(float)
        y = rows["success"].to_numpy(bool)
        flagged = q < threshold
        records.append({
            "label": label,
            "n_rows": int(len(rows)),
            "n_success": int(y.sum()),
            "n_failure": int((~y).sum()),
            "auc": auc(q, y),
            "flagged_failed": int((flagged & ~y).sum()),
            "flagged_succeeded": int((flagged & y).sum()),
            "unflagged_failed": int((~flagged & ~y).sum()),
        })
    return pd.DataFrame.from_records(
        records,
        columns=["label", "n_rows", "n_success", "n_failure", "auc", "flagged_failed", "flagged_succeeded",
                 "unflagged_failed"],
    )


def likely_failed(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Every row (scored or not) whose quality is below ``threshold``, lowest quality first.

    Rows without a quality (the method failed, or an imported row) are not listed: their status says it.
    """
    q = df["quality"].to_numpy(dtype=float) if "quality" in df.columns else np.full(len(df), np.nan)
    rows = df[np.isfinite(q) & (q < threshold)].copy()
    rows["success"] = [
        ("yes" if ok else "no") if scored else "unknown (no target landmarks)"
        for ok, scored in zip(rows["success"], rows["scored"], strict=True)
    ]
    cols = ["label", "pair_id", "tissue", "pair_status", "status", "quality", "rtre_median", "success"]
    return rows.sort_values(["quality", "label"], kind="stable")[cols].reset_index(drop=True)
