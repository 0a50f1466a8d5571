"""One pair's work, as it runs inside a worker process: :func:`run_pair`.

1. read the landmark files (a bad file fails that pair's rows with a one-line message);
2. run the shared preprocessing once for the methods that use it (and the light stage once for those
   that do not), through the on-disk cache; check the table's size and diagonal and the landmarks against
   the images read from disk;
3. for each method: ``estimate`` timed by the harness (the first call in a process is an untimed warm-up on
   the pair at half size; both calls bounded by the time limit), checked (a finite, invertible matrix; JSON-serialisable diagnostics), composed into one
   matrix in original pixel coordinates, source landmarks warped by it, scored against the target landmarks.

Rows are built by :class:`bench.record.Row`'s builders. The preprocessing alone (the answer of a call that
gives none) is scored once per pair and stage (a :class:`bench.record.Fallback`), not once per call.

It never raises for a bad pair or a failing method. ``on_event`` (when given) hears about each method call
before it starts (with the method's device and the pair's fallback, from which the supervisor builds the
row if the call never returns) and about each row as soon as it is made; the supervisor
(:mod:`bench.supervise`) uses that to bound calls, survive crashes and keep every finished row. Method
instances are built, prepared and warmed up once per process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from bench import deformation, factory, geometry, imaging, metrics, quality, registry
from bench.method import Context, Estimate, ImageView, Method, RegistrationFailed
from bench.pairs import LandmarkError, Pair, read_landmarks
from bench.plan import MethodSpec, PairTask
from bench.preprocess import ImageLoadError, PreparedPair
from bench.record import CRASHED, Fallback, Row, Scores, Status, jsonable
from bench.timing import CallTimeout, timed

Event = Callable[[str, dict[str, Any]], None]

SIZE_TOLERANCE = 0.02  # relative: the table's size and diagonal against the target image read from disk
LANDMARK_MARGIN = 0.10  # landmarks may lie this share of a side beyond their image's edge, not further
MAX_INVERSION_RESIDUAL_PX = 0.5  # a landmark the deformation cannot be inverted at (working px): a failed row
WARM_UP_MIN_SIDE = 64  # the warm-up runs on the pair at half size when that leaves at least this many pixels


@dataclass
class PairResult:
    """Rows of one pair (all of them, or one at a time from a supervised worker)."""

    rows: list[Row]
    warped: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (N, 2) warped source landmarks
    finished: bool = True  # the last result of its pair


# per process state: method instances are built, prepared and warmed up once per process
_INSTANCES: dict[tuple[MethodSpec, str], Method] = {}
_WARM: set[tuple[MethodSpec, str]] = set()


def _instance(spec: MethodSpec, ctx: Context) -> Method:
    key = (spec, ctx.device)
    if key not in _INSTANCES:
        m = spec.build()
        m.prepare(ctx)
        _INSTANCES[key] = m
    return _INSTANCES[key]


# the last preprocessed pairs of this process whose task was one of several (a parallel run splits its
# last pairs into one task per method, see bench.supervise.TAIL_PAIRS), so each worker prepares such a pair
# once, as a serial run does, even without the disk cache; bounded in count and in bytes
_PREPARED: OrderedDict[tuple, tuple[PreparedPair, float, bool]] = OrderedDict()
PREPARED_KEEP = 8
PREPARED_MAX_BYTES = 200 * 2**20


SCORING_LIMIT_S = 120.0  # the parent's time limit for the harness's scoring of one answer (see _run_method)


def _nbytes(prepared: PreparedPair) -> int:
    views = (prepared.fixed, prepared.moving) + ((prepared.alternative.moving,) if prepared.alternative else ())
    arrays = (getattr(v, f.name) for v in views for f in dataclasses.fields(v))
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _prepare(task: PairTask, full: bool) -> tuple[PreparedPair, float, bool]:
    """Run (or fetch from this process's memory, or from the disk cache) one preprocessing stage; returns
    (prepared, compute seconds, cached) exactly as the first preparation of the pair returned them."""
    if not task.split:
        return _prepare_now(task, full)
    try:
        stats = [os.stat(f) for f in (task.pair.source_image, task.pair.target_image)]
    except (OSError, TypeError, ValueError):
        return _prepare_now(task, full)  # a missing file: the stage says what is wrong
    files = tuple((str(f), st.st_size, st.st_mtime_ns)
                  for f, st in zip((task.pair.source_image, task.pair.target_image), stats, strict=True))
    key = (files, task.preprocess, full, task.cache_enabled, task.cache_dir)
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    out = _prepare_now(task, full)
    _PREPARED[key] = out
    while len(_PREPARED) > PREPARED_KEEP or (
            len(_PREPARED) > 1 and sum(_nbytes(v[0]) for v in _PREPARED.values()) > PREPARED_MAX_BYTES):
        _PREPARED.popitem(last=False)
    return out


def _prepare_now(task: PairTask, full: bool) -> tuple[PreparedPair, float, bool]:
    from bench import cache as cache_mod

    cache = cache_mod.PreprocessCache(task.cache_dir, enabled=task.cache_enabled)
    t0 = time.perf_counter()
    prepared, cached = cache.get_or_prepare(task.pair.source_image, task.pair.target_image, task.preprocess, full)
    spent = time.perf_counter() - t0
    compute = float(prepared.diagnostics.get("time_s", spent)) if cached else spent
    return prepared, compute, cached


def diagonal(pair: Pair, prepared: PreparedPair) -> float:
    """The diagonal used for scoring: the table's, else the target image's read from disk."""
    if pair.diagonal:
        return float(pair.diagonal)
    return metrics.image_diagonal(*prepared.target_shape)


def check_inputs(pair: Pair, prepared: PreparedPair, src: np.ndarray | None, tgt: np.ndarray | None) -> str | None:
    """A one-line reason when the table or the landmarks contradict the images read from disk."""
    h, w = (int(v) for v in prepared.target_shape)
    if pair.target_size is not None:
        th, tw = pair.target_size
        if abs(th - h) > SIZE_TOLERANCE * h + 1 or abs(tw - w) > SIZE_TOLERANCE * w + 1:
            return (f"{pair.target_image}: the table's image size ({th}, {tw}) differs from the image read "
                    f"from disk ({h}, {w})")
    if pair.diagonal is not None:
        actual = math.hypot(h, w)
        if abs(pair.diagonal - actual) > SIZE_TOLERANCE * actual:
            return (f"{pair.target_image}: the table's image diagonal {pair.diagonal:g} differs from the image "
                    f"read from disk ({actual:.1f} for {h}x{w})")
    for which, pts, shape, path in (("source", src, prepared.source_shape, pair.source_landmarks),
                                    ("target", tgt, prepared.target_shape, pair.target_landmarks)):
        if pts is None:
            continue
        sh, sw = shape
        far = (pts[:, 0] > sw * (1 + LANDMARK_MARGIN) + 1) | (pts[:, 1] > sh * (1 + LANDMARK_MARGIN) + 1)
        if far.any():
            i = int(np.argmax(far))
            return (f"{path}: landmark {i + 1} ({pts[i, 0]:g}, {pts[i, 1]:g}) lies far outside the {which} "
                    f"image ({sh}x{sw} pixels)")
    return None


class _BadAnswer(Exception):
    """The method returned, but its answer is unusable (singular or non-finite matrix, diagnostics not JSON)."""


def _scores(task: PairTask, prepared: PreparedPair, matrix: np.ndarray, src: np.ndarray | None,
            tgt: np.ndarray | None, warped: np.ndarray | None = None) -> Scores:
    """``matrix`` (original pixel coordinates) scored on the task's pair; ``warped``: the source landmarks
    already moved into the target frame (a nonrigid answer), else they are moved by ``matrix``."""
    diag = diagonal(task.pair, prepared)
    if warped is None:
        warped = None if src is None else geometry.apply(matrix, src)
    values = {} if warped is None or tgt is None else metrics.score_pair(warped, src, tgt, diag,
                                                                         task.success_threshold)
    return Scores(matrix=matrix, diagonal=diag, values=values, warped=warped, has_target=tgt is not None)


def _fallback(task: PairTask, stage: tuple[PreparedPair, float, bool], src: np.ndarray | None,
              tgt: np.ndarray | None) -> Fallback:
    """The pair's fallback for one preprocessing stage: what a pipeline falls back to when a call fails, the
    preprocessing alone (its matrix scored), with the stage's diagnostics, time and cache hit."""
    prepared, pre_time, cached = stage
    pre_diag = {k: v for k, v in prepared.diagnostics.items() if isinstance(v, int | float | str | bool)}
    return Fallback(scores=_scores(task, prepared, prepared.to_original(np.eye(3)), src, tgt),
                    diagnostics=pre_diag, time_s=pre_time, cached=cached)


def run_pair(task: PairTask, on_event: Event | None = None) -> PairResult:
    """Process one pair with every method of the task. Never raises for a bad pair or a failing method."""
    emit: Event = on_event or (lambda kind, data: None)
    result = PairResult(rows=[])

    def record(rows: list[Row], warped: dict[str, np.ndarray] | None = None) -> PairResult:
        for row in rows:
            pts = (warped or {}).get(row.method)
            emit("row", {"row": row, "warped": pts})
            result.rows.append(row)
            if pts is not None:
                result.warped[row.method] = pts
        return result

    def failed(specs, message: str) -> list[Row]:
        return [Row.failed(pair, spec, message, task.device) for spec in specs]

    if task.plugins:
        registry.discover(task.plugins)
    pair = task.pair
    if pair.problem:
        return record(failed(task.methods, pair.problem))
    try:
        src_lnd = read_landmarks(pair.source_landmarks) if pair.source_landmarks else None
        tgt_lnd = read_landmarks(pair.target_landmarks) if pair.target_landmarks else None
    except LandmarkError as exc:
        return record(failed(task.methods, str(exc)))

    stages: dict[bool, tuple[PreparedPair, Fallback] | str] = {}
    for i, spec in enumerate(task.methods):
        full = factory.resolve(spec.name).uses_preprocessing
        if full not in stages:
            try:
                prepared = _prepare(task, full)
            except (ImageLoadError, OSError, ValueError) as exc:
                stages[full] = str(exc) if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
            else:
                problem = check_inputs(pair, prepared[0], src_lnd, tgt_lnd)
                if problem:  # the table contradicts the images: no method of this pair is scored
                    return record(failed(task.methods[i:], problem))
                stages[full] = (prepared[0], _fallback(task, prepared, src_lnd, tgt_lnd))
        stage = stages[full]
        if isinstance(stage, str):
            record(failed([spec], stage))
            continue
        row, warped = _run_method(task, spec, *stage, src_lnd, tgt_lnd, emit)
        record([row], {spec.name: warped} if warped is not None else None)
    return result


def _half(view: ImageView) -> ImageView:
    """``view`` at half its size (the warm-up's input)."""
    h, w = view.shape
    size = (max(1, w // 2), max(1, h // 2))

    def mask(m):
        return None if m is None else cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0

    return ImageView(
        image=cv2.resize(view.image, size, interpolation=cv2.INTER_AREA),
        mask=mask(view.mask),
        rgb=None if view.rgb is None else cv2.resize(view.rgb, size, interpolation=cv2.INTER_AREA),
        valid=mask(view.valid),
    )


def _warm_up(method: Method, prepared: PreparedPair, ctx: Context) -> None:
    """The untimed first call of a method in a process: on the pair at half size (a quarter of the pixels),
    which loads what a first call loads (libraries, weights, thread pools) at a quarter of the cost of a
    full call. Its answer is not used; an exception is ignored (the timed call will show it again), except
    a timeout or a crash, which are the call's."""
    fixed, moving = prepared.fixed, prepared.moving
    if min(*fixed.shape, *moving.shape) >= 2 * WARM_UP_MIN_SIDE:
        fixed, moving = _half(fixed), _half(moving)
    try:
        method.estimate(fixed, moving, ctx)
    except CallTimeout:
        raise
    except Exception:  # noqa: BLE001, S110 - the warm-up's answer is not used
        pass


# ---- close flip calls: both mirror states (issue 20) ---------------------------------------------------------
def _orientation_name(prepared: PreparedPair) -> str:
    return "mirrored" if prepared.diagnostics.get("flipped") else "as scanned"


def _estimate_oriented(method: Method, prepared: PreparedPair,
                       ctx: Context) -> tuple[Estimate, PreparedPair, dict[str, Any] | None]:
    """``method.estimate`` on the pair, on both mirror states when the flip test was a close call.

    Without ``prepared.alternative``: the one call, ``(estimate, prepared, None)``. With it: the method runs on
    the primary state, then on the alternative, and each answer is scored by the landmark-free
    :func:`bench.quality.alignment_quality` on its own state's images. The alternative wins when its quality is
    higher than the primary's and not "likely failed" (at least :data:`bench.quality.LIKELY_FAILED_BELOW`):
    two answers that both look failed (e.g. the rigid stage alone on a pair it leaves misaligned) say nothing
    about the mirror, and the flip test's own call stands. An answer with a defective matrix scores below any
    usable one; a ``RegistrationFailed`` on one state leaves the other; when both fail, the primary's exception
    is raised. Everything here runs inside the harness's timed call, so a close call's time is both calls and
    both quality checks.

    Returns
    -------
    (the winning estimate, the winning state's PreparedPair (its ``to_original`` converts the matrix), and
    the row's ``orientation`` diagnostics: ``close_call``, ``chosen`` and ``primary`` ("as scanned" or
    "mirrored"), ``quality_as_scanned`` / ``quality_mirrored`` (None when that state failed), ``failed`` (state ->
    reason, when one failed) and each state's call time, ``time_as_scanned_s`` / ``time_mirrored_s``)
    """
    if prepared.alternative is None:
        return method.estimate(prepared.fixed, prepared.moving, ctx), prepared, None
    answers: list[tuple[float, PreparedPair, Estimate]] = []
    errors: list[RegistrationFailed] = []
    diag: dict[str, Any] = {"close_call": True, "primary": _orientation_name(prepared), "failed": {}}
    for p in (prepared, prepared.alternative):
        name = _orientation_name(p)
        t0 = time.perf_counter()
        try:
            est = method.estimate(p.fixed, p.moving, ctx)
        except RegistrationFailed as exc:
            errors.append(exc)
            diag["failed"][name] = str(exc)
            diag[f"quality_{name.replace(' ', '_')}"] = None
            continue
        finally:
            diag[f"time_{name.replace(' ', '_')}_s"] = time.perf_counter() - t0
        working = p.to_working(est.matrix) if est.frame == "original" else est.matrix
        usable = not (imaging.matrix_defect(est.matrix, imaging.HARNESS_MIN_DET)
                      or imaging.matrix_defect(working, imaging.HARNESS_MIN_DET))
        q = float(quality.answer_quality(p.fixed, p.moving, working, est.deformation)) if usable else -math.inf
        diag[f"quality_{name.replace(' ', '_')}"] = q if usable else None
        answers.append((q, p, est))
    if not answers:
        raise errors[0]
    best = answers[0]
    if len(answers) == 2:
        (q0, *_), (q1, *_) = answers
        if q1 > q0 and (q1 >= quality.LIKELY_FAILED_BELOW or q0 == -math.inf):
            best = answers[1]
    diag["chosen"] = _orientation_name(best[1])
    return best[2], best[1], diag
# ---- end of close flip calls ---------------------------------------------------------------------------------


def _run_method(
    task: PairTask,
    spec: MethodSpec,
    prepared: PreparedPair,
    fallback: Fallback,
    src_lnd: np.ndarray | None,
    tgt_lnd: np.ndarray | None,
    emit: Event,
) -> tuple[Row, np.ndarray | None]:
    pair = task.pair
    try:
        method = _instance(spec, Context(device=task.device, seed=task.seed, pair_id=pair.pair_id))
    except Exception as exc:  # noqa: BLE001 - a method that cannot even start fails its rows
        return Row.failed(pair, spec, f"cannot start method: {type(exc).__name__}: {exc}", task.device), None
    device = method.device_for(task.device)
    ctx = Context(device=device, seed=task.seed, pair_id=pair.pair_id)

    # sent before each call: the supervisor builds the row from it if the call never returns
    announce = {"method": spec.name, "limit": task.timeout_s, "device": device, "fallback": fallback}

    chosen: dict[str, Any] = {}

    def call():  # a close flip call: the method runs on both mirror states (_estimate_oriented)
        estimate, chosen["prepared"], chosen["orientation"] = _estimate_oriented(method, prepared, ctx)
        return estimate

    key = (spec, task.device)
    status, error, diagnostics = Status.OK.value, "", {}
    t0, c0 = time.perf_counter(), time.process_time()
    phase = "timed"
    try:
        if key not in _WARM:  # warm-up call, excluded from timing, bounded like the timed one
            phase = "warm-up"
            emit("call", {**announce, "phase": phase})
            timed(lambda: _warm_up(method, prepared, ctx), device=device, limit_s=task.timeout_s)
            _WARM.add(key)
            t0, c0 = time.perf_counter(), time.process_time()
            phase = "timed"
        emit("call", {**announce, "phase": phase})
        out = timed(call, device=device, limit_s=task.timeout_s)
        estimate, wall, cpu = out.value, out.wall_s, out.cpu_s
        # the harness scores the answer now (quality, error estimate: a re-alignment, torch's import at first):
        # the parent's limit restarts, generous, so a short --timeout never cuts the scoring of a finished call
        emit("call", {**announce, "phase": "scoring",
                      "limit": max(SCORING_LIMIT_S, task.timeout_s) if task.timeout_s else None})
        prepared = chosen["prepared"]  # the winning mirror state's preparation (the primary one but on close calls)
        if estimate.frame == "original":
            matrix, working = estimate.matrix, prepared.to_working(estimate.matrix)
        else:
            matrix, working = prepared.to_original(estimate.matrix), estimate.matrix
        defect = (imaging.matrix_defect(estimate.matrix, imaging.HARNESS_MIN_DET)
                  or imaging.matrix_defect(matrix, imaging.HARNESS_MIN_DET))
        problem = f"the method returned a {defect}" if defect else None
        try:
            diagnostics = json.loads(json.dumps(jsonable(dict(estimate.diagnostics)), allow_nan=True))
        except (TypeError, ValueError) as exc:
            problem = problem or f"the method returned diagnostics that are not JSON-serialisable: {exc}"
            diagnostics = {}
        if problem:
            raise _BadAnswer(problem)
        if chosen["orientation"] is not None:
            diagnostics["orientation"] = chosen["orientation"]
        if estimate.deformation is not None:
            nonrigid = _nonrigid(task, prepared, estimate, src_lnd, tgt_lnd, wall)
        row_quality = quality.answer_quality(prepared.fixed, prepared.moving, working, estimate.deformation)
        row_estimate = (quality.estimated_error(prepared.fixed, prepared.moving, working)
                        if estimate.deformation is None and task.error_estimate else None)
    except CallTimeout as exc:
        status, error = Status.TIMEOUT.value, ("first (warm-up) " if phase == "warm-up" else "") + str(exc)
    except _BadAnswer as exc:
        status, error = Status.FAILED.value, str(exc)
    except RegistrationFailed as exc:
        status, error = Status.FAILED.value, f"method reported failure: {exc}"
    except SystemExit as exc:  # a method must not end the process: recorded as a crash (retried on rerun)
        status, error = Status.FAILED.value, f"{CRASHED} the method called sys.exit({exc.code!r})"
    except Exception as exc:  # noqa: BLE001 - one failing call never stops the run
        status, error = Status.FAILED.value, f"{type(exc).__name__}: {exc}"
    wall, cpu = (out.wall_s, out.cpu_s) if status == Status.OK.value else (
        time.perf_counter() - t0, time.process_time() - c0)
    if status != Status.OK.value:
        row = Row.answered(pair, spec, device, fallback, status, error, diagnostics, wall, cpu)
        return row, fallback.scores.warped
    if estimate.deformation is None:
        scores = _scores(task, prepared, matrix, src_lnd, tgt_lnd)
        return Row.answered(pair, spec, device, fallback, status, error, diagnostics, wall, cpu, scores,
                            row_quality, row_estimate), scores.warped
    scores = _scores(task, prepared, matrix, src_lnd, tgt_lnd, warped=nonrigid.warped)
    row = Row.answered(pair, spec, device, fallback, status, error, {**diagnostics, **nonrigid.diagnostics},
                       wall, cpu, scores, row_quality)
    return row.update(start_rtre_median=nonrigid.start_rtre, time_nonrigid_s=nonrigid.time_s), scores.warped


@dataclass
class _Nonrigid:
    """What the harness makes of a nonrigid answer: the source landmarks moved by the whole transform, the
    start's median rTRE, the nonrigid stage's time and diagnostics (folding, inversion residual)."""

    warped: np.ndarray | None
    start_rtre: float | None
    time_s: float
    diagnostics: dict[str, Any]


def _nonrigid(task: PairTask, prepared: PreparedPair, estimate: Estimate, src: np.ndarray | None,
              tgt: np.ndarray | None, wall: float) -> _Nonrigid:
    """Check a nonrigid answer (``_BadAnswer`` when it folds, is not finite, or cannot be inverted at a
    landmark) and move the source landmarks by it (ANHIR's direction: into the target frame)."""
    problem = deformation.check(estimate.deformation)
    if problem:
        raise _BadAnswer(f"the method returned an unusable deformation: {problem}")
    fold = deformation.folding(estimate.deformation)
    diag = {"nonrigid": {"folding": round(float(fold), 6), "grid": list(estimate.deformation.grid_shape)}}
    warped = start_rtre = None
    if src is not None:
        warped, residual = prepared.source_points_to_target(src, estimate.matrix, estimate.deformation)
        worst = float(np.max(residual)) if len(residual) else 0.0
        diag["nonrigid"]["inversion_residual_px"] = round(worst, 4)
        if not np.all(np.isfinite(warped)) or worst > MAX_INVERSION_RESIDUAL_PX:
            raise _BadAnswer(f"the method returned a deformation that cannot be inverted at "
                             f"{int(np.sum(residual > MAX_INVERSION_RESIDUAL_PX))} landmark(s) (residual up to "
                             f"{worst:.2g} working px)")
        if tgt is not None:
            start = estimate.matrix if estimate.start is None else estimate.start
            start_scores = _scores(task, prepared, prepared.to_original(start), src, tgt)
            start_rtre = start_scores.values.get("rtre_median")
    stage_time = estimate.diagnostics.get("nonrigid_time_s")
    return _Nonrigid(warped, start_rtre, float(stage_time) if isinstance(stage_time, int | float) else wall, diag)
