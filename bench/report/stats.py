"""Statistics that tell real differences from noise.

* :func:`paired_tests`: Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided) on the per-pair
  median rTRE of every two method labels, over the pairs both scored, with ``n``, the share of pairs on
  which the first is better, and Holm-adjusted p-values over all comparisons of the report.
* :func:`bootstrap_table`: percentile bootstrap 95 % intervals (``scipy.stats.bootstrap``, fixed seed)
  for each label's success rate (over evaluable rows) and median of per-pair median rTRE (over scored rows).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

SEED = 20190408  # fixed, so the intervals are reproducible
N_RESAMPLES = 2000


def bootstrap_ci(
    values: np.ndarray, statistic, confidence: float = 0.95, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the 1-D ``values``.

    Returns ``(nan, nan)`` for fewer than two values; a constant sample gives a zero-width interval.

    >>> lo, hi = bootstrap_ci(np.arange(100.0), np.median)
    >>> 35 <= lo < 49.5 < hi <= 65
    True
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap(
        (x,),
        statistic,
        confidence_level=confidence,
        n_resamples=N_RESAMPLES,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _median(x, axis=-1):
    return np.median(x, axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def bootstrap_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per label: success rate [%] and median rTRE, each with its 95 % bootstrap interval."""
    records = []
    for label, rows in df.groupby("label", sort=False):
        success = rows.loc[rows["evaluable"], "success"].to_numpy(float)
        rtre = rows.loc[rows["scored"], "rtre_median"].to_numpy(float)
        s_lo, s_hi = bootstrap_ci(success, _mean)
        m_lo, m_hi = bootstrap_ci(rtre, _median)
        records.append(
            {
                "label": label,
                "n_evaluable": int(success.size),
                "success_rate_pct": float(success.mean() * 100) if success.size else math.nan,
                "success_ci_low_pct": s_lo * 100,
                "success_ci_high_pct": s_hi * 100,
                "n_scored": int(rtre.size),
                "median_rtre": float(np.median(rtre)) if rtre.size else math.nan,
                "median_rtre_ci_low": m_lo,
                "median_rtre_ci_high": m_hi,
            }
        )
    return pd.DataFrame.from_records(records)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count).

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float, str]:
    """(statistic, p-value, note); NaN with a note where the test cannot run."""
    if a.size < 2:
        return math.nan, math.nan, "fewer than 2 common pairs"
    if np.all(a == b):
        return math.nan, math.nan, "identical on every pair"
    res = stats.wilcoxon(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue), ""


def paired_tests(df: pd.DataFrame) -> pd.DataFrame:
    """Every two labels compared on per-pair median rTRE over their common scored pairs."""
    scored = df[df["scored"]]
    wide = scored.pivot_table(index="pair_key", columns="label", values="rtre_median", aggfunc="first")
    labels = [lab for lab in dict.fromkeys(df["label"]) if lab in wide.columns]
    records = []
    for la, lb in itertools.combinations(labels, 2):
        both = wide[[la, lb]].dropna()
        a, b = both[la].to_numpy(float), both[lb].to_numpy(float)
        statistic, p, note = _wilcoxon(a, b)
        records.append(
            {
                "method_a": la,
                "method_b": lb,
                "n": int(a.size),
                "median_a": float(np.median(a)) if a.size else math.nan,
                "median_b": float(np.median(b)) if b.size else math.nan,
                "median_difference": float(np.median(a - b)) if a.size else math.nan,
                "a_better_pct": float(np.mean(a < b) * 100) if a.size else math.nan,
                "statistic": statistic,
                "p_value": p,
                "note": note,
            }
        )
    table = pd.DataFrame.from_records(
        records,
        columns=[
            "method_a",
            "method_b",
            "n",
            "median_a",
            "median_b",
            "median_difference",
            "a_better_pct",
            "statistic",
            "p_value",
            "note",
        ],
    )
    table["p_holm"] = holm(table["p_value"].tolist()) if len(table) else []
    return table
