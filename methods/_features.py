"""Shared machinery of the feature-based methods (``sift``, ``surf``): detector-agnostic matching,
robust affine estimation and the checks that turn a wild answer into a reported failure.

A detector backend only has to produce keypoint positions ``(N, 2)`` as ``(x, y)`` working-frame pixels and
descriptors ``(N, D)`` for each image; :func:`register_features` does the rest:

1. ratio-test matching of moving descriptors against fixed ones (brute force, L2, k = 2; optionally only
   mutual nearest neighbours);
2. robust affine estimation moving -> fixed with OpenCV's ``estimateAffine2D`` (USAC MAGSAC++ or RANSAC,
   then Levenberg-Marquardt refinement on the inliers);
3. guided matching: descriptors matched again, each only near where the first fit puts it, and the fit
   repeated (kept when it has more inliers);
4. refusal, with the reason, of too few inliers, inliers that chance would explain (an a-contrario number of
   false alarms, :func:`nfa`), a degenerate matrix (scale outside a range, strong anisotropy / shear, a
   reflection), or an alignment after which the images share no structure (the shared checks of
   :func:`bench.quality.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from scipy.special import gammaln

from bench import Estimate, RegistrationFailed
from bench.quality import AcceptanceParams, accept, matrix_problem

_ESTIMATORS = {"magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}


@dataclass(frozen=True)
class MatchParams(AcceptanceParams):
    """Parameters shared by every feature-based method (matching, estimation); the failure checks'
    ``min_scale``, ``max_scale``, ``max_anisotropy``, ``min_evidence`` and ``evidence_sigma`` come from
    :class:`bench.quality.AcceptanceParams`."""

    ratio: float = 0.9  # Lowe's ratio test among the gated candidates: keep a match if d1 < ratio * d2
    mutual: bool = False  # keep only mutual nearest neighbours as well
    one_to_one: bool = False  # a fixed keypoint keeps only its closest match (against collapsed fits)
    estimator: Literal["magsac", "ransac"] = "magsac"
    reproj_threshold: float = 5.0  # inlier threshold, working-frame pixels
    max_iters: int = 10000
    confidence: float = 0.999
    refine_iters: int = 10  # Levenberg-Marquardt refinement on the inliers
    min_inliers: int = 8  # fewer inliers than this: RegistrationFailed (the NFA test is the main one)
    min_inlier_ratio: float = 0.0  # inliers / ratio-test matches below this: RegistrationFailed (0 = off)
    max_nfa: float = 1e-3  # a-contrario test: expected number of random models this good (see nfa)
    guided_gate: float = 0.02  # re-match within this x fixed diagonal of the first fit's prediction; 0 = off
    blur: float = 1.5  # Gaussian sigma (pixels of the detection image) before detection; 0 = none
    upright: bool = True  # no orientation assignment (the preprocessing already fixed the rotation)
    clahe_clip: float = 2.0  # CLAHE clip limit on the uint8 images before detection; 0 = off
    clahe_tiles: int = 8  # CLAHE tile grid (tiles x tiles)
    mask_dilation: int = 15  # tissue mask dilated by this many pixels for detection; -1 = no mask
    gate: float = 0.1  # match only within gate x fixed diagonal of the pre-aligned position; 0 = anywhere
    detect_size: int = 512  # shrink so the longer side is at most this before detection; 0 = as given


def to_uint8(image: np.ndarray, clahe_clip: float = 0.0, clahe_tiles: int = 8) -> np.ndarray:
    """Convert a float image in [0, 1] to uint8, optionally with CLAHE.

    Parameters
    ----------
    image : (H, W) float array in [0, 1]
    clahe_clip : float
        CLAHE clip limit; 0 leaves the contrast unchanged.
    clahe_tiles : int
        CLAHE tile grid size.

    Returns
    -------
    (H, W) uint8 array
    """
    u8 = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if clahe_clip > 0:
        u8 = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(clahe_tiles, clahe_tiles)).apply(u8)
    return u8


def detection_mask(mask: np.ndarray, dilation: int) -> np.ndarray | None:
    """Tissue mask dilated by ``dilation`` pixels, as OpenCV wants it ((H, W) uint8 0/255), or None.

    ``dilation < 0`` or an all-True mask gives None (detect everywhere). An empty mask raises
    :class:`RegistrationFailed`: there is nothing to register.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise RegistrationFailed("empty tissue mask: no tissue to detect features on")
    if dilation < 0 or mask.all():
        return None
    m = mask.astype(np.uint8) * 255
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        m = cv2.dilate(m, kernel)
    return m


def detection_factor(shape: tuple[int, int], detect_size: int) -> float:
    """Resampling factor that brings the longer side of ``shape`` down to ``detect_size`` (never up).

    >>> detection_factor((1024, 800), 512), detection_factor((300, 400), 512), detection_factor((9, 9), 0)
    (0.5, 1.0, 1.0)
    """
    return 1.0 if detect_size <= 0 else min(1.0, detect_size / max(shape))


def prepare_image(
    view_image: np.ndarray, view_mask: np.ndarray, p: MatchParams, factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint8 image (resampled by ``factor``, CLAHE as configured) and its uint8 detection mask or None.

    Parameters
    ----------
    view_image : (H, W) float array in [0, 1]
    view_mask : (H, W) bool array
    p : MatchParams
    factor : float
        Resampling factor (then ``p.blur``, then CLAHE); area interpolation when shrinking); keypoints found at ``x`` lie at
        ``(x + 0.5) / factor - 0.5`` in the view (:func:`to_view`).

    Returns
    -------
    image : (h, w) uint8 array
    mask : (h, w) uint8 array (0 / 255) or None
    """
    img = np.asarray(view_image, dtype=np.float32)
    mask = np.asarray(view_mask, dtype=bool)
    if factor != 1.0:
        h, w = img.shape
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, size, interpolation=interp)
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    if p.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), p.blur)
    return to_uint8(img, p.clahe_clip, p.clahe_tiles), detection_mask(mask, p.mask_dilation)


def to_view(points: np.ndarray, factor: float) -> np.ndarray:
    """Map (N, 2) (x, y) points found in an image resampled by ``factor`` back to the view's pixels.

    >>> to_view(np.array([[0.5, 1.5]]), 0.5).tolist()
    [[1.5, 3.5]]
    """
    return (np.asarray(points, dtype=np.float64) + 0.5) / factor - 0.5


def gate_mask(pts_moving: np.ndarray, pts_fixed: np.ndarray, radius: float) -> np.ndarray | None:
    """Which (moving, fixed) keypoint pairs lie within ``radius`` pixels of each other, or None (no gate).

    The shared preprocessing already put the moving image onto the fixed one (centres of mass, rotation),
    so a correspondence is searched only near where that pre-alignment puts it.

    Returns
    -------
    (N, M) uint8 array (1 = allowed) for ``radius > 0``, else None
    """
    if radius <= 0:
        return None
    out = np.empty((len(pts_moving), len(pts_fixed)), np.uint8)
    for i in range(0, len(pts_moving), 512):  # in blocks: N x M float64 distances could be large
        d2 = ((pts_moving[i : i + 512, None, :] - pts_fixed[None, :, :]) ** 2).sum(-1)
        out[i : i + 512] = d2 <= radius * radius
    return out


def match_descriptors(
    desc_moving: np.ndarray,
    desc_fixed: np.ndarray,
    ratio: float,
    mutual: bool,
    allowed: np.ndarray | None = None,
    one_to_one: bool = False,
) -> np.ndarray:
    """Ratio-test matches of moving descriptors to fixed ones.

    Parameters
    ----------
    desc_moving : (N, D) float array
    desc_fixed : (M, D) float array
    ratio : float
        Lowe's ratio: keep a match when its distance is below ``ratio`` times the second best (among the
        allowed candidates; a single allowed candidate is kept only for ``ratio >= 1``).
    mutual : bool
        Also require the fixed descriptor's nearest (allowed) moving descriptor to be the same one.
    allowed : (N, M) uint8 array, optional
        Candidate mask (:func:`gate_mask`); None allows every pair.
    one_to_one : bool
        Keep at most one match per fixed keypoint (the closest). Many moving keypoints matched to one fixed
        keypoint let a collapsed affine (everything mapped near one point) collect many "inliers".

    Returns
    -------
    (K, 2) int array of (moving index, fixed index)
    """
    dm = np.ascontiguousarray(desc_moving, dtype=np.float32)
    df = np.ascontiguousarray(desc_fixed, dtype=np.float32)
    if len(dm) < 2 or len(df) < 2:
        return np.empty((0, 2), dtype=int)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(dm, df, k=2, mask=allowed) if allowed is not None else matcher.knnMatch(dm, df, k=2)
    pairs, dist = [], []
    for k in knn:
        if (len(k) == 2 and k[0].distance < ratio * k[1].distance) or (len(k) == 1 and ratio >= 1):
            pairs.append((k[0].queryIdx, k[0].trainIdx))
            dist.append(k[0].distance)
    idx = np.array(pairs, dtype=int).reshape(-1, 2)
    if one_to_one and len(idx):  # a fixed keypoint keeps only its closest moving match
        order = np.argsort(np.asarray(dist), kind="stable")
        _, first = np.unique(idx[order, 1], return_index=True)
        idx = idx[np.sort(order[first])]
    if mutual and len(idx):
        mask_t = None if allowed is None else np.ascontiguousarray(allowed.T)
        back_knn = matcher.knnMatch(df, dm, k=1, mask=mask_t) if mask_t is not None else matcher.knnMatch(df, dm, k=1)
        back = np.full(len(df), -1)
        for k in back_knn:
            if k:
                back[k[0].queryIdx] = k[0].trainIdx
        idx = idx[back[idx[:, 1]] == idx[:, 0]]
    return idx


def estimate_affine(
    pts_moving: np.ndarray, pts_fixed: np.ndarray, p: MatchParams, seed: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """Robust affine moving -> fixed from matched points.

    Parameters
    ----------
    pts_moving, pts_fixed : (K, 2) float arrays of (x, y)
    p : MatchParams
    seed : int
        Seeds OpenCV's random generator (RANSAC sampling).

    Returns
    -------
    matrix : (2, 3) float array or None when no model was found
    inliers : (K,) bool array
    """
    cv2.setRNGSeed(int(seed))
    matrix, inl = cv2.estimateAffine2D(
        np.ascontiguousarray(pts_moving, dtype=np.float32).reshape(-1, 1, 2),
        np.ascontiguousarray(pts_fixed, dtype=np.float32).reshape(-1, 1, 2),
        method=_ESTIMATORS[p.estimator],
        ransacReprojThreshold=p.reproj_threshold,
        maxIters=p.max_iters,
        confidence=p.confidence,
        refineIters=p.refine_iters,
    )
    inliers = np.zeros(len(pts_moving), bool) if inl is None else inl.ravel().astype(bool)
    return matrix, inliers


def nfa(n_matches: int, n_inliers: int, radius: float, area: float, n_tests: int) -> float:
    """Number of false alarms of a robust fit (a-contrario): how many models this good chance would give.

    Under the null hypothesis the ``n_matches`` matched fixed points fall uniformly in the ``area`` they
    were searched in (the gate disc), so each lands within ``radius`` of a model's prediction with
    probability ``q = pi radius^2 / area``; the chance of ``n_inliers`` or more is the binomial tail,
    multiplied by the ``n_tests`` models tried (the robust estimator's iterations). A value far below 1
    means the inliers cannot be a coincidence, whatever the inlier ratio; unlike a fixed ratio, the test
    needs no tuning to a stain or a dataset.

    >>> nfa(500, 40, 5.0, np.pi * 130.0**2, 10000) < 1e-6, nfa(500, 3, 5.0, np.pi * 130.0**2, 10000) > 1
    (True, True)
    """
    q = min(1.0, np.pi * radius * radius / max(area, 1e-9))
    if n_inliers <= 0 or q >= 1.0:
        return float(n_tests)
    k = np.arange(n_inliers, n_matches + 1)
    logs = (gammaln(n_matches + 1) - gammaln(k + 1) - gammaln(n_matches - k + 1)
            + k * np.log(q) + (n_matches - k) * np.log1p(-q))
    tail = float(np.exp(np.logaddexp.reduce(logs))) if len(k) else 0.0
    return float(n_tests) * tail


def orientation_compatible(angles_moving: np.ndarray, angles_fixed: np.ndarray, max_turn: float) -> np.ndarray:
    """(N, M) uint8: 1 where two keypoint orientations (degrees) differ by at most ``max_turn`` degrees.

    The shared preprocessing already removed the rotation between the images, so a correct match keeps its
    orientation (up to the noise of the orientation estimate).

    >>> orientation_compatible(np.array([0.0, 170.0]), np.array([10.0, -175.0]), 30).tolist()
    [[1, 0], [0, 1]]
    """
    turn = np.abs((np.asarray(angles_moving, float)[:, None] - np.asarray(angles_fixed, float)[None, :] + 180) % 360
                  - 180)
    return (turn <= max_turn).astype(np.uint8)


def register_features(
    kp_moving: np.ndarray,
    desc_moving: np.ndarray,
    kp_fixed: np.ndarray,
    desc_fixed: np.ndarray,
    p: MatchParams,
    seed: int,
    diagonal: float,
    extra: dict[str, Any] | None = None,
    fixed_shape: tuple[int, int] | None = None,
    views: tuple[Any, Any] | None = None,
    compatible: np.ndarray | None = None,
) -> Estimate:
    """Match, estimate and check: the whole feature-based registration after detection.

    Parameters
    ----------
    kp_moving : (N, 2) float array of (x, y) keypoints in the moving image
    desc_moving : (N, D) descriptors
    kp_fixed : (M, 2) float array of (x, y) keypoints in the fixed image
    desc_fixed : (M, D) descriptors
    p : MatchParams
    seed : int
    diagonal : float
        Diagonal of the fixed image, pixels (``p.gate`` is a fraction of it).
    extra : dict, optional
        Diagnostics to add (backend name ...); also attached to a failure's message.
    fixed_shape : (H, W), optional
        Shape of the fixed image: the search area of the a-contrario test when there is no gate (default:
        the fixed keypoints' bounding box).
    views : (fixed ImageView, moving ImageView), optional
        For the final check that the aligned images share structure (:func:`bench.quality.accept`).
    compatible : (N, M) uint8 array, optional
        1 where a moving and a fixed keypoint may be matched at all (e.g. :func:`orientation_compatible`);
        combined with the position gate.

    Returns
    -------
    Estimate
        Moving -> fixed matrix; diagnostics ``keypoints_moving``, ``keypoints_fixed``, ``matches``,
        ``inliers``, ``inlier_ratio``, ``log10_nfa``, the guided search's counts, the evidence, plus ``extra``.

    Raises
    ------
    RegistrationFailed
        Too few keypoints, matches or inliers, inliers that chance explains (NFA), a degenerate matrix, or
        aligned images that share no structure.
    """
    diag: dict[str, Any] = dict(extra or {})
    diag.update(keypoints_moving=int(len(kp_moving)), keypoints_fixed=int(len(kp_fixed)))
    kp_m = np.asarray(kp_moving, dtype=np.float64)
    kp_f = np.asarray(kp_fixed, dtype=np.float64)
    radius = p.gate * diagonal
    allowed = gate_mask(kp_m, kp_f, radius)
    if compatible is not None:  # detector-specific pairing rules (orientation, blob polarity ...)
        allowed = compatible if allowed is None else allowed & compatible
    idx = match_descriptors(desc_moving, desc_fixed, p.ratio, p.mutual, allowed, p.one_to_one)
    diag["matches"] = int(len(idx))

    def fail(reason: str) -> RegistrationFailed:
        return RegistrationFailed(f"{reason} ({', '.join(f'{k}={v}' for k, v in diag.items())})")

    if len(idx) < max(3, p.min_inliers):
        raise fail(f"too few matches: {len(idx)} < {max(3, p.min_inliers)}")
    matrix, inliers = estimate_affine(kp_m[idx[:, 0]], kp_f[idx[:, 1]], p, seed)
    if matrix is None or not np.all(np.isfinite(matrix)):
        raise fail("robust estimation found no affine model")
    n_in = int(inliers.sum())
    if radius > 0:
        area = np.pi * radius * radius
    elif fixed_shape is not None:
        area = float(fixed_shape[0] * fixed_shape[1])
    else:  # the fixed keypoints' bounding box
        area = float(np.prod(np.ptp(kp_f, axis=0) + 1.0))
    diag.update(inliers=n_in, inlier_ratio=round(n_in / len(idx), 4),
                log10_nfa=round(float(np.log10(max(nfa(len(idx), n_in, p.reproj_threshold, area, p.max_iters),
                                                    1e-300))), 2))
    log_nfa = diag["log10_nfa"]

    def usable(m: np.ndarray | None, inliers: int, log10_nfa: float) -> str | None:
        """Why a fit cannot be the answer, or None."""
        if m is None or not np.all(np.isfinite(m)):
            return "robust estimation found no affine model"
        if inliers < p.min_inliers:
            return f"too few inliers: {inliers} < {p.min_inliers}"
        if 10.0**log10_nfa > p.max_nfa:
            return f"inliers could be chance: NFA 10^{log10_nfa} > {p.max_nfa}"
        return matrix_problem(m, p.min_scale, p.max_scale, p.max_anisotropy)

    first_problem = usable(matrix, n_in, log_nfa)
    if first_problem is None and diag["inliers"] / len(idx) < p.min_inlier_ratio:
        first_problem = f"inlier ratio {diag['inliers'] / len(idx):.3f} < {p.min_inlier_ratio}"
    guided_problem = "guided matching off"
    if p.guided_gate > 0 and n_in >= 3:
        # guided matching: search again, only near where the first fit puts each moving keypoint. After an
        # accepted first fit the guided fit refines it when it explains more matches; after a refused one it
        # may rescue it, but only if its own NFA test (in the small guided discs, where chance agreement is
        # far likelier) passes: true near a right first fit, false around a wrong one.
        g_radius = p.guided_gate * diagonal
        predicted = cv2.transform(kp_m.reshape(-1, 1, 2), matrix).reshape(-1, 2)
        g_allowed = gate_mask(predicted, kp_f, g_radius)
        if compatible is not None:
            g_allowed &= compatible
        g_idx = match_descriptors(desc_moving, desc_fixed, p.ratio, p.mutual, g_allowed, p.one_to_one)
        if len(g_idx) >= 3:
            g_matrix, g_inliers = estimate_affine(kp_m[g_idx[:, 0]], kp_f[g_idx[:, 1]], p, seed)
            g_in = int(g_inliers.sum())
            g_nfa = nfa(len(g_idx), g_in, p.reproj_threshold, np.pi * g_radius * g_radius, p.max_iters)
            g_log = round(float(np.log10(max(g_nfa, 1e-300))), 2)
            diag.update(guided_matches=int(len(g_idx)), guided_inliers=g_in, guided_log10_nfa=g_log)
            if first_problem is None:  # a refinement of an accepted fit: taken when it explains more matches
                guided_problem = usable(g_matrix, g_in, -np.inf)
                if guided_problem is None and g_in <= n_in:
                    guided_problem = "no more inliers than the first fit"
            else:  # a rescue of a refused fit: only on its own strong evidence
                guided_problem = usable(g_matrix, g_in, g_log)
            if guided_problem is None:
                matrix = g_matrix
    diag["guided"] = guided_problem is None
    if guided_problem is not None and first_problem is not None:
        raise fail(first_problem)  # else the guided fit, or the first one when the guided search failed
    if views is not None:  # the shared checks (the matrix passed matrix_problem above; the evidence here)
        try:
            diag.update(accept(views[0], views[1], matrix, p))
        except RegistrationFailed as exc:
            raise fail(str(exc)) from None
    return Estimate(matrix, diag)
