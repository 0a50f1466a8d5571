"""Basic image operations shared by the preprocessing, the quality score, composition and the conformance
checks.

* **warping** (:func:`warp` one array, :func:`warp_mask` a bool array, :func:`warp_view` every layer of an
  :class:`~bench.method.ImageView`): ``cv2.warpAffine`` by a (3, 3) or (2, 3) matrix that maps the array's
  pixels into a ``shape`` canvas (or, with ``inverse=True``, the canvas's pixels into the array's);
* **rank-binned mutual information** (:func:`rank_bins`, :func:`rank_edges`, :func:`binned_mi`,
  :func:`rank_mi`): each sample binned by its rank (equal-frequency bins), so any relation between two
  stains' intensities, monotonic or not, shows in the joint histogram;
* **the singular-matrix check** (:func:`matrix_defect`) and its limits, one per purpose.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from bench.method import ImageView

__all__ = [
    "CONTRACT_MIN_DET",
    "HARNESS_MIN_DET",
    "INVERTIBLE_MIN_DET",
    "binned_mi",
    "glass_colour",
    "matrix_defect",
    "rank_bins",
    "rank_edges",
    "rank_mi",
    "warp",
    "warp_mask",
    "warp_view",
    "deform_view",
]


# ---------------------------------------------------------------------------------------------
# warping


def warp(array: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], *, nearest: bool = False,
         border: float | tuple[float, ...] = 0, inverse: bool = False) -> np.ndarray:
    """``array`` warped by ``matrix`` (its pixels -> the canvas's) onto a ``shape`` ``(h, w)`` canvas.

    Bilinear, or nearest with ``nearest``; ``border`` (a value, or one per channel) outside the array.
    With ``inverse`` the matrix maps the canvas's pixels into the array's (``cv2.WARP_INVERSE_MAP``:
    OpenCV uses it as given instead of inverting it).
    """
    h, w = shape
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | (cv2.WARP_INVERSE_MAP if inverse else 0)
    return cv2.warpAffine(array, np.asarray(matrix, np.float64)[:2], (w, h), flags=flags, borderValue=border)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], *,
              inverse: bool = False) -> np.ndarray:
    """A bool mask warped like :func:`warp` (nearest, False outside); bool out."""
    m = np.asarray(mask)
    m = m.view(np.uint8) if m.dtype == bool else m.astype(np.uint8)
    return warp(m, matrix, shape, nearest=True, inverse=inverse) > 0


def glass_colour(view: ImageView) -> tuple[float, float, float]:
    """The median colour of ``view.rgb`` outside the tissue mask (every pixel when the mask covers all), from
    about 20000 samples; white when there is no pixel."""
    outside = view.rgb[~view.mask] if not view.mask.all() else view.rgb.reshape(-1, 3)
    glass = np.median(outside[:: max(1, len(outside) // 20000)], axis=0) if len(outside) else (255, 255, 255)
    return tuple(float(v) for v in glass)


def warp_view(view: ImageView, matrix: np.ndarray, shape: tuple[int, int], *,
              glass: float | tuple[float, ...] | None = None, inverse: bool = False) -> ImageView:
    """``view`` warped by ``matrix`` (its pixels -> the canvas's; with ``inverse`` the other way) onto a
    ``shape`` canvas.

    Image (as float32) and colour bilinear, the image 0 outside, the colour ``glass`` (None:
    :func:`glass_colour` of the view); mask and field of view nearest, nothing outside. The field of view is
    ``None`` when it covers everything (:class:`~bench.method.ImageView`'s convention).
    """
    image = warp(np.asarray(view.image, np.float32), matrix, shape, inverse=inverse)
    mask = warp_mask(view.mask, matrix, shape, inverse=inverse)
    rgb = None
    if view.rgb is not None:
        border = glass_colour(view) if glass is None else glass
        rgb = warp(view.rgb, matrix, shape, border=border, inverse=inverse)
    inside = np.ones(view.shape, bool) if view.valid is None else view.valid
    valid = warp_mask(inside, matrix, shape, inverse=inverse)
    return ImageView(image=image, mask=mask, rgb=rgb, valid=None if valid.all() else valid)


# ---------------------------------------------------------------------------------------------
# rank-binned mutual information


def rank_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """The ``bins - 1`` inner edges of equal-frequency bins of a (N,) sample (``np.quantile``, interpolated
    between samples)."""
    return np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])


def rank_bins(values: np.ndarray, bins: int, *, interpolate: bool = True) -> np.ndarray:
    """Equal-frequency bin index (0 .. bins - 1) of each value of a (N,) sample: a rank transform.

    ``interpolate=True``: edges by :func:`rank_edges`, a value equal to an edge goes to the lower bin.
    ``interpolate=False`` (faster): the edges are the samples of rank ``k N // bins``, found by one
    ``np.partition``, and a value equal to an edge goes to the upper bin. The two differ slightly.

    >>> rank_bins(np.arange(8.0), 4).tolist(), rank_bins(np.arange(8.0), 4, interpolate=False).tolist()
    ([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3])
    """
    if interpolate:
        return np.searchsorted(rank_edges(values, bins), values)
    kth = (np.arange(1, bins) * values.size) // bins
    edges = np.partition(values, kth)[kth]
    return np.searchsorted(edges, values, side="right")


def binned_mi(qa: np.ndarray, qb: np.ndarray, bins: int) -> float:
    """Mutual information (nats) of two (N,) bin-index samples (each in 0 .. bins - 1)."""
    joint = np.bincount(qa * bins + qb, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    joint /= max(joint.sum(), 1.0)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def rank_mi(a: np.ndarray, b: np.ndarray, bins: int, *, interpolate: bool = True) -> float:
    """Mutual information (nats) of two (N,) samples after rank binning of each (:func:`rank_bins`)."""
    qa, qb = (rank_bins(v, bins, interpolate=interpolate) for v in (a, b))
    return binned_mi(qa, qb, bins)


# ---------------------------------------------------------------------------------------------
# the singular-matrix check

# |det| of a matrix's linear part below which the matrix counts as singular. One limit per purpose:
HARNESS_MIN_DET = 1e-9  # bench.work: a method's answer (as returned, and in original pixels) is refused, the
# row fails instead of being scored; loose, so that only a real collapse is refused
CONTRACT_MIN_DET = 1e-6  # bench.conformance's returns_affine check: stricter, as its generated pair is small
# (about 450 px) and a sane answer on it has |det| near 1
INVERTIBLE_MIN_DET = 1e-12  # bench.quality.quality_terms: below, the score is 0 (only guards the inversion)


def matrix_defect(matrix: np.ndarray, min_det: float) -> str | None:
    """Why ``matrix`` is not a usable (3, 3) affine map, or None: ``"non-finite matrix"`` (not 3x3, or a NaN
    or infinite entry) or ``"singular matrix (determinant D)"`` (``|det|`` of the linear part not finite or
    below ``min_det``; the limits above).

    >>> matrix_defect(np.eye(3), HARNESS_MIN_DET) is None
    True
    >>> matrix_defect(np.diag([1e-5, 1e-5, 1]), HARNESS_MIN_DET)
    'singular matrix (determinant 1e-10)'
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        return "non-finite matrix"
    det = float(np.linalg.det(m[:2, :2]))
    if not math.isfinite(det) or abs(det) < min_det:
        return f"singular matrix (determinant {det:g})"
    return None


def deform_view(view: ImageView, matrix: np.ndarray, deformation, shape: tuple[int, int]) -> ImageView:
    """``view`` (a moving image) sampled onto the fixed working grid through ``matrix`` and a
    :class:`bench.deformation.Deformation` (``x -> matrix^-1 (x + u(x))``): what a nonrigid answer shows,
    e.g. for the quality score. Image bilinear (0 outside), mask and field of view nearest; no colour."""
    from bench.deformation import warp_image

    image = warp_image(np.asarray(view.image, np.float32), matrix, deformation, shape)
    mask = warp_image(view.mask, matrix, deformation, shape, interpolation=cv2.INTER_NEAREST)
    valid_src = np.ones(view.shape, bool) if view.valid is None else view.valid
    valid = warp_image(valid_src, matrix, deformation, shape, interpolation=cv2.INTER_NEAREST)
    return ImageView(image=image, mask=mask, rgb=None, valid=None if valid.all() else valid)
