"""The metrics against values computed by hand."""

import math

import numpy as np
import pytest

from bench import metrics


def test_tre_and_rtre_hand_values():
    moved = np.array([[0.0, 0.0], [10.0, 10.0], [3.0, 0.0]])
    target = np.array([[3.0, 4.0], [10.0, 10.0], [0.0, 4.0]])
    assert metrics.tre(moved, target).tolist() == [5.0, 0.0, 5.0]
    assert metrics.rtre(moved, target, 100.0).tolist() == [0.05, 0.0, 0.05]


def test_summary_hand_values():
    s = metrics.summary(np.array([0.01, 0.02, 0.03, 0.10]))
    assert s["rtre_median"] == pytest.approx(0.025)
    assert s["rtre_mean"] == pytest.approx(0.04)
    assert s["rtre_max"] == pytest.approx(0.10)
    assert s["rtre_min"] == pytest.approx(0.01)
    assert s["rtre_std"] == pytest.approx(math.sqrt((0.03**2 + 0.02**2 + 0.01**2 + 0.06**2) / 4))


def test_score_pair_uses_common_first_rows_and_initial_error():
    target = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    source = target + [6.0, 8.0]  # initial error 10 px each
    moved = target + [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]
    moved = np.vstack([moved, [[99.0, 99.0]]])  # an extra landmark the target lacks
    row = metrics.score_pair(moved, np.vstack([source, [[1.0, 1.0]]]), target, diagonal=50.0)
    assert row["n_landmarks"] == 3
    assert row["rtre_median"] == 0.0
    assert row["rtre_max"] == pytest.approx(0.1)
    assert row["ire_median"] == pytest.approx(0.2)
    assert row["robustness"] == 1.0
    assert row["success"] is True


def test_robustness_counts_strict_improvements():
    assert metrics.robustness(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)


@pytest.mark.parametrize("value,threshold,expected", [(0.035, 0.035, True), (0.0351, 0.035, False),
                                                      (0.05, 0.06, True), (float("nan"), 0.035, False)])
def test_success_threshold(value, threshold, expected):
    assert metrics.success(value, threshold) is expected


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        metrics.rtre(np.zeros((2, 2)), np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError):
        metrics.tre(np.zeros((2, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        metrics.summary(np.array([]))
