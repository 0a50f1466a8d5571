"""The method contract as runnable checks, shipped with the package (scikit-learn's ``check_estimator`` idea).

Every method, built-in or not, should pass these checks; ``python -m bench check NAME [--plugin FILE]``
runs them on one method and prints one line per check. They need no data set: each check runs the method
on a small generated pair (the same every time) at its usual working size, so the whole set takes seconds.

========================== ===================================================================================
check                      what it asks of the method
========================== ===================================================================================
metadata                   name, version, description, devices and requires well formed; ``Params`` a frozen
                           dataclass whose every field has a default that ``--set`` can write back;
                           ``Method()`` works; ``known_limits`` names real checks, each with a reason
returns_affine             ``estimate`` returns an :class:`~bench.method.Estimate` with a finite, invertible
                           affine matrix and JSON-ready diagnostics
identical_images           the same image as fixed and moving: (near) identity
inputs_not_mutated         images, masks, colour and field of view unchanged by the call
deterministic              two fresh instances, one seed: the same matrix
recovers_translation       moving = the fixed view shifted by a known translation: the matrix maps moving
                           points onto fixed ones (catches the inverse, normalised instead of pixel
                           coordinates, a wrong frame)
recovers_rotation          the same with a 6 degree rotation (catches a transposed linear part)
recovers_known_transform   a generated pair of two stains, rotation, scale 1.12 and shear, through the shared
                           preprocessing: median rTRE of its landmarks below 0.01
recovers_deformation       nonrigid methods (``kind = "nonrigid"``): moving = the fixed view deformed by a known
                           smooth field (up to 10 px); the answer's :class:`~bench.deformation.Deformation` is
                           valid (shape, finite, not folding) and moves the moving points, in ANHIR's
                           direction (``warp_points``), to less than 0.6 x their error before (catches a field
                           of the wrong sign or frame); affine methods: their answer carries no field
========================== ===================================================================================

The ``recovers_*`` checks judge the method's own answer; the direct ones give the method a moving view made
from the fixed one, so the shared preprocessing cannot hide an inverted answer. ``metadata``,
``returns_affine`` and ``inputs_not_mutated`` are what the harness relies on and cannot be declared a known
limit; the others can, on the method class, with the reason::

    class PhaseCorrelation(Method):
        known_limits = {"recovers_rotation": "estimates a translation only"}

A declared limit must really fail (else it is reported, so the declaration cannot go stale).

In an author's own pytest suite::

    import pytest
    from bench.conformance import checks

    @pytest.mark.parametrize("check", checks(MyMethod), ids=str)
    def test_conformance(check):
        check()  # fails with the reason; a declared known limit is an xfail, an unavailable method a skip

or ``check_method(MyMethod)``, which raises :class:`ConformanceError` listing every failure.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import geometry, imaging
from bench.method import Context, Estimate, ImageView, Method, make_params
from bench.preprocess import PreparedPair, PreprocessParams, prepare_pair

TOLERANCE = 0.01  # median point error / diagonal below which a transform counts as recovered
PASS, FAIL, LIMIT, SKIP = "pass", "FAIL", "known limit", "skipped"


class ConformanceError(AssertionError):
    """A method does not meet a contract check (the message says which and why)."""


@dataclass(frozen=True)
class Result:
    """The outcome of one check on one method."""

    check: str
    status: str  # PASS, FAIL, LIMIT or SKIP
    message: str = ""  # what was measured, or why it failed / was skipped
    reason: str = ""  # the declared known limit's reason
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def line(self) -> str:
        """One line: status, check, then what was measured and (for a known limit) the declared reason."""
        text = self.message
        if self.status == LIMIT:
            text = f"{self.message}; declared: {self.reason}" if self.message else f"declared: {self.reason}"
        return f"{self.status:<12} {self.check:<25} {text}".rstrip()


# ----------------------------------------------------------------------------------------------------
# the scenes: one generated pair, prepared once per process and stage


@functools.lru_cache(maxsize=1)
def _generated():
    """A small generated stain pair (HE -> DAB, rotation within 12 deg, scale 1.12, shear), no elastic part."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=448, n_landmarks=30, max_rotation_deg=12, scale_range=(1.1, 1.14),
                          max_shear=0.06, elastic_px=0.0, hole_probability=0.0, dust_probability=0.0)
    return generate_pair(7, tissue="kidney-like", source_stain="HE", target_stain="DAB", config=cfg)


@functools.lru_cache(maxsize=2)
def prepared_pair(full: bool) -> PreparedPair:
    """The generated pair through the shared preprocessing (``full``) or the light stage."""
    pair = _generated()
    with tempfile.TemporaryDirectory(prefix="bench-conformance-") as tmp:
        src, tgt = Path(tmp) / "source.png", Path(tmp) / "target.png"
        cv2.imwrite(str(src), cv2.cvtColor(pair.source_rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tgt), cv2.cvtColor(pair.target_rgb, cv2.COLOR_RGB2BGR))
        return prepare_pair(src, tgt, PreprocessParams(), full=full)


@dataclass(frozen=True)
class _Scene:
    fixed: ImageView
    moving: ImageView
    frame: PreparedPair  # converts an Estimate(frame="original") to the working frame
    points: np.ndarray  # (N, 2) moving working-frame points ...
    expected: np.ndarray  # ... and where they belong in the fixed frame


def _landmarks_working(prepared: PreparedPair) -> np.ndarray:
    """The pair's target landmarks in the fixed working frame."""
    return geometry.apply(geometry.resample_matrix(*prepared.target_scale), _generated().target_landmarks)


@functools.lru_cache(maxsize=8)
def _direct_scene(full: bool, kind: str) -> _Scene:
    """Moving = the fixed view moved by a known affine ``a`` (moving points -> fixed points)."""
    prepared = prepared_pair(full)
    fixed = prepared.fixed
    h, w = fixed.shape
    if kind == "identical":
        a = np.eye(3)
    elif kind == "translation":
        a = geometry.translation(0.06 * w, -0.05 * h)
    elif kind == "rotation":
        a = geometry.translation(0.02 * w, 0.02 * h) @ geometry.rotation(6.0, ((w - 1) / 2, (h - 1) / 2))
    else:
        raise ValueError(kind)
    if kind == "identical":
        moving = copy.deepcopy(fixed)
    else:  # moving(p) = fixed(a p); the colour outside is the median glass colour, to whole levels
        outside = fixed.rgb is not None and (~fixed.mask).any()
        fill = tuple(int(v) for v in np.median(fixed.rgb[~fixed.mask], axis=0)) if outside else 0
        moving = imaging.warp_view(fixed, a, fixed.shape, glass=fill, inverse=True)
    frame = dataclasses.replace(prepared, source_scale=prepared.target_scale, source_pre=np.eye(3),
                                source_shape=prepared.target_shape)
    expected = _landmarks_working(prepared)
    return _Scene(fixed, moving, frame, geometry.apply(np.linalg.inv(a), expected), expected)


# ----------------------------------------------------------------------------------------------------
# helpers


def _instance(cls: type[Method]) -> Method:
    m = cls()
    m.prepare(Context())
    return m


def _estimate(m: Method, fixed: ImageView, moving: ImageView, seed: int = 0) -> Estimate:
    """The method's answer on copies of the views (a method that mutates its inputs spoils no other check)."""
    est = m.estimate(copy.deepcopy(fixed), copy.deepcopy(moving), Context(seed=seed))
    if not isinstance(est, Estimate):
        raise ConformanceError(f"estimate returned {type(est).__name__}, not bench.Estimate")
    return est


def _working(est: Estimate, frame: PreparedPair) -> np.ndarray:
    return frame.to_working(est.matrix) if est.frame == "original" else est.matrix


def _recovered(cls: type[Method], kind: str) -> str:
    scene = _direct_scene(cls.uses_preprocessing, kind)
    est = _estimate(_instance(cls), scene.fixed, scene.moving)
    moved = geometry.apply(_working(est, scene.frame), scene.points)
    err = np.linalg.norm(moved - scene.expected, axis=1) / np.hypot(*scene.fixed.shape)
    swapped = geometry.apply(np.linalg.inv(_working(est, scene.frame)), scene.points)
    hint = ""
    if np.median(np.linalg.norm(swapped - scene.expected, axis=1)) < 0.5 * np.median(err * np.hypot(*scene.fixed.shape)):
        hint = " (its inverse fits better: moving and fixed swapped?)"
    text = f"median error {np.median(err):.4f} x diagonal (limit {TOLERANCE})"
    if not np.median(err) < TOLERANCE:
        raise ConformanceError(text + hint)
    return text


def _cli_text(value: Any) -> str:
    """How a default would be written on the command line (``--set name.param=TEXT``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(_cli_text(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------------------------------
# the checks: each takes the method class, returns what it measured, raises ConformanceError when unmet


def check_metadata(cls: type[Method]) -> str:
    problems = []
    name = getattr(cls, "name", "")
    if not (isinstance(name, str) and name and name == name.strip().lower() and not set(name) & set(", \t")):
        problems.append(f"name must be a non-empty lower-case word, got {name!r}")
    if not (isinstance(cls.version, str) and cls.version.strip()):
        problems.append(f"version must be a non-empty string, got {cls.version!r}")
    if not (isinstance(cls.description, str) and cls.description.strip()):
        problems.append("description is empty (bench list shows it)")
    if not isinstance(cls.uses_preprocessing, bool):
        problems.append(f"uses_preprocessing must be True or False, got {cls.uses_preprocessing!r}")
    for attr in ("devices", "requires"):
        value = getattr(cls, attr)
        if not (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
            problems.append(f"{attr} must be a tuple of strings, got {value!r} (a 1-tuple needs a comma)")
    if isinstance(cls.devices, tuple) and not cls.devices:
        problems.append("devices is empty")
    limits = cls.known_limits
    if not isinstance(limits, dict):
        problems.append(f"known_limits must be a dict {{check: reason}}, got {type(limits).__name__}")
        limits = {}
    for check, reason in limits.items():
        if check not in CHECKS:
            problems.append(f"known_limits names no check: {check!r} (checks: {', '.join(CHECKS)})")
        elif check in REQUIRED:
            problems.append(f"known_limits: {check!r} cannot be waived (the harness relies on it)")
        if not (isinstance(reason, str) and reason.strip()):
            problems.append(f"known_limits[{check!r}] needs a reason")
    params_cls = cls.Params
    if not (dataclasses.is_dataclass(params_cls) and isinstance(params_cls, type)):
        problems.append("Params must be a dataclass")
    else:
        if not params_cls.__dataclass_params__.frozen:
            problems.append("Params must be frozen: @dataclass(frozen=True)")
        for f in dataclasses.fields(params_cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"parameter {f.name!r} has no default (Method() must work)")
        if not problems:
            try:
                m = cls()
                if m.params != params_cls():
                    problems.append("Method().params differs from Params()")
                json.loads(m.params_json())
                for f in dataclasses.fields(params_cls):
                    value = getattr(m.params, f.name)
                    back = getattr(make_params(params_cls, {f.name: _cli_text(value)}, owner=name), f.name)
                    if back != value:
                        problems.append(f"--set {name}.{f.name}={_cli_text(value)} gives {back!r}, "
                                        f"not the default {value!r}")
            except Exception as exc:  # noqa: BLE001 - report, do not crash the check run
                problems.append(f"{type(exc).__name__}: {exc}")
    if problems:
        raise ConformanceError("; ".join(problems))
    return ""


def check_returns_affine(cls: type[Method]) -> str:
    prepared = prepared_pair(cls.uses_preprocessing)
    est = _estimate(_instance(cls), prepared.fixed, prepared.moving)
    m = np.asarray(est.matrix)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)) or not np.allclose(m[2], [0, 0, 1]):
        raise ConformanceError(f"not a finite 3x3 affine matrix: {m.tolist()}")
    det = float(np.linalg.det(m[:2, :2]))
    if imaging.matrix_defect(m, imaging.CONTRACT_MIN_DET):
        raise ConformanceError(f"the matrix is singular (det {det:.2e})")
    if not isinstance(est.diagnostics, dict):
        raise ConformanceError(f"diagnostics must be a dict, got {type(est.diagnostics).__name__}")
    from bench.record import jsonable

    try:
        json.dumps(jsonable(est.diagnostics))
    except (TypeError, ValueError) as exc:
        raise ConformanceError(f"diagnostics are not JSON-serialisable: {exc}") from None
    return f"frame {est.frame}, det {det:.3f}"


def check_identical_images(cls: type[Method]) -> str:
    scene = _direct_scene(cls.uses_preprocessing, "identical")
    est = _estimate(_instance(cls), scene.fixed, scene.fixed)
    h, w = scene.fixed.shape
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    shift = float(np.linalg.norm(geometry.apply(_working(est, scene.frame), corners) - corners, axis=1).max())
    text = f"corners moved {shift:.2f} px (limit {TOLERANCE * np.hypot(h, w):.1f})"
    if not shift < TOLERANCE * np.hypot(h, w):
        raise ConformanceError(text)
    return text


def check_inputs_not_mutated(cls: type[Method]) -> str:
    prepared = prepared_pair(cls.uses_preprocessing)
    fixed, moving = copy.deepcopy(prepared.fixed), copy.deepcopy(prepared.moving)
    views = {"fixed": fixed, "moving": moving}
    before = {f"{role}.{k}": np.array(getattr(v, k), copy=True) for role, v in views.items()
              for k in ("image", "mask", "rgb", "valid") if getattr(v, k) is not None}
    est = _instance(cls).estimate(fixed, moving, Context())  # on these very arrays
    if not isinstance(est, Estimate):
        raise ConformanceError(f"estimate returned {type(est).__name__}, not bench.Estimate")
    changed = []
    for key, old in before.items():
        role, attr = key.split(".")
        new = getattr(views[role], attr)
        if new is None or new.shape != old.shape or new.dtype != old.dtype or not np.array_equal(new, old):
            n = "" if new is None or new.shape != old.shape else f" at {int(np.sum(new != old))} pixels"
            changed.append(f"{key} changed{n}")
    if changed:
        raise ConformanceError(", ".join(changed) + " (copy before modifying: np.array(view.image))")
    return ""


def check_deterministic(cls: type[Method]) -> str:
    prepared = prepared_pair(cls.uses_preprocessing)
    a = _estimate(_instance(cls), prepared.fixed, prepared.moving, seed=3).matrix
    b = _estimate(_instance(cls), prepared.fixed, prepared.moving, seed=3).matrix
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    if not diff <= 1e-9:
        raise ConformanceError(f"two runs with seed 3 differ by {diff:.3g} (use context.seed for randomness)")
    return ""


def check_recovers_translation(cls: type[Method]) -> str:
    return _recovered(cls, "translation")


def check_recovers_rotation(cls: type[Method]) -> str:
    return _recovered(cls, "rotation")


DEFORMATION_GAIN = 0.6  # recovers_deformation: the median point error after must be below this x before


def check_recovers_deformation(cls: type[Method]) -> str:
    from bench.deformation import Deformation, check, random_smooth_field, warp_image, warp_points

    prepared = prepared_pair(cls.uses_preprocessing)
    if cls.kind != "nonrigid":  # an affine method must not answer with a field (the harness trusts the kind)
        est = _estimate(_instance(cls), prepared.fixed, prepared.moving)
        if est.deformation is not None:
            raise ConformanceError(f"kind {cls.kind!r} but the estimate carries a deformation: declare "
                                   "kind = 'nonrigid'")
        return f"kind {cls.kind}: no deformation, as declared"
    fixed = prepared.fixed
    field = random_smooth_field(fixed.shape, 10.0, 40.0, seed=5)
    moving = ImageView(warp_image(fixed.image, None, field), warp_image(fixed.mask, None, field),
                       None if fixed.rgb is None else warp_image(fixed.rgb, None, field))
    expected = _landmarks_working(prepared)
    points = warp_points(None, field, expected)  # where each fixed point's tissue is in the moving view
    before = float(np.median(np.linalg.norm(points - expected, axis=1)))
    est = _estimate(_instance(cls), fixed, moving)
    d = est.deformation
    if d is None:
        raise ConformanceError("a nonrigid method returned no deformation (Estimate.deformation is None)")
    problem = check(d) or ("" if d.shape == fixed.shape else f"deformation shape {d.shape} is not the fixed "
                                                             f"view's {fixed.shape}")
    if problem:
        raise ConformanceError(problem)
    matrix = _working(est, prepared)
    after = float(np.median(np.linalg.norm(warp_points(matrix, d, points) - expected, axis=1)))
    text = f"median point error {before:.2f} -> {after:.2f} px (limit {DEFORMATION_GAIN} x before)"
    if not after < DEFORMATION_GAIN * before:
        flipped = Deformation(-d.field, d.shape)
        other = float(np.median(np.linalg.norm(warp_points(matrix, flipped, points) - expected, axis=1)))
        hint = " (the negated field fits better: u must be, per fixed point x, the step to its moving point)" \
            if other < after else ""
        raise ConformanceError(text + hint)
    return text


def check_recovers_known_transform(cls: type[Method]) -> str:
    prepared = prepared_pair(cls.uses_preprocessing)
    est = _estimate(_instance(cls), prepared.fixed, prepared.moving)
    original = est.matrix if est.frame == "original" else prepared.to_original(est.matrix)
    pair = _generated()
    moved = geometry.apply(original, pair.source_landmarks)
    rtre = np.linalg.norm(moved - pair.target_landmarks, axis=1) / np.hypot(*pair.target_rgb.shape[:2])
    text = f"median rTRE {np.median(rtre):.4f} (limit {TOLERANCE})"
    if not np.median(rtre) < TOLERANCE:
        raise ConformanceError(text)
    return text


CHECKS: dict[str, Callable[[type[Method]], str]] = {
    "metadata": check_metadata,
    "returns_affine": check_returns_affine,
    "identical_images": check_identical_images,
    "inputs_not_mutated": check_inputs_not_mutated,
    "deterministic": check_deterministic,
    "recovers_translation": check_recovers_translation,
    "recovers_rotation": check_recovers_rotation,
    "recovers_known_transform": check_recovers_known_transform,
    "recovers_deformation": check_recovers_deformation,
}
REQUIRED = frozenset({"metadata", "returns_affine", "inputs_not_mutated"})  # cannot be a known limit


# ----------------------------------------------------------------------------------------------------
# running them


def run_check(cls: type[Method], check: str) -> Result:
    """Run one check on a method class and classify the outcome (never raises for the method's faults)."""
    func = CHECKS[check]
    limits = cls.known_limits if isinstance(cls.known_limits, dict) else {}
    reason = limits.get(check, "") if check not in REQUIRED else ""
    if check != "metadata":
        why = cls.unavailable_reason()
        if why:
            return Result(check, SKIP, f"unavailable here: {why}")
    t0 = time.perf_counter()
    try:
        message, failure = func(cls), ""
    except ConformanceError as exc:
        message, failure = "", str(exc)
    except Exception as exc:  # noqa: BLE001 - any error of the method is a failed check, with its cause
        message, failure = "", f"raised {type(exc).__name__}: {' '.join(str(exc).split())}"
    spent = time.perf_counter() - t0
    if reason:
        if failure:
            return Result(check, LIMIT, failure, reason, spent)
        return Result(check, FAIL, f"declared a known limit but passes ({message or 'ok'}): remove "
                                   f"{check!r} from known_limits", reason, spent)
    if failure:
        return Result(check, FAIL, failure, "", spent)
    return Result(check, PASS, message, "", spent)


def run_named_check(name: str, check: str) -> Result:
    """:func:`run_check` on the method called ``name`` (registered or composed), looked up in this process: what
    ``bench check`` runs in its supervised child (:mod:`bench.isolate`), which loads the plugins first."""
    from bench import factory

    return run_check(factory.resolve(name), check)


@dataclass(frozen=True)
class Check:
    """One contract check bound to a method class; calling it runs it (for pytest, see the module doc).

    Returns the :class:`Result`; raises :class:`ConformanceError` on a failure. Under pytest a declared
    known limit is reported as an expected failure and an unavailable method as a skip.
    """

    method: type[Method]
    name: str

    def __str__(self) -> str:
        return self.name

    def run(self) -> Result:
        return run_check(self.method, self.name)

    def __call__(self) -> Result:
        result = self.run()
        if result.status == FAIL:
            raise ConformanceError(f"{self.method.name}: {self.name}: {result.message}")
        pytest = sys.modules.get("pytest")
        if pytest is not None and result.status == LIMIT:
            pytest.xfail(f"known limit: {result.reason} ({result.message})")
        if pytest is not None and result.status == SKIP:
            pytest.skip(f"{self.method.name}: {result.message}")
        return result


def checks(cls: type[Method]) -> list[Check]:
    """Every contract check for ``cls``, as named callables (``pytest.mark.parametrize(..., ids=str)``)."""
    return [Check(cls, name) for name in CHECKS]


def run_checks(cls: type[Method]) -> list[Result]:
    """Every check's :class:`Result` for ``cls``, in order."""
    return [c.run() for c in checks(cls)]


def check_method(cls: type[Method]) -> list[Result]:
    """Run every check; raise :class:`ConformanceError` listing every failure, else return the results."""
    results = run_checks(cls)
    failed = [r for r in results if r.status == FAIL]
    if failed:
        lines = "\n".join(f"  {r.check}: {r.message}" for r in failed)
        raise ConformanceError(f"{cls.name}: {len(failed)} check(s) failed:\n{lines}")
    return results


__all__ = ["CHECKS", "Check", "ConformanceError", "REQUIRED", "Result", "check_method", "checks",
           "prepared_pair", "run_check", "run_checks", "run_named_check"]
