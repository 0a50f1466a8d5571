"""The nonrigid contract (bench.deformation): the meaning of a field, the landmark direction, folding, checks.

An analytic deformation with a known forward map: the fixed working point ``x`` corresponds to the moving
point ``T(x) = M^-1 (x + u(x))`` with ``u(x) = (a sin(2 pi y / L), b sin(2 pi x / L))``. Moving points are
made from fixed ones by ``T`` (exact); ``warp_points`` must bring them back (ANHIR: source landmarks into the
target frame).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import geometry
from bench.deformation import (
    Deformation,
    check,
    fixed_to_moving,
    folding,
    random_smooth_field,
    warp_image,
    warp_points,
)
from bench.method import Estimate

A, B, L = 3.0, 2.0, 90.0  # amplitudes and wavelength, working px: max slope 2 pi 3 / 90 = 0.21 (no folding)


def analytic_u(points: np.ndarray) -> np.ndarray:
    x, y = points[..., 0], points[..., 1]
    return np.stack([A * np.sin(2 * np.pi * y / L), B * np.sin(2 * np.pi * x / L)], axis=-1)


def sampled(shape: tuple[int, int], grid: tuple[int, int]) -> Deformation:
    """The analytic field sampled on a (h, w) grid covering a working image of ``shape``."""
    d = Deformation.zeros(shape, grid)
    return Deformation(analytic_u(d.grid_points()), shape)


def moving_of(matrix: np.ndarray, fixed_points: np.ndarray) -> np.ndarray:
    """Exact T(x) = M^-1 (x + u(x))."""
    return geometry.apply(np.linalg.inv(matrix), fixed_points + analytic_u(fixed_points))


def some_affine(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return geometry.translation(7.5, -4.0) @ geometry.rotation(8.0, ((w - 1) / 2, (h - 1) / 2)) @ geometry.scaling(1.1, 0.95)


def fixed_points(shape: tuple[int, int], n: int = 60, seed: int = 0) -> np.ndarray:
    h, w = shape
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(5, w - 6, n), rng.uniform(5, h - 6, n)])


@pytest.mark.parametrize("moving_shape", [(180, 240), (150, 300)], ids=["equal-sizes", "different-sizes"])
def test_warp_points_recovers_fixed_points_full_grid(moving_shape):
    shape = (180, 240)  # fixed working frame; the moving frame's size only changes M
    m = some_affine(shape) @ geometry.scaling(shape[1] / moving_shape[1], shape[0] / moving_shape[0])
    x = fixed_points(shape)
    p = moving_of(m, x)
    got, res = warp_points(m, sampled(shape, shape), p, return_residual=True)
    # the field is the analytic u sampled per pixel, interpolated bilinearly: error of the interpolation only
    assert np.abs(got - x).max() < 0.05
    assert res.max() < 1e-3


def test_warp_points_reduced_resolution_field_is_sub_pixel():
    shape = (180, 240)
    m = some_affine(shape)
    x = fixed_points(shape, seed=1)
    p = moving_of(m, x)
    got = warp_points(m, sampled(shape, (shape[0] // 4, shape[1] // 4)), p)  # field grid w = W / 4
    assert np.abs(got - x).max() < 0.5
    assert np.median(np.linalg.norm(got - x, axis=1)) < 0.2
    # the wrong direction (applying u forward instead of inverting it) is off by about the amplitude
    wrong = geometry.apply(m, p) + sampled(shape, shape).at(geometry.apply(m, p))
    assert np.median(np.linalg.norm(wrong - x, axis=1)) > 1.0


def test_warp_points_without_deformation_is_the_affine():
    m = some_affine((50, 60))
    p = fixed_points((50, 60))
    assert np.allclose(warp_points(m, None, p), geometry.apply(m, p))
    assert np.allclose(warp_points(m, Deformation.zeros((50, 60), (5, 6)), p), geometry.apply(m, p))


def test_forward_map_and_at_match_the_convention():
    shape = (40, 64)
    d = sampled(shape, (10, 16))
    # at the grid points, at() returns the stored values exactly
    pts = d.grid_points().reshape(-1, 2)
    assert np.allclose(d.at(pts), d.field.reshape(-1, 2), atol=1e-6)
    # dense() (cv2.resize) equals at() on every working pixel
    gx, gy = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    every = np.column_stack([gx.ravel(), gy.ravel()]).astype(float)
    assert np.allclose(d.dense().reshape(-1, 2), d.at(every), atol=1e-4)
    assert np.allclose(fixed_to_moving(None, d, pts), pts + d.field.reshape(-1, 2), atol=1e-6)


def test_warp_points_steep_field_converges_with_damping():
    # slope 1.6 px/px along x: plain fixed-point iteration diverges, the map itself is invertible
    shape = (50, 200)
    d = Deformation.zeros(shape, shape)
    xs = d.grid_points()[..., 0]
    field = np.zeros(shape + (2,))
    field[..., 0] = 1.6 * np.clip(xs - 80, 0, 20)
    d = Deformation(field, shape)
    x = np.array([[70.0, 20.0], [90.0, 20.0], [99.0, 20.0], [120.0, 25.0]])
    p = x + d.at(x)
    got, res = warp_points(None, d, p, return_residual=True)
    assert res.max() < 1e-3
    assert np.abs(got - x).max() < 1e-2


def test_folding_and_check():
    smooth = random_smooth_field((120, 160), amplitude_px=6.0, scale_px=20.0, seed=3)
    assert folding(smooth) == 0.0
    assert check(smooth) is None
    folded = Deformation(np.zeros((20, 20, 2)), (20, 20))
    f = folded.field.copy()
    f[:, 8:12, 0] = -np.arange(4) * 2.0  # slope -2 px/px: x + u(x) runs backwards
    folded = Deformation(f, (20, 20))
    assert folding(folded) > 0.05
    assert "folds on" in check(folded)
    nan = f.copy()
    nan[3, 4, 1] = np.nan
    assert "non-finite" in check(Deformation(nan, (20, 20)))
    assert "(h, w, 2)" in check(Deformation(np.zeros((4, 4)), (20, 20)))
    assert "shape" in check(Deformation(np.zeros((4, 4, 2)), (0, 20)))


def test_random_smooth_field_is_seeded_and_bounded():
    a = random_smooth_field((100, 130), 4.0, 15.0, seed=5)
    b = random_smooth_field((100, 130), 4.0, 15.0, seed=5)
    assert np.array_equal(a.field, b.field)
    assert np.linalg.norm(a.field, axis=2).max() <= 4.0 + 1e-4
    steep = random_smooth_field((100, 130), 40.0, 5.0, seed=5)  # asked to fold: amplitude reduced
    assert folding(steep) == 0.0 and np.linalg.norm(steep.field, axis=2).max() < 40.0


def test_warp_image_matches_the_analytic_mapping():
    shape = (120, 160)  # fixed working
    moving_shape = (110, 170)

    def pattern(x, y):
        return (np.sin(x / 7.0) * np.cos(y / 9.0) + 1.0) / 2.0

    gx, gy = np.meshgrid(np.arange(moving_shape[1]), np.arange(moving_shape[0]))
    moving = pattern(gx, gy).astype(np.float32)
    m = geometry.translation(3.0, 2.0) @ geometry.rotation(4.0, (80, 60))
    d = sampled(shape, shape)
    out = warp_image(moving, m, d, shape)
    fx, fy = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    t = moving_of(m, np.stack([fx, fy], axis=-1).reshape(-1, 2).astype(float)).reshape(shape + (2,))
    expected = pattern(t[..., 0], t[..., 1])
    inside = (t[..., 0] > 1) & (t[..., 0] < moving_shape[1] - 2) & (t[..., 1] > 1) & (t[..., 1] < moving_shape[0] - 2)
    assert inside.mean() > 0.8
    assert np.abs(out - expected)[inside].max() < 0.02
    assert out.shape == shape and out.dtype == np.float32
    mask = warp_image(moving > 0.5, m, d, shape)
    assert mask.dtype == bool


def test_estimate_carries_a_deformation():
    d = Deformation.zeros((10, 12), (5, 6))
    est = Estimate(np.eye(3), deformation=d)
    assert est.deformation is d
    assert Estimate(np.eye(3)).deformation is None
    with pytest.raises(ValueError):
        Estimate(np.eye(3), deformation=np.zeros((5, 6, 2)))
    with pytest.raises(ValueError):
        Estimate(np.eye(3), deformation=d, frame="original")


# ---------------------------------------------------------------- through the harness's frames (original pixels)


@pytest.mark.parametrize(("source_shape", "target_shape", "factor"), [
    ((1200, 1600), (1200, 1600), 0.25),   # equal sizes, working frame at a quarter
    ((1400, 1100), (1000, 1500), 0.3),    # different source and target sizes
])
def test_source_landmarks_reach_the_target_frame_through_working_frames(source_shape, target_shape, factor):
    """The harness's path for a nonrigid answer (``PreparedPair.source_points_to_target``): original source
    pixels -> moving working frame (resampling, then the preprocessing's turn) -> the fixed working point the
    deformation maps onto it -> original target pixels. Built backwards from target points with the analytic
    field (its forward map known exactly), at a reduced working resolution and a field at a quarter of that."""
    from bench.method import ImageView
    from bench.preprocess import PreparedPair

    ht, wt = (round(v * factor) for v in target_shape)
    fixed = ImageView(np.zeros((ht, wt), np.float32), np.ones((ht, wt), bool))
    pre = geometry.rotation(20, (wt / 2, ht / 2)) @ geometry.translation(7, -4)
    prepared = PreparedPair(fixed=fixed, moving=fixed, source_scale=(factor, factor), target_scale=(factor, factor),
                            source_pre=pre, source_shape=source_shape, target_shape=target_shape)
    matrix = geometry.translation(3, -2) @ geometry.scaling(1.04, 0.97)  # the method's working-frame affine
    field = Deformation(analytic_u(Deformation.zeros((ht, wt), (ht // 4, wt // 4)).grid_points()), (ht, wt))
    rng = np.random.default_rng(0)
    target = rng.uniform((50, 50), (target_shape[1] - 50, target_shape[0] - 50), (40, 2))  # original target px
    x_w = geometry.apply(prepared.target_to_fixed(), target)
    moving_w = fixed_to_moving(matrix, field, x_w)  # exact: T(x) = M^-1 (x + u(x)) with the field's own u
    source = geometry.apply(np.linalg.inv(prepared.source_to_moving()), moving_w)
    back, residual = prepared.source_points_to_target(source, matrix, field)
    assert np.abs(back - target).max() < 0.05 / factor  # a twentieth of a working pixel, in original pixels
    assert residual.max() < 1e-3
    # the wrong direction (the forward map applied to source points) is far off: the test can tell them apart
    wrong = geometry.apply(np.linalg.inv(prepared.target_to_fixed()),
                           fixed_to_moving(matrix, field, geometry.apply(prepared.source_to_moving(), source)))
    assert np.abs(wrong - target).max() > 5
    # without a deformation the same path is exactly the affine row's matrix (to_original)
    plain, _ = prepared.source_points_to_target(source, matrix)
    np.testing.assert_allclose(plain, geometry.apply(prepared.to_original(matrix), source), atol=1e-9)
