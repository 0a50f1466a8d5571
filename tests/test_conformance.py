"""The shipped contract checks catch the usual mistakes of a method author, each on purpose.

A small correct method (phase correlation, translation only, its limits declared) passes; copies of it,
or of ``sift``, with one deliberate bug each fail the check that names the bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from bench import Context, Estimate, ImageView, Method, conformance, registry
from bench.conformance import FAIL, LIMIT, PASS, ConformanceError, check_method, checks, run_check


class Shift(Method):
    """Correct, translation only (not registered: the checks take any class)."""

    name = "test-shift"
    version = "1"
    description = "Phase correlation."
    known_limits = {"recovers_rotation": "translation only", "recovers_known_transform": "translation only"}

    @dataclass(frozen=True)
    class Params:
        window: bool = True  # Hanning window

    def translation(self, fixed: ImageView, moving: ImageView) -> tuple[float, float]:
        win = cv2.createHanningWindow(fixed.image.shape[::-1], cv2.CV_32F) if self.params.window else None
        (dx, dy), _ = cv2.phaseCorrelate(moving.image, fixed.image, win)
        return dx, dy

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        dx, dy = self.translation(fixed, moving)
        return Estimate(np.array([[1, 0, dx], [0, 1, dy]]))


class Inverse(Shift):
    """Moving and fixed swapped: the matrix maps fixed points into the moving frame."""

    def estimate(self, fixed, moving, context):
        return Estimate(np.linalg.inv(super().estimate(fixed, moving, context).matrix))


class Normalised(Shift):
    """The translation in [-1, 1] image coordinates (a network's affine_grid theta), not in pixels."""

    def estimate(self, fixed, moving, context):
        dx, dy = self.translation(fixed, moving)
        h, w = fixed.shape
        return Estimate(np.array([[1, 0, 2 * dx / w], [0, 1, 2 * dy / h]]))


class Transposed(Shift):
    """The 3x3 matrix transposed (row- and column-vector conventions mixed up)."""

    def estimate(self, fixed, moving, context):
        return Estimate(super().estimate(fixed, moving, context).matrix.T)


class Mutating(Shift):
    """Normalises the moving image in place."""

    def estimate(self, fixed, moving, context):
        np.clip(moving.image, 0.0, 0.5, out=moving.image)
        return super().estimate(fixed, moving, context)


class StaleLimit(Shift):
    """Declares a limit on a check it passes."""

    known_limits = {**Shift.known_limits, "recovers_translation": "(no longer true)"}


class BadMetadata(Shift):
    name = "Bad Name"
    requires = "torch"  # a string, not a tuple
    known_limits = {"recovers_everything": "typo", "inputs_not_mutated": "cannot be waived"}

    @dataclass  # not frozen, and a field without a default
    class Params:
        size: int


def _status(cls, check):
    return run_check(cls, check)


def test_a_correct_method_passes_with_its_limits_declared():
    results = {r.check: r for r in check_method(Shift)}
    assert set(results) == set(conformance.CHECKS)
    assert results["recovers_translation"].status == PASS
    assert results["recovers_rotation"].status == LIMIT
    assert results["recovers_rotation"].reason == "translation only"
    assert all(r.status in (PASS, LIMIT) for r in results.values())


def test_inverse_is_caught():
    r = _status(Inverse, "recovers_translation")
    assert r.status == FAIL and "swapped" in r.message


def test_normalised_coordinates_are_caught():
    assert _status(Normalised, "recovers_translation").status == FAIL


def test_transposed_matrix_is_caught():
    r = _status(Transposed, "returns_affine")
    assert r.status == FAIL and "ValueError" in r.message


def test_transposed_linear_part_is_caught():
    """A rotation-capable method whose 2x2 part is transposed: recovers the inverse rotation."""
    sift = registry.get("sift")

    class TransposedLinear(sift):
        name = "test-sift-transposed"

        def estimate(self, fixed, moving, context):
            m = super().estimate(fixed, moving, context).matrix.copy()
            m[:2, :2] = m[:2, :2].T
            return Estimate(m)

    assert _status(sift, "recovers_rotation").status == PASS
    assert _status(TransposedLinear, "recovers_rotation").status == FAIL


def test_mutated_input_is_caught():
    r = _status(Mutating, "inputs_not_mutated")
    assert r.status == FAIL and "moving.image changed" in r.message


def test_a_stale_known_limit_fails():
    r = _status(StaleLimit, "recovers_translation")
    assert r.status == FAIL and "remove 'recovers_translation'" in r.message


def test_bad_metadata_lists_every_problem():
    r = _status(BadMetadata, "metadata")
    assert r.status == FAIL
    for words in ("lower-case word", "requires must be a tuple", "recovers_everything", "cannot be waived",
                  "frozen", "'size' has no default"):
        assert words in r.message, words


def test_check_method_raises_with_every_failure():
    with pytest.raises(ConformanceError, match=r"(?s)inputs_not_mutated.*moving.image"):
        check_method(Mutating)


def test_checks_are_named_callables_for_pytest():
    named = list(checks(Shift))
    assert [str(c) for c in named] == list(conformance.CHECKS)
    assert named[0]().status == PASS  # a passing check returns its result
    with pytest.raises(ConformanceError, match="swapped"):
        conformance.Check(Inverse, "recovers_translation")()


@pytest.mark.parametrize("check", checks(Shift), ids=str)
def test_the_pytest_recipe_of_the_module_doc(check):
    check()  # declared limits become xfails here, as an author's suite would see them
