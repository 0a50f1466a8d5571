"""Landmark-free checks of a finished alignment, the same for every method.

``matrix_problem`` says why an affine matrix is degenerate; ``alignment_evidence`` measures how much more two
aligned images share than the same images slightly shifted; ``alignment_quality`` is the ``quality`` column
the harness writes on every ``ok`` row (higher = better aligned; docs/quality.md).

The acceptance checks the methods share (sift, surf, iterative, elastix) live here too, declared once:
:class:`AcceptanceParams` (a method's ``Params`` inherits it, so ``--set sift.min_evidence=1.1`` works and
``run.json`` stays flat) and :func:`accept`, which raises :class:`bench.RegistrationFailed` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

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


def _rank_mi(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """Mutual information (nats) of two (N,) samples after equal-frequency (rank) binning of each."""
    qa = np.searchsorted(np.quantile(a, np.linspace(0, 1, bins + 1)[1:-1]), a)
    qb = np.searchsorted(np.quantile(b, np.linspace(0, 1, bins + 1)[1:-1]), b)
    joint = np.bincount(qa * bins + qb, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


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
    mi = _rank_mi(f, warped[ys, xs], bins)
    shifts = [(dx, dy) for dx in (-d, 0, d) for dy in (-d, 0, d) if dx or dy]
    mi_shifted = max(_rank_mi(f, warped[ys + dy, xs + dx], bins) for dx, dy in shifts)
    return {"mi": mi, "mi_shifted": mi_shifted, "contrast": mi / mi_shifted if mi_shifted > 0 else 0.0}


def alignment_quality(fixed, moving, matrix: np.ndarray, sigma: float = 4.0) -> float:
    """The harness's landmark-free quality of an alignment of ``moving`` onto ``fixed`` (two
    :class:`bench.method.ImageView` in the working frame; ``matrix`` moving -> fixed working pixels):
    the band-pass mutual-information contrast of :func:`alignment_evidence` (0 when the common tissue is too
    small; about 1 when the images share nothing; higher = better aligned)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] == 2:
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        return 0.0
    ev = alignment_evidence(fixed.image, fixed.mask, moving.image, moving.mask, m, sigma)
    return float(ev["contrast"])
