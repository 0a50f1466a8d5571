"""How well the landmark-free ``quality`` column predicts success, and which rows it says likely failed.

``quality`` (:func:`bench.quality.alignment_quality`, computed by the harness on every ``ok`` row, higher =
better aligned) needs no landmarks, so it is what a user of ANHIR's ``evaluation`` split (target landmarks
withheld) has. The report checks it against the rows that *are* scored:

* :func:`auc`: ROC AUC of ``quality`` as a predictor of ``success``, by the Mann-Whitney statistic
  (the probability that a random success has a higher quality than a random failure, ties counted half);
* :func:`roc_points`: the ROC curve (false positive rate, true positive rate) over every quality cut;
* :func:`quality_table`: n, successes, failures and AUC, over all methods and per method label, over the
  **scored ok rows with a finite quality** (failed rows carry no quality: their method already said so);
* :func:`estimate_table`: the same for ``error_estimate`` (:func:`bench.quality.estimated_error`, a
  landmark-free estimate of an affine row's rTRE): AUC of the negated estimate, and how the success threshold
  splits the rows (estimate above it: flagged);
* :func:`likely_failed`: every row, scored or not, whose error estimate is above the success threshold, or,
  without an estimate, whose quality is below a threshold (the report passes
  :data:`bench.quality.LIKELY_FAILED_BELOW`).
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


def rated_rows(df: pd.DataFrame, column: str = "quality") -> pd.DataFrame:
    """The rows on which a landmark-free ``column`` is checked: scored, status ok, finite value."""
    q = df[column].to_numpy(dtype=float) if column in df.columns else np.full(len(df), np.nan)
    return df[df["scored"].to_numpy(bool) & (df["status"] == "ok").to_numpy() & np.isfinite(q)]


def quality_table(df: pd.DataFrame, threshold: float, column: str = "quality",
                  higher_is_better: bool = True) -> pd.DataFrame:
    """One row for all methods together, then one per method label: rows rated, successes, failures, AUC,
    and how the ``threshold`` splits them (rows flagged "likely failed" that did fail / succeed).

    ``column``: the landmark-free score; ``higher_is_better`` (``quality``): flagged below ``threshold``;
    otherwise (``error_estimate``): flagged above it, and the AUC is that of its negation."""
    rated = rated_rows(df, column)
    groups = [("all methods", rated)] + [(lab, g) for lab, g in rated.groupby("label", sort=False)]
    records = []
    for label, rows in groups:
        q = rows[column].to_numpy(float)
        y = rows["success"].to_numpy(bool)
        flagged = q < threshold if higher_is_better else q > threshold
        if not higher_is_better:
            q = -q
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


def estimate_table(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """:func:`quality_table` of ``error_estimate`` against the success ``threshold``."""
    return quality_table(df, threshold, "error_estimate", higher_is_better=False)


def likely_failed(df: pd.DataFrame, threshold: float, estimate_above: float = math.inf) -> pd.DataFrame:
    """Every row (scored or not) that the landmark-free checks say likely failed, lowest quality first: its
    error estimate is above ``estimate_above`` (the report passes the success threshold), or, for a row without
    an estimate (a nonrigid answer, a run with ``--no-error-estimate``), its quality is below ``threshold``.

    The estimate decides where there is one: near the success threshold it separates successes from failures
    where ``quality`` cannot (docs/quality.md). Rows without a quality (the method failed, or an imported row)
    are not listed: their status says it.
    """
    q = df["quality"].to_numpy(dtype=float) if "quality" in df.columns else np.full(len(df), np.nan)
    e = df["error_estimate"].to_numpy(dtype=float) if "error_estimate" in df.columns else np.full(len(df), np.nan)
    low = np.isfinite(q) & (q < threshold) & ~np.isfinite(e)
    far = np.isfinite(q) & np.isfinite(e) & (e > estimate_above)
    rows = df[low | far].copy()
    rows["error_estimate"] = e[low | far]
    rows["flagged_by"] = np.where(far[low | far], "error estimate", "quality")
    rows["success"] = [
        ("yes" if ok else "no") if scored else "unknown (no target landmarks)"
        for ok, scored in zip(rows["success"], rows["scored"], strict=True)
    ]
    cols = ["label", "pair_id", "tissue", "pair_status", "status", "quality", "error_estimate", "flagged_by",
            "rtre_median", "success"]
    return rows.sort_values(["quality", "label"], kind="stable")[cols].reset_index(drop=True)
