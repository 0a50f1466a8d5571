"""Affine geometry in pixel coordinates.

Conventions used everywhere in the project:

* points are ``(x, y)`` = (column, row) in pixels, origin at the top-left corner, the centre of the
  top-left pixel at ``(0, 0)`` (ANHIR's landmark convention);
* a transform is a 3x3 homogeneous matrix ``T`` acting on column vectors ``(x, y, 1)``; a method's
  estimate maps **source (moving) points into the target (fixed) frame**;
* warping an image with ``T`` therefore samples the source at ``T^-1`` of each target pixel.
"""

from __future__ import annotations

import numpy as np


def as_3x3(matrix: np.ndarray) -> np.ndarray:
    """Return a float64 3x3 copy of a 2x3 or 3x3 affine matrix.

    >>> as_3x3(np.array([[1, 0, 5], [0, 1, 7]])).tolist()
    [[1.0, 0.0, 5.0], [0.0, 1.0, 7.0], [0.0, 0.0, 1.0]]
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3):
        raise ValueError(f"an affine matrix must be 2x3 or 3x3, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("affine matrix has non-finite entries")
    if not np.allclose(m[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"last row of an affine matrix must be (0, 0, 1), got {m[2].tolist()}")
    return m.copy()


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` points ``(x, y)`` by an affine matrix.

    >>> apply(translation(2, 3), np.array([[0.0, 0.0], [1.0, 1.0]])).tolist()
    [[2.0, 3.0], [3.0, 4.0]]
    """
    m = as_3x3(matrix)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:2, :2].T + m[:2, 2]


def translation(tx: float, ty: float) -> np.ndarray:
    """3x3 translation by ``(tx, ty)``."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    """3x3 scaling about the origin."""
    sy = sx if sy is None else sy
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def rotation(angle_deg: float, center: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` (counter-clockwise on screen, i.e. from +x towards -y) about ``center``.

    >>> np.round(apply(rotation(90), [[1.0, 0.0]]), 12).tolist()
    [[0.0, -1.0]]
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    r = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    cx, cy = center
    return translation(cx, cy) @ r @ translation(-cx, -cy)


def resample_matrix(scale_x: float, scale_y: float) -> np.ndarray:
    """Map original pixel coordinates to those of an image resized by ``(scale_x, scale_y)``.

    Uses pixel-centre alignment, as ``cv2.resize`` does: ``x' = (x + 0.5) * s - 0.5``.

    >>> apply(resample_matrix(0.5, 0.5), [[1.5, -0.5]]).tolist()
    [[0.5, -0.5]]
    """
    return translation(-0.5, -0.5) @ scaling(scale_x, scale_y) @ translation(0.5, 0.5)


def to_original(
    estimate: np.ndarray,
    *,
    source_scale: tuple[float, float],
    target_scale: tuple[float, float],
    source_pre: np.ndarray | None = None,
) -> np.ndarray:
    """Compose a working-frame estimate into one matrix in original pixel coordinates.

    ``source_pre`` is the transform the preprocessing already applied to the resampled source (the
    initial rotation, a flip); the estimate maps that pre-transformed source into the resampled target.
    The result maps original source pixels to original target pixels::

        T = R_t^-1 . estimate . source_pre . R_s
    """
    r_s = resample_matrix(*source_scale)
    r_t = resample_matrix(*target_scale)
    pre = np.eye(3) if source_pre is None else as_3x3(source_pre)
    return np.linalg.inv(r_t) @ as_3x3(estimate) @ pre @ r_s


def random_affine(
    rng: np.random.Generator,
    center: tuple[float, float],
    *,
    max_rotation_deg: float = 180.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_shear: float = 0.1,
    max_translation: float = 0.0,
) -> np.ndarray:
    """Draw a random affine (rotation, log-uniform isotropic scale, shear, translation) about ``center``."""
    angle = rng.uniform(-max_rotation_deg, max_rotation_deg)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    s = np.exp(rng.uniform(lo, hi))
    aniso = np.exp(rng.uniform(-max_shear, max_shear) / 2)
    shear = rng.uniform(-max_shear, max_shear)
    linear = np.array([[s * aniso, s * shear, 0.0], [0.0, s / aniso, 0.0], [0.0, 0.0, 1.0]])
    tx, ty = rng.uniform(-max_translation, max_translation, size=2)
    cx, cy = center
    return translation(cx + tx, cy + ty) @ rotation(angle) @ linear @ translation(-cx, -cy)
