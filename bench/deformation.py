"""Nonrigid results: a dense displacement field in the fixed working frame, and what the harness does with it.

A method may answer with an affine ``matrix`` *and* a :class:`Deformation` (``Estimate.deformation``). The
pair means, for every point ``x`` of the **fixed (target) working frame**::

    T(x) = M^-1 (x + u(x))          the moving (source) working point that corresponds to x

where ``M`` is the estimate's 3x3 matrix (moving working -> fixed working, as for every affine method) and
``u`` the displacement, interpolated bilinearly from :attr:`Deformation.field` (clamped at the border). With
``u = 0`` this is exactly the affine meaning. Warping the moving image onto the fixed grid samples it at
``T(x)`` (:func:`warp_image`); moving a source landmark ``p`` into the target frame (ANHIR's direction)
needs the inverse, the fixed point ``x`` with ``T(x) = p`` (:func:`warp_points`).

The field grid
    ``field`` is ``(h, w, 2)`` float32, ``(ux, uy)`` in **fixed working-frame pixels**, sampled on a grid
    that covers the fixed working image of shape ``shape = (H, W)`` with the ``cv2.resize`` pixel-centre
    convention: field pixel ``(j, i)`` (column, row) sits at the working point::

        x = (j + 0.5) * W / w - 0.5,    y = (i + 0.5) * H / h - 0.5

    so a field computed on images resized by ``cv2.resize`` to ``(w, h)`` relates exactly, and
    ``cv2.resize(field, (W, H), interpolation=cv2.INTER_LINEAR)`` is ``u`` at every working pixel.

Points follow :mod:`bench.geometry`: ``(x, y)`` = (column, row), the centre of the top-left pixel at
``(0, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from bench.geometry import as_3x3

MAX_FOLDING = 0.01  # share of the field with a non-positive Jacobian determinant that check() tolerates


# contract checks (bench.conformance) every nonrigid stage fails by design: it refines the alignment it is given
# locally, so the checks that start from a moved image measure the start, not the stage (its own known_limits)
LOCAL_REFINEMENT_LIMITS = {
    "recovers_translation": "a local refinement: it starts from the given alignment and moves little",
    "recovers_rotation": "a local refinement: it starts from the given alignment and moves little",
    "recovers_known_transform": "a local refinement: scale and shear are left to the initial method",
}

@dataclass(frozen=True)
class Deformation:
    """A dense displacement field ``u`` on the fixed working frame (see the module docstring).

    Attributes
    ----------
    field : (h, w, 2) float32 array
        ``(ux, uy)`` in fixed working-frame pixels at the grid points ``x = (j + 0.5) * W / w - 0.5``,
        ``y = (i + 0.5) * H / h - 0.5``. Any ``(h, w)``: the full working size or a reduced one.
    shape : (H, W)
        Shape of the fixed working image the grid covers.

    The constructor converts ``field`` to a float32 array and ``shape`` to a tuple of two ints; it does not
    judge them (:func:`check` does, with a one-line problem).

    >>> d = Deformation(np.zeros((4, 8, 2)), (40, 80))
    >>> d.grid_shape, d.shape, d.field.dtype
    ((4, 8), (40, 80), dtype('float32'))
    """

    field: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", np.asarray(self.field, dtype=np.float32))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the field grid."""
        return self.field.shape[:2]

    @classmethod
    def zeros(cls, shape: tuple[int, int], grid_shape: tuple[int, int] | None = None) -> Deformation:
        """The zero displacement on a grid of ``grid_shape`` (default: ``shape``) covering ``shape``."""
        h, w = shape if grid_shape is None else grid_shape
        return cls(np.zeros((int(h), int(w), 2), np.float32), shape)

    def grid_points(self) -> np.ndarray:
        """``(h, w, 2)`` float64 working-frame ``(x, y)`` of every field grid point.

        >>> Deformation.zeros((4, 4), (2, 2)).grid_points()[..., 0].tolist()
        [[0.5, 2.5], [0.5, 2.5]]
        """
        h, w = self.grid_shape
        big_h, big_w = self.shape
        xs = (np.arange(w) + 0.5) * big_w / w - 0.5
        ys = (np.arange(h) + 0.5) * big_h / h - 0.5
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx, gy], axis=-1)

    def at(self, points: np.ndarray) -> np.ndarray:
        """The displacement ``u`` at fixed working points, bilinear, clamped at the grid's border.

        Parameters
        ----------
        points : (N, 2) array
            Fixed working-frame ``(x, y)``.

        Returns
        -------
        (N, 2) float64 array
            ``(ux, uy)`` in working pixels.

        >>> f = np.zeros((2, 2, 2)); f[:, 1, 0] = 4.0     # ux = 0 on the left column, 4 on the right
        >>> Deformation(f, (4, 4)).at([[0.5, 0.0], [1.5, 0.0], [9.0, 9.0]])[:, 0].tolist()
        [0.0, 2.0, 4.0]
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        h, w = self.grid_shape
        big_h, big_w = self.shape
        gx = np.clip((pts[:, 0] + 0.5) * w / big_w - 0.5, 0.0, w - 1.0)
        gy = np.clip((pts[:, 1] + 0.5) * h / big_h - 0.5, 0.0, h - 1.0)
        x0 = np.minimum(np.floor(gx).astype(np.int64), max(w - 2, 0))
        y0 = np.minimum(np.floor(gy).astype(np.int64), max(h - 2, 0))
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]
        f = self.field.astype(np.float64)
        top = f[y0, x0] * (1 - fx) + f[y0, x1] * fx
        bottom = f[y1, x0] * (1 - fx) + f[y1, x1] * fx
        return top * (1 - fy) + bottom * fy

    def dense(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """``u`` at every pixel of a grid covering the working image: ``(H, W, 2)`` float32 by default
        (``shape`` another grid's ``(h, w)``); ``cv2.resize`` bilinear, which is :meth:`at` exactly."""
        h, w = self.shape if shape is None else shape
        if (h, w) == self.grid_shape:
            return self.field.copy()
        return cv2.resize(self.field, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)

    def resampled(self, grid_shape: tuple[int, int]) -> Deformation:
        """The same displacement on another grid ``(h, w)`` covering the same working image."""
        return Deformation(self.dense(grid_shape), self.shape)


def _fixed_to_moving(matrix: np.ndarray | None, deformation: Deformation | None, points: np.ndarray) -> np.ndarray:
    """``T(x) = M^-1 (x + u(x))`` for ``(N, 2)`` fixed working points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    y = pts if deformation is None else pts + deformation.at(pts)
    m_inv = np.linalg.inv(np.eye(3) if matrix is None else as_3x3(matrix))
    return y @ m_inv[:2, :2].T + m_inv[:2, 2]


def fixed_to_moving(matrix: np.ndarray | None, deformation: Deformation | None, points: np.ndarray) -> np.ndarray:
    """The forward map ``T``: fixed working points ``(N, 2)`` -> the moving working points ``(N, 2)``
    that correspond (``matrix`` None: the identity; ``deformation`` None: ``u = 0``).

    >>> fixed_to_moving(np.diag([2.0, 2.0, 1.0]), None, [[4.0, 6.0]]).tolist()
    [[2.0, 3.0]]
    """
    return _fixed_to_moving(matrix, deformation, points)


def warp_points(matrix: np.ndarray | None, deformation: Deformation | None, moving_points: np.ndarray, *,
                iterations: int = 100, tol: float = 1e-4, return_residual: bool = False,
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Moving (source) working points into the fixed (target) working frame: ANHIR's landmark direction.

    For each moving point ``p`` finds the fixed point ``x`` with ``T(x) = p``, i.e. ``x + u(x) = M p``, by
    the fixed-point iteration ``x <- M p - u(x)`` started at ``M p``. The iteration converges wherever ``u``
    changes by less than a pixel per pixel; where a step would increase a point's residual
    ``|x + u(x) - M p|`` that point's step is halved instead (a damped iteration, which also converges for
    steeper, still non-folding fields). With ``deformation`` None (or zero) the answer is ``M p`` exactly.

    Parameters
    ----------
    matrix : (3, 3) or (2, 3) array or None
        The estimate's affine, moving working -> fixed working (None: identity).
    deformation : Deformation or None
    moving_points : (N, 2) array
        Moving working-frame ``(x, y)``.
    iterations : int
        Maximum number of iterations.
    tol : float
        Stop when every residual is below this, fixed working pixels.
    return_residual : bool
        Also return the final residual of each point.

    Returns
    -------
    points : (N, 2) float64 array
        Fixed working-frame ``(x, y)``.
    residual : (N,) float64 array, only with ``return_residual``
        ``|x + u(x) - M p|`` in fixed working pixels.

    Non-convergence does not raise: the best iterate of every point is returned. Where the map folds, a
    point may have several pre-images or none; the residual says how far the answer is from one (the
    harness should judge a deformation by :func:`check` first, and may flag residuals above ``tol``).

    >>> f = np.zeros((1, 1, 2)); f[..., 0] = 3.0                 # u = (3, 0) everywhere
    >>> warp_points(None, Deformation(f, (10, 10)), [[5.0, 5.0]]).tolist()
    [[2.0, 5.0]]
    """
    m = np.eye(3) if matrix is None else as_3x3(matrix)
    p = np.asarray(moving_points, dtype=np.float64).reshape(-1, 2)
    target = p @ m[:2, :2].T + m[:2, 2]
    if deformation is None or len(target) == 0:
        return (target, np.zeros(len(target))) if return_residual else target
    x = target - deformation.at(target)
    step = np.ones(len(x))
    residual = np.linalg.norm(x + deformation.at(x) - target, axis=1)
    for _ in range(int(iterations)):
        if not np.any(residual > tol):
            break
        r = x + deformation.at(x) - target
        trial = x - step[:, None] * r
        new_res = np.linalg.norm(trial + deformation.at(trial) - target, axis=1)
        better = new_res < residual
        x = np.where(better[:, None], trial, x)
        residual = np.where(better, new_res, residual)
        step = np.where(better, np.minimum(1.0, step * 1.5), step * 0.5)
    return (x, residual) if return_residual else x


def jacobian_determinant(deformation: Deformation) -> np.ndarray:
    """``(h, w)`` Jacobian determinant of ``x -> x + u(x)`` at the field grid points (central finite
    differences on the grid, one-sided at its border, in working-pixel units).

    >>> float(jacobian_determinant(Deformation.zeros((8, 8), (4, 4))).min())
    1.0
    """
    f = deformation.field.astype(np.float64)
    h, w = deformation.grid_shape
    big_h, big_w = deformation.shape
    sx, sy = big_w / w, big_h / h  # working pixels per grid step

    def grad(a: np.ndarray, axis: int, spacing: float) -> np.ndarray:
        if a.shape[axis] < 2:
            return np.zeros_like(a)
        return np.gradient(a, spacing, axis=axis)

    dux_dx, dux_dy = grad(f[..., 0], 1, sx), grad(f[..., 0], 0, sy)
    duy_dx, duy_dy = grad(f[..., 1], 1, sx), grad(f[..., 1], 0, sy)
    return (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx


def folding(deformation: Deformation) -> float:
    """Share of the field grid (0..1) where the Jacobian determinant of ``x -> x + u(x)`` is <= 0.

    >>> f = np.zeros((1, 5, 2)); f[0, :, 0] = [0, 0, 6, 0, 0]    # a bump steeper than 1 px / px folds
    >>> folding(Deformation(f, (1, 5)))
    0.2
    """
    det = jacobian_determinant(deformation)
    return float(np.mean(~(det > 0))) if det.size else 0.0


def check(deformation: Deformation, max_folding: float = MAX_FOLDING) -> str | None:
    """None when the deformation is usable, else its problem in one line.

    Problems: not a Deformation, a field that is not ``(h, w, 2)`` or empty, a ``shape`` that is not two
    positive sizes, non-finite values, folding on more than ``max_folding`` of the field.

    >>> check(Deformation.zeros((6, 6))) is None
    True
    >>> f = np.zeros((3, 3, 2)); f[1, 1, 0] = np.nan
    >>> check(Deformation(f, (6, 6)))
    'non-finite displacement at 1 of 9 field points'
    """
    if not isinstance(deformation, Deformation):
        return f"not a Deformation: {type(deformation).__name__}"
    f = deformation.field
    if f.ndim != 3 or f.shape[2] != 2 or f.shape[0] < 1 or f.shape[1] < 1:
        return f"field must be (h, w, 2), got shape {f.shape}"
    if len(deformation.shape) != 2 or min(deformation.shape) < 1:
        return f"shape must be the fixed working (H, W), got {deformation.shape}"
    bad = ~np.isfinite(f).all(axis=2)
    if bad.any():
        return f"non-finite displacement at {int(bad.sum())} of {bad.size} field points"
    share = folding(deformation)
    if share > max_folding:
        return f"the deformation folds on {100 * share:.1f} % of the field"
    return None


def warp_image(image: np.ndarray, matrix: np.ndarray | None, deformation: Deformation | None = None,
               shape: tuple[int, int] | None = None, *, interpolation: int = cv2.INTER_LINEAR,
               border_value: float = 0.0) -> np.ndarray:
    """The moving image sampled onto the fixed working grid: ``out(x) = image(T(x))`` (``cv2.remap``).

    Parameters
    ----------
    image : (Hm, Wm) or (Hm, Wm, C) array
        The moving image in its working frame.
    matrix : (3, 3) array or None
        Moving working -> fixed working (None: identity).
    deformation : Deformation or None
    shape : (H, W), optional
        The fixed working shape (default: ``deformation.shape``; required without a deformation).

    Returns
    -------
    (H, W) or (H, W, C) array of ``image``'s dtype; ``border_value`` where ``T(x)`` leaves the image.

    >>> img = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> f = np.zeros((3, 4, 2), np.float32); f[..., 0] = 1.0      # fixed x shows moving x + 1
    >>> warp_image(img, None, Deformation(f, (3, 4)))[0].tolist()
    [1.0, 2.0, 3.0, 0.0]
    """
    if shape is None:
        if deformation is None:
            raise ValueError("warp_image needs shape when there is no deformation")
        shape = deformation.shape
    h, w = int(shape[0]), int(shape[1])
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    if deformation is not None:
        if tuple(deformation.shape) != (h, w):
            raise ValueError(f"deformation covers {deformation.shape}, not the fixed shape {(h, w)}")
        u = deformation.dense().astype(np.float64)
        gx, gy = gx + u[..., 0], gy + u[..., 1]
    m_inv = np.linalg.inv(np.eye(3) if matrix is None else as_3x3(matrix))
    mx = m_inv[0, 0] * gx + m_inv[0, 1] * gy + m_inv[0, 2]
    my = m_inv[1, 0] * gx + m_inv[1, 1] * gy + m_inv[1, 2]
    src = np.asarray(image)
    work = src.astype(np.float32) if src.dtype == bool else src
    out = cv2.remap(work, mx.astype(np.float32), my.astype(np.float32), interpolation,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
    return out > 0.5 if src.dtype == bool else out


def random_smooth_field(shape: tuple[int, int], amplitude_px: float, scale_px: float, seed: int, *,
                        min_jacobian: float = 0.5) -> Deformation:
    """A smooth, invertible random deformation with known values, for generated data and tests.

    Gaussian-smoothed white noise (each component), scaled so that the largest displacement magnitude is
    ``amplitude_px``; when that would make the Jacobian determinant of ``x -> x + u(x)`` drop below
    ``min_jacobian`` anywhere, the amplitude is reduced until it does not (so the map never folds; the
    largest displacement is then below ``amplitude_px``).

    Parameters
    ----------
    shape : (H, W)
        The working image the field covers.
    amplitude_px : float
        Largest displacement magnitude, working pixels.
    scale_px : float
        Gaussian sigma of the smoothing, working pixels (the size of the "bumps").
    seed : int
    min_jacobian : float
        Lowest allowed Jacobian determinant, in (0, 1).

    Returns
    -------
    Deformation
        On a grid about ``scale_px / 4`` working pixels apart (at least 1, at most the working size).

    >>> d = random_smooth_field((100, 150), 5.0, 20.0, seed=1)
    >>> round(float(np.linalg.norm(d.field, axis=2).max()), 3), folding(d)
    (5.0, 0.0)
    """
    big_h, big_w = int(shape[0]), int(shape[1])
    step = max(1.0, float(scale_px) / 4.0)
    h, w = max(2, int(round(big_h / step))), max(2, int(round(big_w / step)))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((h, w, 2)).astype(np.float32)
    sigma_x, sigma_y = scale_px * w / big_w, scale_px * h / big_h
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma_x, 0.3), sigmaY=max(sigma_y, 0.3),
                             borderType=cv2.BORDER_REFLECT)
    field -= field.reshape(-1, 2).mean(axis=0)
    peak = float(np.linalg.norm(field, axis=2).max())
    field = field * (float(amplitude_px) / peak) if peak > 0 else field
    d = Deformation(field, (big_h, big_w))
    for _ in range(60):
        if float(jacobian_determinant(d).min()) >= min_jacobian:
            break
        d = Deformation(d.field * 0.9, d.shape)
    return d
