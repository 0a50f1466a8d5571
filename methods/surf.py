"""``surf``: SURF keypoints on the preprocessed images, ratio-test matching, robust affine (MAGSAC++).

The paper's "SURF" row. OpenCV's SURF lives in the "nonfree" part of ``opencv-contrib`` that the PyPI
wheels leave out (``cv2.xfeatures2d.SURF_create`` raises there); when the installed OpenCV has it, it is
used, otherwise ``mahotas.features.surf`` (a full SURF: fast-Hessian detector, orientation, 64-D
descriptor). The backend that ran is recorded in the diagnostics (``backend``). Matching, robust estimation
and the failure checks are shared with ``sift`` (:mod:`bench.methods._features`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from bench.methods._features import (
    MatchParams,
    detection_factor,
    orientation_compatible,
    prepare_image,
    register_features,
    to_view,
)

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register


@dataclass(frozen=True)
class SurfParams(MatchParams):
    """SURF detector settings plus the shared matching parameters (:class:`MatchParams`)."""

    # SURF's box-filter scale space smooths already: a light pre-blur only (1.5, sift's, halved the inliers
    # of mahotas SURF on generated pairs scaled by 0.8; docs/classical.md)
    blur: float = 0.5
    # one match per fixed keypoint: SURF's weaker descriptors gave many-to-one matches that a collapsed affine
    # "explains" (docs/classical.md); on the hardest generated set 16/24 vs 15/24 successes
    one_to_one: bool = True
    backend: Literal["auto", "opencv", "mahotas"] = "auto"  # auto: OpenCV if it has SURF, else mahotas
    hessian_threshold: float = 100.0  # OpenCV: minimum Hessian response
    max_points: int = 5000  # mahotas: strongest N points per image (OpenCV: keep the strongest N)
    mahotas_threshold: float = 0.1  # mahotas: minimum interest-point strength (images in 0..255)
    n_octaves: int = 4
    n_scales: int = 6  # mahotas: scales per octave (OpenCV uses n_scales - 2 octave layers)
    max_turn: float = 30.0  # oriented keypoints: match only those turned by at most this, degrees (180 = off)
    same_polarity: bool = False  # match only keypoints with the same sign of the Laplacian (blob polarity)


def opencv_surf_available() -> bool:
    """True when the installed OpenCV build includes the nonfree SURF."""
    try:
        cv2.xfeatures2d.SURF_create(100.0)
    except (AttributeError, cv2.error):
        return False
    return True


def mahotas_available() -> bool:
    return importlib.util.find_spec("mahotas") is not None


def _in_mask(points: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(N,) bool: which (x, y) points fall inside a (H, W) uint8 mask (all, for no mask)."""
    if mask is None or len(points) == 0:
        return np.ones(len(points), bool)
    h, w = mask.shape
    xi = np.clip(np.rint(points[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(points[:, 1]).astype(int), 0, h - 1)
    return mask[yi, xi] > 0


def detect_surf_opencv(image: np.ndarray, mask: np.ndarray | None, p: SurfParams) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV SURF keypoints (N, 2) as (x, y) and 64-D descriptors (N, 64) of a (H, W) uint8 image."""
    pts, desc, _, _ = detect_surf_opencv_oriented(image, mask, p)
    return pts, desc


def detect_surf_opencv_oriented(image: np.ndarray, mask: np.ndarray | None,
                                p: SurfParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`detect_surf_opencv` plus orientations (N,) in degrees and Laplacian signs (N,) (class_id)."""
    surf = cv2.xfeatures2d.SURF_create(
        hessianThreshold=p.hessian_threshold,
        nOctaves=p.n_octaves,
        nOctaveLayers=max(1, p.n_scales - 2),
        upright=p.upright,
    )
    kps, desc = surf.detectAndCompute(image, mask)
    if desc is None or not kps:
        return np.empty((0, 2)), np.empty((0, 64), np.float32), np.empty(0), np.empty(0)
    order = np.argsort([-k.response for k in kps], kind="stable")[: p.max_points]
    return (np.array([kps[i].pt for i in order], dtype=np.float64), desc[order],
            np.array([kps[i].angle for i in order], dtype=np.float64),
            np.array([np.sign(kps[i].class_id) for i in order], dtype=np.float64))


def detect_surf_mahotas(image: np.ndarray, mask: np.ndarray | None, p: SurfParams) -> tuple[np.ndarray, np.ndarray]:
    """mahotas SURF keypoints (N, 2) as (x, y) and 64-D descriptors (N, 64) of a (H, W) uint8 image."""
    pts, desc, _, _ = detect_surf_mahotas_oriented(image, mask, p)
    return pts, desc


def upright_surf_descriptors(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """U-SURF descriptors (Bay et al. 2008, section 4.1 without the orientation step) of (N, 3) ``(y, x, s)``.

    Around each point, a ``20 s`` square split into 4 x 4 sub-regions of 5 x 5 samples spaced ``s``; at
    every sample the Haar wavelet responses ``dx``, ``dy`` of side ``2 s`` (box sums on an integral image),
    weighted by a Gaussian of ``3.3 s`` about the point; per sub-region ``sum dx, sum dy, sum |dx|,
    sum |dy|``; the 64-vector normalised to unit length. Samples outside the image read the border.
    mahotas has the detector but always orients its descriptors; this is the descriptor without that step,
    for images whose rotation the shared preprocessing has already removed.

    Returns
    -------
    (N, 64) float32 array
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = img.cumsum(0).cumsum(1)
    if len(points) == 0:
        return np.empty((0, 64), np.float32)
    y, x, sc = (np.asarray(points, np.float64)[:, k, None, None] for k in range(3))
    k = np.arange(20) - 9.5  # sample offsets in units of s
    # round half up (not to even), so that a shifted image gives the same samples
    ys = np.floor(y + k[None, :, None] * sc + 0.5).astype(np.int64)  # (N, 20, 1)
    xs = np.floor(x + k[None, None, :] * sc + 0.5).astype(np.int64)  # (N, 1, 20)
    half = np.maximum(1, np.floor(sc + 0.5)).astype(np.int64)  # Haar side 2 s

    def box(y0, x0, y1, x1):
        y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
        x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
        return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]

    dx = box(ys - half, xs, ys + half, xs + half) - box(ys - half, xs - half, ys + half, xs)
    dy = box(ys, xs - half, ys + half, xs + half) - box(ys - half, xs - half, ys, xs + half)
    g = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 3.3**2))[None]  # sigma 3.3 s, in units of s
    dx, dy = dx * g, dy * g
    n = len(points)
    parts = [a.reshape(n, 4, 5, 4, 5).sum(axis=(2, 4)) for a in (dx, dy, np.abs(dx), np.abs(dy))]
    desc = np.stack(parts, axis=-1).reshape(n, 64)
    norm = np.linalg.norm(desc, axis=1, keepdims=True)
    return (desc / np.maximum(norm, 1e-12)).astype(np.float32)


def detect_surf_mahotas_oriented(image: np.ndarray, mask: np.ndarray | None,
                                 p: SurfParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mahotas SURF keypoints (N, 2) as (x, y), 64-D descriptors (N, 64), orientations (N,) in degrees and
    Laplacian signs (N,).

    mahotas returns rows ``(y, x, scale, score, laplacian, angle, d0..d63)``; points outside the mask are
    dropped (mahotas has no detection mask; the background is flat, so it yields few points anyway).
    mahotas always orients its own descriptors: with ``p.upright`` its detector is used with
    :func:`upright_surf_descriptors` instead.
    """
    import mahotas.features.surf as msurf

    f = image.astype(np.float64)
    if p.upright:  # mahotas' detector, the U-SURF descriptor (upright_surf_descriptors)
        rows = msurf.interest_points(f, nr_octaves=p.n_octaves, nr_scales=p.n_scales,
                                     threshold=p.mahotas_threshold, max_points=p.max_points)
        if len(rows) == 0:
            return np.empty((0, 2)), np.empty((0, 64), np.float32), np.empty(0), np.empty(0)
        points = rows[:, [1, 0]].astype(np.float64)
        keep = _in_mask(points, mask)
        desc = upright_surf_descriptors(f, rows[keep][:, :3])
        return points[keep], desc, np.zeros(int(keep.sum())), np.sign(rows[keep, 4])
    rows = msurf.surf(f, nr_octaves=p.n_octaves, nr_scales=p.n_scales, threshold=p.mahotas_threshold,
                      max_points=p.max_points, descriptor_only=False)
    if len(rows) == 0:
        return np.empty((0, 2)), np.empty((0, 64), np.float32), np.empty(0), np.empty(0)
    points = rows[:, [1, 0]].astype(np.float64)
    keep = _in_mask(points, mask)
    return points[keep], rows[keep, 6:].astype(np.float32), np.degrees(rows[keep, 5]), np.sign(rows[keep, 4])


@register
class Surf(Method):
    name = "surf"
    version = "2"
    description = "SURF keypoints (OpenCV nonfree if built in, else mahotas), ratio test, MAGSAC++ affine."
    uses_preprocessing = True
    devices = ("cpu",)
    Params = SurfParams

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if mahotas_available() or opencv_surf_available():
            return None
        return "no SURF backend: OpenCV lacks nonfree SURF and mahotas is not installed"

    def backend(self) -> str:
        """The backend this instance will use: 'opencv' or 'mahotas'."""
        choice = self.params.backend
        if choice == "opencv" or (choice == "auto" and opencv_surf_available()):
            if not opencv_surf_available():
                raise RegistrationFailed("backend=opencv but this OpenCV build has no SURF (nonfree)")
            return "opencv"
        if not mahotas_available():
            raise RegistrationFailed("backend=mahotas but mahotas is not installed")
        return "mahotas"

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        p: SurfParams = self.params
        cv2.setRNGSeed(int(context.seed))
        backend = self.backend()
        detect = detect_surf_opencv_oriented if backend == "opencv" else detect_surf_mahotas_oriented
        factor = detection_factor((*fixed.shape, *moving.shape), p.detect_size)  # one factor for both
        img_f, mask_f = prepare_image(fixed.image, fixed.mask, p, factor)
        img_m, mask_m = prepare_image(moving.image, moving.mask, p, factor)
        kp_f, desc_f, ang_f, lap_f = detect(img_f, mask_f, p)
        kp_m, desc_m, ang_m, lap_m = detect(img_m, mask_m, p)
        kp_f, kp_m = to_view(kp_f, factor), to_view(kp_m, factor)
        if len(kp_f) < 3 or len(kp_m) < 3:
            raise RegistrationFailed(f"too few SURF keypoints (fixed {len(kp_f)}, moving {len(kp_m)}; {backend})")
        diagonal = float(np.hypot(*fixed.shape))
        extra = {"backend": backend, "upright": bool(p.upright)}
        compatible = None
        if p.max_turn < 180 and not p.upright:
            compatible = orientation_compatible(ang_m, ang_f, p.max_turn)
        if p.same_polarity:
            same = (lap_m[:, None] == lap_f[None, :]).astype(np.uint8)
            compatible = same if compatible is None else compatible & same
        return register_features(kp_m, desc_m, kp_f, desc_f, p, context.seed, diagonal, extra=extra,
                                 fixed_shape=fixed.shape, views=(fixed, moving), compatible=compatible)
