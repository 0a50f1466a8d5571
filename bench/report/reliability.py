"""How well the landmark-free ``quality`` column predicts success, and which rows it says likely failed.

``quality`` (:func:`bench.quality.alignment_quality`, computed by the harness on every ``ok`` row, higher =
better aligned) needs no landmarks, so it is what a user of ANHIR's ``evaluation`` split (target landmarks
withheld) has. The report checks it against the rows that *are* scored:

* :func:`auc`: ROC AUC of ``quality`` as a predictor of ``success``, by the Mann-Whitney statistic
  (the probability that a random success has a higher quality than a random failure, ties counted half);
* :func:`roc_points`: the ROC curve (false positive rate, true positive rate) over every quality cut;
* :func:`quality_table`: n, successes, failures and AUC, over all methods and per method label, over the
  **scored ok rows with a finite quality** (failed rows carry no quality: their method already said so);
* :func:`likely_failed`: every row, scored or not, whose quality is below :func:`likely_failed_below`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

# Used only while bench.quality does not declare LIKELY_FAILED_BELOW: the methods' own evidence threshold
# (``min_evidence`` of sift, surf, iterative and elastix), below which they report "no shared structure".
FALLBACK_LIKELY_FAILED_BELOW = 1.2


def likely_failed_below() -> tuple[float, str]:
    """The quality below which a row is "likely failed", and where the value comes from.

    ``bench.quality.LIKELY_FAILED_BELOW`` when the quality module declares it, else
    :data:`FALLBACK_LIKELY_FAILED_BELOW` (the methods' ``min_evidence``).
    """
    from bench import quality

    value = getattr(quality, "LIKELY_FAILED_BELOW", None)
    if value is not None:
        return float(value), "bench.quality.LIKELY_FAILED_BELOW"
    return FALLBACK_LIKELY_FAILED_BELOW, "fallback: the methods' min_evidence (bench.quality declares none)"


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` labels, from the Mann-Whitney U statistic.

    AUC = U / (n_pos n_neg), U = (sum of the positives' mid-ranks) - n_pos (n_pos + 1) / 2. NaN when one
    class is empty.

    >>> auc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False]))
    1.0
    >>> auc(np.array([1.0, 1.0, 2.0]), np.array([True, False, True]))
    0.75
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(s)  # mid-ranks for ties
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: ``(fpr, tpr, cut)`` where a row is predicted a success when its score >= ``cut``.

    Starts at (0, 0) (cut = +inf) and ends at (1, 1); one point per distinct score, so the trapezoid area
    under it equals :func:`auc`.

    >>> fpr, tpr, _ = roc_points(np.array([3.0, 2.0, 1.0]), np.array([True, False, True]))
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0])
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    cuts = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = [0.0] + [float((s[y] >= c).sum()) / n_pos for c in cuts]
    fpr = [0.0] + [float((s[~y] >= c).sum()) / n_neg for c in cuts]
    return np.array(fpr), np.array(tpr), np.concatenate([[np.inf], cuts])


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
        })  # fmt: skip
    return pd.DataFrame.from_records(
        records,
        columns=["label", "n_rows", "n_success", "n_failure", "auc", "flagged_failed", "flagged_succeeded",
                 "unflagged_failed"],
    )  # fmt: skip


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
