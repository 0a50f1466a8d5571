"""Step 4 of the stage: the initial rotation (:func:`rotation_search`): the source's tissue centre onto the
target's, then every angle of the full circle scored by global NCC (:mod:`bench.preprocess.levels`), refined
around the best ones; with the flip test, the mirrored source too (:mod:`bench.preprocess.flip` decides)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench import geometry
from bench.preprocess.flip import choose_mirror
from bench.preprocess.levels import Level
from bench.preprocess.params import PreprocessParams


def _linear(angle_deg: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """``(N, 3, 3)`` rotations (geometry.rotation convention) after an optional mirror ``x -> -x``."""
    a = np.deg2rad(np.asarray(angle_deg, np.float64))
    c, s = np.cos(a), np.sin(a)
    f = np.where(np.asarray(flipped, bool), -1.0, 1.0)
    m = np.zeros((a.size, 3, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = c * f, s, -s * f, c, 1.0
    return m


def candidate_matrices(angle_deg, flipped, c_src, c_tgt, scale: float = 1.0) -> np.ndarray:
    """``(N, 3, 3)`` source -> target maps: move ``c_src`` onto ``c_tgt``, mirror, rotate (and scale) about it.

    ``T = translation(c_tgt) . scaling(scale) . rotation(angle) . mirror . translation(-c_src)``.
    """
    lin = _linear(np.atleast_1d(angle_deg), np.broadcast_to(flipped, np.atleast_1d(angle_deg).shape))
    return geometry.translation(*c_tgt) @ geometry.scaling(scale) @ lin @ geometry.translation(-c_src[0], -c_src[1])


def branch_matrix(branch: dict[str, Any], flipped: bool, c_src, c_tgt) -> np.ndarray:
    """The (3, 3) rigid working-frame matrix of one mirror state's best candidate as recorded in
    ``info["branches"]`` of :func:`rotation_search` (its angle and shift; the search scale is not part of it),
    exactly the matrix the search returns when that state wins."""
    return geometry.translation(*branch["shift"]) @ candidate_matrices(branch["angle_deg"], flipped, c_src,
                                                                       c_tgt)[0]


def _local_maxima(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest circular local maxima of a 1-D array (highest first)."""
    is_max = (values >= np.roll(values, 1)) & (values >= np.roll(values, -1))
    idx = np.flatnonzero(is_max)
    return idx[np.argsort(values[idx])[::-1][:k]]


def _parabola_peak(values: np.ndarray, i: int) -> float:
    """Sub-sample offset (in [-0.5, 0.5]) of the peak of a parabola through ``values[i-1:i+2]``."""
    if i <= 0 or i >= len(values) - 1:
        return 0.0
    y0, y1, y2 = values[i - 1], values[i], values[i + 1]
    den = y0 - 2 * y1 + y2
    return float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) if den < 0 else 0.0


def rotation_search(
    source: np.ndarray,
    target: np.ndarray,
    c_src: tuple[float, float],
    c_tgt: tuple[float, float],
    params: PreprocessParams | None = None,
    scale_hint: float | None = None,
    source_mask: np.ndarray | None = None,
    target_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Initial rotation: ``c_src`` onto ``c_tgt``, then the full circle of angles by global NCC.

    1. coarse: every ``angle_step_deg`` about the centres (and, with ``flip_test``, the mirrored source
       too) at ``rotation_size``, all in one batch. With ``translation_search`` each angle is scored at
       the shift that maximises its NCC (one batched FFT cross-correlation, shifts up to ``max_shift`` of
       the side): a centre of mass is only as good as the masks, and tissue that fills the frame has none;
    2. refine: around the ``refine_candidates`` best local maxima of each mirror state, every
       ``refine_step_deg`` within half a coarse step (plus one fine step) at ``refine_size`` (shift
       kept), one batch; a parabola through the peak gives the angle;
    3. with ``translation_search``, each candidate's shift again at ``refine_size``; the best candidate
       of each mirror state wins.

    ``scale_hint`` (target / source size of the tissue, e.g. from the masks' areas): when it differs from
    1 by more than 5 %, every step also runs with the source scaled by it, and the better NCC wins. The
    scale only steadies the search: the returned matrix is rigid (mirror aside), as in the paper.
    With ``flip_test`` the best candidate of each mirror state is kept and the mirrored one wins when its
    NCC leads by more than ``flip_margin``; when the lead is in ``(-flip_mi_band, flip_margin]`` (a close
    call: a global NCC of masked images is dominated by the tissue outline, which a mirror barely changes)
    the band-passed texture MI of the two candidates decides (:func:`bench.preprocess.flip.texture_mi`); below, the unmirrored
    source stays.

    Parameters
    ----------
    source, target : (Hs, Ws), (Ht, Wt) float32 working-frame images (masked, tissue bright)
    c_src, c_tgt : (x, y) tissue centres in each image
    scale_hint : optional relative scale to search at besides 1
    source_mask, target_mask : optional bool tissue masks for the flip test's texture MI (default
        ``image > 0``)

    Returns
    -------
    matrix : (3, 3) source -> target in the working frame
    info : angle_deg, flipped, shift (working px, after the centre move), search_scale, ncc_before
        (identity), ncc_com (centres only), ncc_after, ncc_flipped / ncc_unflipped (best of each
        mirror state), branches (each mirror state's best candidate: angle_deg, shift, search_scale, ncc),
        flip_lead (ncc_flipped - ncc_unflipped), flip_decision ("off", "ncc" or "texture"),
        mi_flipped / mi_unflipped (the texture MI, when it decided), rotation_coarse_s / rotation_refine_s
    """
    params = params or PreprocessParams()
    rotate, shifts = params.rotation, params.translation_search
    step, fine = params.angle_step_deg, min(params.refine_step_deg, params.angle_step_deg)
    scales = [1.0]
    if scale_hint is not None and rotate and abs(np.log(scale_hint)) > np.log(1.05):
        scales.append(float(scale_hint))
    states = [(f, sc) for f in ((False, True) if params.flip_test and rotate else (False,)) for sc in scales]
    coarse = np.arange(0.0, 360.0, step) if rotate else np.zeros(1)
    t0 = time.perf_counter()
    # 1. coarse, every (mirror, scale) state in one batch
    fine_level = Level(source, target, params.refine_size, params)
    level = Level(source, target, params.rotation_size, params, finer=fine_level)
    mats = np.concatenate([candidate_matrices(coarse, f, c_src, c_tgt, sc) for f, sc in states])
    ncc, shift = level.shifted(mats) if shifts else (level.ncc(mats), np.zeros((len(mats), 2)))
    ncc, shift = ncc.reshape(len(states), -1), shift.reshape(len(states), len(coarse), 2)
    t1 = time.perf_counter()
    k = params.refine_candidates if rotate and params.refine else 1
    cands = [(float(coarse[j]), f, sc, shift[i, j]) for i, (f, sc) in enumerate(states)
             for j in _local_maxima(ncc[i], k)]
    # 2. refine every candidate's angle (its coarse shift applied), one batch
    reach = fine * np.ceil((step / 2 + fine) / fine)  # the peak lies within half a coarse step
    offsets = np.arange(-reach, reach + fine / 2, fine) if rotate and params.refine else np.zeros(1)
    record = [np.eye(3), candidate_matrices(0.0, False, c_src, c_tgt)[0]]  # identity, centres only
    mats = np.concatenate([geometry.translation(*d) @ candidate_matrices(a + offsets, f, c_src, c_tgt, sc)
                           for a, f, sc, d in cands] + [np.stack(record)])
    ncc2 = fine_level.ncc(mats)
    n_off = len(offsets)
    refined = []  # (angle, flipped, scale, shift, ncc) of each candidate
    for i, (a, f, sc, d) in enumerate(cands):
        vals = ncc2[i * n_off: (i + 1) * n_off]
        j = int(np.argmax(vals))
        angle = a + offsets[j] + (_parabola_peak(vals, j) * fine if n_off > 1 else 0.0)
        refined.append(((angle + 180.0) % 360.0 - 180.0, f, sc, d, float(vals[j])))
    # 3. every candidate's shift again at the finer size, so candidates compare at their best
    if shifts:
        mats = np.stack([geometry.translation(*d) @ candidate_matrices(a, f, c_src, c_tgt, sc)[0]
                         for a, f, sc, d, _ in refined])
        ncc3, shift3 = fine_level.shifted(mats)
        refined = [(a, f, sc, d + shift3[i], float(ncc3[i])) for i, (a, f, sc, d, _) in enumerate(refined)]
    best: dict[bool, tuple[float, float, np.ndarray, float]] = {}
    for a, f, sc, d, v in refined:
        if f not in best or v > best[f][3]:
            best[f] = (a, sc, d, v)
    # each mirror state's rigid result: the search scale is dropped about the matched point, which stays
    # where it was put
    rigid = {f: geometry.translation(*d) @ candidate_matrices(a, f, c_src, c_tgt)[0]
             for f, (a, _, d, _) in best.items()}
    flipped, decision, lead, mi = choose_mirror({f: b[3] for f, b in best.items()}, rigid, source, target,
                                                params, source_mask=source_mask, target_mask=target_mask)
    angle, scale, shift_w, ncc_after = best[flipped]
    matrix = rigid[flipped]
    info = {
        "angle_deg": float(angle),
        "flipped": bool(flipped),
        "shift": [float(v) for v in shift_w],
        "search_scale": float(scale),
        "ncc_before": float(ncc2[-2]),
        "ncc_com": float(ncc2[-1]),
        "ncc_after": float(ncc_after),
        "ncc_flipped": float(best[True][3]) if True in best else None,
        "ncc_unflipped": float(best[False][3]),
        "flip_lead": None if lead is None else float(lead),
        "flip_decision": decision,
        "mi_flipped": mi.get("mi_flipped"),
        "mi_unflipped": mi.get("mi_unflipped"),
        "branches": {("flipped" if f else "unflipped"): {"angle_deg": float(a), "shift": [float(v) for v in d],
                                                          "search_scale": float(sc), "ncc": float(v)}
                     for f, (a, sc, d, v) in best.items()},
        "rotation_coarse_s": t1 - t0,
        "rotation_refine_s": time.perf_counter() - t1,
    }
    return matrix, info
