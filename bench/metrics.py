"""ANHIR's registration metrics as small pure functions, named like the result columns.

TRE_i = |warped source landmark_i - target landmark_i| (pixels); rTRE = TRE / target image diagonal.
Landmarks pair by row; when the two files differ in length the common first N rows are used.
"""

from __future__ import annotations

import math

import numpy as np

SUCCESS_THRESHOLD = 0.035  # median rTRE at or below which a pair counts as aligned (see FIELD-NOTES.md)
# the paper's success measured (docs/report.md, "Downstream success"): a nonrigid stage started from the
# initial method's result converged (not worse than its start beyond the landmarks' precision) to a
# registration-grade result
DOWNSTREAM_THRESHOLD = 0.01  # final median rTRE at or below which the nonrigid stage reached a good result
CONVERGENCE_SLACK = 0.001  # final <= start + this: the stage did not make the alignment worse


def common_landmarks(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first N rows of both landmark sets, N = the smaller count.

    >>> s, t = common_landmarks(np.zeros((5, 2)), np.ones((3, 2)))
    >>> s.shape, t.shape
    ((3, 2), (3, 2))
    """
    n = min(len(source), len(target))
    return np.asarray(source, float)[:n], np.asarray(target, float)[:n]


def tre(moved: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-landmark Euclidean error in pixels between ``(N, 2)`` point sets.

    >>> tre(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[3.0, 4.0], [1.0, 1.0]])).tolist()
    [5.0, 0.0]
    """
    moved, target = np.asarray(moved, float), np.asarray(target, float)
    if moved.shape != target.shape:
        raise ValueError(f"landmark sets differ in shape: {moved.shape} vs {target.shape}")
    return np.linalg.norm(moved - target, axis=1)


def rtre(moved: np.ndarray, target: np.ndarray, diagonal: float) -> np.ndarray:
    """Per-landmark TRE divided by the target image diagonal.

    >>> rtre(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), diagonal=50.0).tolist()
    [0.1]
    """
    if not (diagonal > 0 and math.isfinite(diagonal)):
        raise ValueError(f"image diagonal must be positive, got {diagonal}")
    return tre(moved, target) / diagonal


def image_diagonal(height: int, width: int) -> float:
    """sqrt(h^2 + w^2).

    >>> image_diagonal(3, 4)
    5.0
    """
    return math.hypot(height, width)


def summary(errors: np.ndarray, prefix: str = "rtre") -> dict[str, float]:
    """Median, mean, max, min and std of per-landmark errors, keyed like result columns.

    >>> {k: round(v, 4) for k, v in summary(np.array([0.1, 0.2, 0.6])).items()}
    {'rtre_median': 0.2, 'rtre_mean': 0.3, 'rtre_max': 0.6, 'rtre_min': 0.1, 'rtre_std': 0.216}
    """
    e = np.asarray(errors, float)
    if e.size == 0:
        raise ValueError("no landmark errors to summarise")
    out = {
        "median": float(np.median(e)),
        "mean": float(np.mean(e)),
        "max": float(np.max(e)),
        "min": float(np.min(e)),
        "std": float(np.std(e)),
    }
    return {f"{prefix}_{k}": v for k, v in out.items()}


def robustness(errors_after: np.ndarray, errors_before: np.ndarray) -> float:
    """Share of landmarks whose error dropped after registration (ANHIR's robustness).

    >>> robustness(np.array([1.0, 5.0, 2.0, 0.5]), np.array([2.0, 4.0, 3.0, 0.5]))
    0.5
    """
    a, b = np.asarray(errors_after, float), np.asarray(errors_before, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("robustness needs two non-empty error arrays of one shape")
    return float(np.mean(a < b))


def success(rtre_median: float, threshold: float = SUCCESS_THRESHOLD) -> bool:
    """A pair succeeds when its median rTRE is at or below ``threshold``.

    >>> success(0.02), success(0.05), success(0.035)
    (True, False, True)
    """
    return bool(math.isfinite(rtre_median) and rtre_median <= threshold)


def score_pair(
    moved: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    diagonal: float,
    threshold: float = SUCCESS_THRESHOLD,
) -> dict[str, float | int | bool]:
    """Every per-pair column from warped source landmarks, unwarped source landmarks and targets.

    >>> tgt = np.array([[10.0, 0.0], [0.0, 10.0]])
    >>> row = score_pair(tgt + [[0.5, 0.0], [0.0, 0.0]], tgt + 3.0, tgt, diagonal=100.0)
    >>> row["n_landmarks"], row["rtre_median"], row["rtre_max"], row["robustness"], row["success"]
    (2, 0.0025, 0.005, 1.0, True)
    """
    moved, target = common_landmarks(moved, target)
    source, _ = common_landmarks(source, target)
    after = rtre(moved, target, diagonal)
    before = rtre(source, target, diagonal)
    row: dict[str, float | int | bool] = {"n_landmarks": int(len(after))}
    row.update(summary(after))
    row["ire_median"] = float(np.median(before))
    row["robustness"] = robustness(after, before)
    row["success"] = success(float(np.median(after)), threshold)
    return row


def converged(start_rtre: float, final_rtre: float, slack: float = CONVERGENCE_SLACK) -> bool:
    """The nonrigid stage did not make its start worse (beyond ``slack``, the landmarks' own precision).

    >>> converged(0.020, 0.004), converged(0.004, 0.0045), converged(0.004, 0.0062)
    (True, True, False)
    """
    return bool(math.isfinite(start_rtre) and math.isfinite(final_rtre) and final_rtre <= start_rtre + slack)


def downstream_success(status: str, start_rtre: float, final_rtre: float,
                       threshold: float = DOWNSTREAM_THRESHOLD) -> bool:
    """The paper's success, measured: the row is ok, the nonrigid stage converged from its start and reached
    ``threshold`` (docs/report.md, "Downstream success").

    >>> downstream_success("ok", 0.03, 0.006), downstream_success("ok", 0.08, 0.05), downstream_success("failed", 0.01, 0.005)
    (True, False, False)
    """
    return status == "ok" and converged(start_rtre, final_rtre) and final_rtre <= threshold
