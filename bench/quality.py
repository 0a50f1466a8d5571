"""Landmark-free checks of a finished alignment, the same for every method.

``matrix_problem`` says why an affine matrix is degenerate; ``alignment_evidence`` measures how much more two
aligned images share than the same images slightly shifted; ``alignment_quality`` is the ``quality`` column
the harness writes on every ``ok`` row (higher = better aligned; docs/quality.md); ``estimated_error`` is the
``error_estimate`` column of every ``ok`` affine row: how far a local re-alignment moves the tissue, an
estimate of the row's rTRE (docs/quality.md).

The acceptance checks the methods share (sift, surf, iterative, elastix) live here too, declared once:
:class:`AcceptanceParams` (a method's ``Params`` inherits it, so ``--set sift.min_evidence=1.1`` works and
``run.json`` stays flat) and :func:`accept`, which raises :class:`bench.RegistrationFailed` with the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from bench import imaging
from bench.method import RegistrationFailed


@dataclass(frozen=True)
class AcceptanceParams:
    """The failure checks shared by the methods that can tell they failed (sift, surf, iterative, elastix).

    A method's ``Params`` dataclass inherits these fields (``class SiftParams(AcceptanceParams)``), so each
    is set per method (``--set iterative.min_evidence=0``) and recorded with the method's other parameters.
    """

    min_scale: float = 0.5  # sqrt(|det A|) outside [min_scale, max_scale]: degenerate
    max_scale: float = 2.0
    max_anisotropy: float = 1.5  # ratio of the singular values of A above this: degenerate (shear)
    min_evidence: float = 1.2  # alignment_evidence contrast (MI aligned / MI shifted) below this: failed; 0 = off
    evidence_sigma: float = 4.0  # band-pass scale of that check, pixels


def accept(fixed: Any, moving: Any, matrix: np.ndarray, params: AcceptanceParams) -> dict[str, float]:
    """Check a method's answer: raise :class:`bench.RegistrationFailed` with the reason, else return the
    evidence diagnostics.

    The matrix (moving -> fixed working pixels) must not be degenerate (:func:`matrix_problem`), and, unless
    ``params.min_evidence`` is 0, the two views (:class:`bench.ImageView`) aligned by it must share structure:
    :func:`alignment_evidence` contrast at least ``params.min_evidence``.

    Returns
    -------
    dict
        ``evidence_mi``, ``evidence_mi_shifted``, ``evidence_contrast`` (rounded to 4 digits); empty when the
        evidence check is off.
    """
    problem = matrix_problem(matrix, params.min_scale, params.max_scale, params.max_anisotropy)
    if problem:
        raise RegistrationFailed(problem)
    if params.min_evidence <= 0:
        return {}
    ev = alignment_evidence(fixed.image, fixed.mask, moving.image, moving.mask, matrix, params.evidence_sigma)
    if ev["contrast"] < params.min_evidence:
        raise RegistrationFailed(
            f"no shared structure after alignment: band-pass MI {ev['mi']:.4f} vs {ev['mi_shifted']:.4f} "
            f"when shifted (contrast {ev['contrast']:.2f} < {params.min_evidence})"
        )
    return {f"evidence_{k}": round(v, 4) for k, v in ev.items()}


def matrix_problem(matrix: np.ndarray, min_scale: float, max_scale: float, max_anisotropy: float) -> str | None:
    """Why an affine matrix is degenerate (scale out of range, shear, reflection), or None if it is fine.

    Scale is ``sqrt(det A)`` of the linear part ``A``; anisotropy is the ratio of its singular values
    (a shear or a one-axis stretch raises it).

    >>> matrix_problem(np.array([[1.0, 0, 3], [0, 1, 4]]), 0.5, 2.0, 1.5) is None
    True
    >>> matrix_problem(np.array([[3.0, 0, 0], [0, 3, 0]]), 0.5, 2.0, 1.5)
    'degenerate matrix: scale 3.000 outside [0.5, 2.0]'
    >>> matrix_problem(np.array([[-1.0, 0, 0], [0, 1, 0]]), 0.5, 2.0, 1.5)
    'degenerate matrix: determinant -1 (reflection or collapse)'
    """
    a = np.asarray(matrix, dtype=np.float64)[:2, :2]
    det = float(np.linalg.det(a))
    if not np.isfinite(det) or det <= 0:
        return f"degenerate matrix: determinant {det:.3g} (reflection or collapse)"
    scale = float(np.sqrt(det))
    if not min_scale <= scale <= max_scale:
        return f"degenerate matrix: scale {scale:.3f} outside [{min_scale}, {max_scale}]"
    s = np.linalg.svd(a, compute_uv=False)
    if s[0] / s[1] > max_anisotropy:
        return f"degenerate matrix: anisotropy (shear) {s[0] / s[1]:.3f} > {max_anisotropy}"
    return None


def band_pass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Difference of Gaussians (``sigma`` minus ``4 sigma``) of a (H, W) image, float32."""
    img = np.asarray(image, dtype=np.float32)
    return cv2.GaussianBlur(img, (0, 0), sigma) - cv2.GaussianBlur(img, (0, 0), 4 * sigma)


def alignment_evidence(
    fixed_image: np.ndarray,
    fixed_mask: np.ndarray,
    moving_image: np.ndarray,
    moving_mask: np.ndarray,
    matrix: np.ndarray,
    sigma: float = 4.0,
    bins: int = 16,
    max_samples: int = 100_000,
) -> dict[str, float]:
    """How much more the aligned images share than the same images slightly shifted.

    Both images are band-passed (:func:`band_pass`), the moving one is warped into the fixed frame by
    ``matrix`` (moving -> fixed), and the mutual information of the two (rank-binned, so any monotonic or
    non-monotonic stain relation counts) is measured inside the common tissue, eroded so that the tissue
    outline does not count. The same is measured with the warped image shifted by ``4 sigma`` in 8
    directions: the structure of one tissue seen in two stains is only shared where it lies on itself, so
    a correct alignment gives clearly more information than its shifted copies, while an unrelated pair
    (or a match of outlines only) gives about the same. Returns ``mi`` (at the alignment), ``mi_shifted``
    (largest over the shifts) and ``contrast = mi / mi_shifted`` (0 when the common tissue is too small).

    Parameters
    ----------
    fixed_image, moving_image : (H, W), (H2, W2) float arrays
    fixed_mask, moving_mask : bool arrays of the same shapes
    matrix : (3, 3) or (2, 3) moving -> fixed
    """
    h, w = fixed_image.shape
    m2 = np.asarray(matrix, dtype=np.float64)[:2]
    warped = cv2.warpAffine(band_pass(moving_image, sigma), m2, (w, h), flags=cv2.INTER_LINEAR)
    wmask = cv2.warpAffine(moving_mask.astype(np.uint8), m2, (w, h), flags=cv2.INTER_NEAREST)
    d = max(1, int(round(4 * sigma)))
    k = 2 * (d + int(round(2 * sigma))) + 1
    common = cv2.erode(fixed_mask.astype(np.uint8) & wmask, np.ones((k, k), np.uint8)) > 0
    common[:d], common[-d:], common[:, :d], common[:, -d:] = False, False, False, False
    ys, xs = np.nonzero(common)
    if len(ys) < 500:
        return {"mi": 0.0, "mi_shifted": 0.0, "contrast": 0.0}
    step = max(1, len(ys) // max_samples)
    ys, xs = ys[::step], xs[::step]
    f = band_pass(fixed_image, sigma)[ys, xs]
    mi = imaging.rank_mi(f, warped[ys, xs], bins)
    shifts = [(dx, dy) for dx in (-d, 0, d) for dy in (-d, 0, d) if dx or dy]
    mi_shifted = max(imaging.rank_mi(f, warped[ys + dy, xs + dx], bins) for dx, dy in shifts)
    return {"mi": mi, "mi_shifted": mi_shifted, "contrast": mi / mi_shifted if mi_shifted > 0 else 0.0}


# ---------------------------------------------------------------------------------------------
# the harness's quality score (docs/quality.md); constants chosen on generated pairs only
# (studies/quality_auc.py generated)

QUALITY_SIZE = 256  # the score works on both images shrunk so the fixed one's longer side is this, px
QUALITY_SCALES = (1.0, 2.0, 4.0)  # band-pass sigmas at that size, px (about 0.3 %, 0.6 %, 1.2 % of the diagonal)
QUALITY_SHIFT = 0.05  # the alignment is compared with itself moved by this fraction of the diagonal
QUALITY_TURN = 0.0  # ... and turned by this many degrees about the common tissue's centre (0 = not)
QUALITY_BINS = 16
QUALITY_SAMPLES = 20_000


def _shrink_matrix(factor: float) -> np.ndarray:
    """Pixel-centre resampling by ``factor``: ``x -> (x + 0.5) factor - 0.5``."""
    return np.array([[factor, 0.0, 0.5 * factor - 0.5], [0.0, factor, 0.5 * factor - 0.5], [0.0, 0.0, 1.0]])


def _masked_band_pass(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Difference of Gaussians (``sigma`` minus ``2 sigma``) of the tissue only, by normalised convolution
    (each blur divided by the blurred mask), so the tissue outline makes no edge; 0 outside ``mask``."""
    m = mask.astype(np.float32)
    img = image.astype(np.float32) * m

    def blur(s: float) -> np.ndarray:
        return cv2.GaussianBlur(img, (0, 0), s) / np.maximum(cv2.GaussianBlur(m, (0, 0), s), 1e-3)

    return (blur(sigma) - blur(2 * sigma)) * m


def quality_terms(fixed: Any, moving: Any, matrix: np.ndarray, *, size: int = QUALITY_SIZE,
                  scales: tuple[float, ...] = QUALITY_SCALES, shift: float = QUALITY_SHIFT,
                  turn: float = QUALITY_TURN, bins: int = QUALITY_BINS,
                  max_samples: int = QUALITY_SAMPLES) -> dict[str, float]:
    """The parts of :func:`alignment_quality`: ``overlap`` and one ``contrast_<sigma>`` per band-pass scale.

    Both views are shrunk so the fixed image's longer side is ``size`` px (the score is a property of the
    alignment, not of the working resolution), the moving one warped by ``matrix``. ``overlap`` is the common
    tissue over the smaller of the two tissue areas. For each ``sigma`` in ``scales`` both images are
    band-passed inside their own tissue (:func:`_masked_band_pass`) and the mutual information of the two
    (rank-binned: any stain relation counts) is measured inside the common tissue, then again with the
    warped image moved by ``shift`` x the diagonal in 8 directions (and turned by ``+-turn`` degrees): the
    contrast is the MI at the alignment over the largest MI of those moved copies. All 0 when the matrix is
    not finite and invertible or the common tissue is too small.
    """
    out = {"overlap": 0.0, **{f"contrast_{s:g}": 0.0 for s in scales}}
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if imaging.matrix_defect(m, imaging.INVERTIBLE_MIN_DET):
        return out
    factor = min(1.0, size / max(fixed.image.shape))
    r = _shrink_matrix(factor)

    def shrink(a: np.ndarray, interp: int) -> np.ndarray:
        h, w = a.shape
        return cv2.resize(a.astype(np.float32), (max(1, round(w * factor)), max(1, round(h * factor))),
                          interpolation=interp)

    f_img, f_mask = shrink(fixed.image, cv2.INTER_AREA), shrink(fixed.mask, cv2.INTER_AREA) > 0.5
    m_img, m_mask = shrink(moving.image, cv2.INTER_AREA), shrink(moving.mask, cv2.INTER_AREA) > 0.5
    h, w = f_img.shape
    m2 = (r @ m @ np.linalg.inv(r))[:2]
    w_img = cv2.warpAffine(m_img, m2, (w, h), flags=cv2.INTER_LINEAR)
    w_mask = cv2.warpAffine(m_mask.view(np.uint8), m2, (w, h), flags=cv2.INTER_NEAREST) > 0
    both = f_mask & w_mask
    smaller = min(int(f_mask.sum()), int(w_mask.sum()))
    if smaller == 0:
        return out
    out["overlap"] = float(both.sum() / smaller)
    ys, xs = np.nonzero(cv2.erode(both.view(np.uint8), np.ones((5, 5), np.uint8)))
    if len(ys) < 200:
        return out
    step = max(1, len(ys) // max_samples)
    ys, xs = ys[::step], xs[::step]
    d = shift * float(np.hypot(h, w))
    moves = [(dx * d, dy * d, 0.0) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    moves += [(0.0, 0.0, t) for t in ((-turn, turn) if turn else ())]
    cx, cy = xs.mean(), ys.mean()
    where = []  # each moved copy: the sample positions in the warped image and which of them are tissue
    for dx, dy, t in moves:
        c, sn = np.cos(np.radians(t)), np.sin(np.radians(t))
        xi = np.rint(cx + c * (xs - cx) - sn * (ys - cy) + dx).astype(int)
        yi = np.rint(cy + sn * (xs - cx) + c * (ys - cy) + dy).astype(int)
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        ok[ok] = w_mask[yi[ok], xi[ok]]
        if ok.sum() >= 200:
            where.append((xi, yi, ok))
    for sigma in scales:
        fb = _masked_band_pass(f_img, f_mask, sigma)[ys, xs]
        wb = _masked_band_pass(w_img, w_mask, sigma)
        qa = imaging.rank_bins(fb, bins)
        edges = imaging.rank_edges(wb[ys, xs], bins)
        mi = imaging.binned_mi(qa, np.searchsorted(edges, wb[ys, xs]), bins)
        moved = [imaging.binned_mi(qa[ok], np.searchsorted(edges, wb[yi[ok], xi[ok]]), bins)
                 for xi, yi, ok in where]
        best = max(moved, default=0.0)
        out[f"contrast_{sigma:g}"] = float(mi / best) if best > 0 else 0.0
    return out


def alignment_quality(fixed: Any, moving: Any, matrix: np.ndarray) -> float:
    """The harness's landmark-free quality of an alignment of ``moving`` onto ``fixed`` (two
    :class:`bench.method.ImageView` in the working frame; ``matrix`` moving -> fixed working pixels).

    The geometric mean over the band-pass scales of :func:`quality_terms`' contrasts (how many times more
    information the aligned images share than the same images moved by 5 % of the diagonal), times the
    overlap of the two tissues. 0 when nothing can be measured; about 1 or below when the alignment is no
    better than its moved copies; higher = better aligned. Below :data:`LIKELY_FAILED_BELOW`: likely failed.
    """
    t = quality_terms(fixed, moving, matrix)
    contrasts = [v for k, v in t.items() if k.startswith("contrast_")]
    if min(contrasts) <= 0:
        return 0.0
    return float(np.exp(np.mean(np.log(contrasts))) * t["overlap"])


# ---------------------------------------------------------------------------------------------
# how well the score predicts success (for reports and studies/quality_auc.py)

LIKELY_FAILED_BELOW = 1.0  # quality below this: "likely failed" (chosen on generated pairs, docs/quality.md)



def answer_quality(fixed: Any, moving: Any, matrix: np.ndarray, deformation: Any = None) -> float:
    """:func:`alignment_quality` of a method's answer: ``matrix`` (moving -> fixed working pixels) and, for a
    nonrigid answer, its :class:`bench.deformation.Deformation`, judged on the moving image it shows."""
    if deformation is None:
        return alignment_quality(fixed, moving, matrix)
    shown = imaging.deform_view(moving, matrix, deformation, fixed.shape)
    return alignment_quality(fixed, shown, np.eye(3))


ESTIMATE_REFINER = "affine-io"  # the registered method whose local re-alignment estimated_error measures
ESTIMATE_POINTS = 64  # tissue points per side of the grid the displacement is measured on


@functools.cache
def _refiner() -> Any:
    """The prepared :data:`ESTIMATE_REFINER`, one per process."""
    from bench import registry
    from bench.method import Context

    refiner = registry.get(ESTIMATE_REFINER)()
    refiner.prepare(Context())
    return refiner


def estimated_error(fixed: Any, moving: Any, matrix: np.ndarray) -> float:
    """A landmark-free estimate of an affine answer's error, as a fraction of the working diagonal (comparable
    with the median rTRE): the moving view warped by ``matrix`` (moving -> fixed working pixels) is aligned again
    to the fixed one by :data:`ESTIMATE_REFINER` (``affine-io`` with its defaults: a multi-level affine
    optimisation of the local NCC, started from the answer), and the estimate is the median distance by which
    that re-alignment moves the fixed tissue (a grid of :data:`ESTIMATE_POINTS` per side over its mask).

    An answer near the pair's best affine leaves the re-alignment little to move (about the refiner's own
    precision, 0.005 of the diagonal); an answer a few percent off is moved back by about its error, which is
    what separates successes from failures near the 0.035 threshold, where ``quality`` cannot (docs/quality.md:
    on generated and real sets, error_estimate > 0.035 flags 88-96 % of the failures and 0-1.3 % of the
    successes). A re-alignment that cannot improve the similarity returns the answer as it is: estimate 0 (an
    answer stuck in a wrong optimum can look right; ``quality`` still flags most of those). NaN when it cannot
    be measured (no tissue in either view, or the refiner fails). Computed on one torch thread, so a row's
    estimate is the same whatever the run's number of workers (torch's reductions differ by thread count).
    """
    from bench.geometry import apply, as_3x3
    from bench.method import Context

    warped = imaging.warp_view(moving, np.asarray(matrix, float), fixed.shape)
    if not fixed.mask.any() or not warped.mask.any():
        return float("nan")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread whatever the worker's: the same value in serial and parallel runs
    try:
        again = as_3x3(_refiner().estimate(fixed, warped, Context(seed=0)).matrix)
    except Exception:  # noqa: BLE001 - the refiner failing says nothing of the answer: no estimate, not a failed row
        return float("nan")
    finally:
        torch.set_num_threads(threads)
    h, w = fixed.shape
    step = max(1, max(h, w) // ESTIMATE_POINTS)
    ys, xs = np.nonzero(fixed.mask[::step, ::step])
    points = np.stack([xs, ys], axis=1).astype(float) * step
    moved = np.linalg.norm(apply(again, points) - points, axis=1)
    return float(np.median(moved) / np.hypot(h, w))


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``scores`` (higher = more likely positive) against boolean labels ``positive``.

    Returns ``(false_positive_rate, true_positive_rate, thresholds)``, from (0, 0) to (1, 1): the point at
    ``thresholds[i]`` counts the rows with ``score >= thresholds[i]`` as predicted positive. NaN scores are
    dropped.

    >>> fpr, tpr, th = roc_curve([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], int)  # ties together
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half), i.e. the Mann-Whitney U statistic / (n_pos n_neg); NaN when either class is empty.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    >>> roc_auc([1, 2], [True, True])
    nan
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
