"""One contract, every registered method: the shipped checks of :mod:`bench.conformance`, as test ids.

Each check runs for each method in the registry (``test_contract[sift-recovers_rotation]``) through the same
callables an outside author gets from ``bench.conformance.checks``. A method that cannot run here is
skipped with its reason; a check the method declares in its ``known_limits`` must really fail (it is an
expected failure with the declared reason, and a declared limit that passes fails the test), so a
declaration cannot go stale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import conformance, registry
from bench.method import Estimate, ImageView

METHODS = registry.names()
CASES = [pytest.param(check, id=f"{name}-{check}") for name in METHODS
         for check in conformance.checks(registry.get(name))]


@pytest.mark.parametrize("check", CASES)
def test_contract(check):
    check()


def test_every_shipped_method_gets_every_check():
    """The cases cover every method file in ``methods/`` (none lost to an import error, which the registry
    would only record), each registered method with every check once, each case bound to its own class."""
    assert registry.broken_modules() == {}
    shipped = {p.stem for p in (Path(__file__).resolve().parents[1] / "methods").glob("*.py")
               if not p.stem.startswith("_")}
    covered = {c.values[0].method.__module__.rsplit(".", 1)[-1] for c in CASES}
    assert shipped <= covered
    ids = [c.id for c in CASES]
    assert sorted(ids) == sorted(f"{name}-{check}" for name in registry.names() for check in conformance.CHECKS)
    for case in CASES:
        check = case.values[0]
        assert registry.get(check.method.name) is check.method and case.id == f"{check.method.name}-{check.name}"


def test_known_limits_are_declared_on_the_classes():
    """The project's own limits live on the method classes (shown by `list NAME` and `check`)."""
    assert "recovers_known_transform" in registry.get("identity").known_limits
    assert "recovers_known_transform" in registry.get("preprocessed").known_limits
    assert not registry.get("sift").known_limits


def test_estimate_refuses_non_affine_matrices():
    with pytest.raises(ValueError):
        Estimate(np.ones((2, 2)))
    with pytest.raises(ValueError):
        Estimate(np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError):
        Estimate(np.full((2, 3), np.nan))


def test_imageview_shape():
    v = ImageView(np.zeros((5, 7), np.float32), np.ones((5, 7), bool))
    assert v.shape == (5, 7)


def _demons_variant(change, kind="nonrigid"):
    """A method like ``demons`` whose answer is altered by ``change(estimate) -> estimate``, of ``kind``."""
    base = registry.get("demons")

    class Variant(base):
        name = "demons-variant"

        def estimate(self, fixed, moving, context):
            return change(base.estimate(self, fixed, moving, context))

    Variant.kind = kind
    return Variant


def test_recovers_deformation_catches_a_field_of_the_wrong_sign_and_a_missing_field():
    from bench.deformation import Deformation

    ok = conformance.run_check(_demons_variant(lambda e: e), "recovers_deformation")
    assert ok.status == conformance.PASS, ok.message
    negated = _demons_variant(lambda e: Estimate(e.matrix, e.diagnostics,
                                                 deformation=Deformation(-e.deformation.field, e.deformation.shape)))
    bad = conformance.run_check(negated, "recovers_deformation")
    assert bad.status == conformance.FAIL and "negated field fits better" in bad.message, bad.message
    missing = conformance.run_check(_demons_variant(lambda e: Estimate(e.matrix, e.diagnostics)),
                                    "recovers_deformation")
    assert missing.status == conformance.FAIL and "no deformation" in missing.message
    mislabelled = conformance.run_check(_demons_variant(lambda e: e, kind="affine"), "recovers_deformation")
    assert mislabelled.status == conformance.FAIL and "declare kind = 'nonrigid'" in mislabelled.message
