"""The classical methods (sift, surf, iterative, elastix) on small generated stain pairs.

Each method must recover known affine transforms (scale 0.8-1.25, shear, translation, the small rotation
left after the shared preprocessing) to within a small relative error, and must *report* failure, not
return a matrix, on a pair with no shared content. The views are built here the way the shared
preprocessing builds them (inverted grayscale, background 0, tissue masks, moving image in the fixed
image's frame with the tissue centres of mass aligned), so these tests do not depend on that stage.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from bench.datasets.synthetic import GeneratorConfig, generate_pair
from bench.methods import _features
from bench.methods.iterative import Iterative, sitk_affine_to_matrix
from bench.methods.sift import Sift
from bench.methods.surf import Surf, opencv_surf_available

from bench import Context, ImageView, RegistrationFailed, geometry, quality

SIZE = 400  # longer side of the generated target, pixels


def _view(rgb: np.ndarray, mask: np.ndarray) -> ImageView:
    gray = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gray[~mask] = 0.0
    return ImageView(gray, mask.astype(bool), rgb)


def _pair(seed: int, tissue: str, **geometry_cfg) -> tuple[ImageView, ImageView, np.ndarray]:
    """Fixed and moving views of a generated pair and the true moving -> fixed matrix (working frame)."""
    cfg = GeneratorConfig(size=SIZE, elastic_px=0.0, hole_probability=0.0, dust_probability=0.0,
                          max_translation_frac=0.03, **geometry_cfg)
    p = generate_pair(seed, tissue=tissue, source_stain="HE", target_stain="DAB", config=cfg)
    h, w = p.target_mask.shape
    shift = np.argwhere(p.target_mask).mean(0)[::-1] - np.argwhere(p.source_mask).mean(0)[::-1]
    pre = geometry.translation(*shift)  # what the shared stage does besides the rotation
    rgb = cv2.warpAffine(p.source_rgb, pre[:2], (w, h), borderValue=(242, 242, 242))
    mask = cv2.warpAffine(p.source_mask.astype(np.uint8), pre[:2], (w, h), flags=cv2.INTER_NEAREST) > 0
    return _view(p.target_rgb, p.target_mask), _view(rgb, mask), p.true_matrix @ np.linalg.inv(pre)


# name -> (GeneratorConfig geometry, tissue): rotation as left by the preprocessing, scale, shear
CASES = {
    "shrink-0.8": (dict(max_rotation_deg=4.0, scale_range=(0.8, 0.8), max_shear=0.02), "kidney-like"),
    "grow-1.25": (dict(max_rotation_deg=4.0, scale_range=(1.25, 1.25), max_shear=0.02), "colon-ihc"),
    "shear": (dict(max_rotation_deg=3.0, scale_range=(1.12, 1.12), max_shear=0.1), "lung-like"),
}


@pytest.fixture(scope="module")
def pairs() -> dict:
    return {name: _pair(11 + i, tissue, **cfg) for i, (name, (cfg, tissue)) in enumerate(CASES.items())}


def _relative_error(matrix: np.ndarray, truth: np.ndarray, fixed: ImageView) -> float:
    """Median distance between where ``matrix`` and ``truth`` put moving tissue points, / fixed diagonal."""
    ys, xs = np.nonzero(fixed.mask)
    idx = np.linspace(0, len(xs) - 1, 200).astype(int)
    fixed_pts = np.c_[xs[idx], ys[idx]].astype(float)
    moving_pts = geometry.apply(np.linalg.inv(truth), fixed_pts)
    err = np.linalg.norm(geometry.apply(matrix, moving_pts) - fixed_pts, axis=1)
    return float(np.median(err) / np.hypot(*fixed.shape))


METHODS = {
    "sift": Sift,
    "surf": Surf,
    "iterative": Iterative,
}


def _elastix():
    pytest.importorskip("itk", reason="itk-elastix not installed (pip install histreg-bench[elastix])")
    from bench.methods.elastix import Elastix

    m = Elastix()
    m.prepare(Context())
    return m


def _method(name: str):
    return _elastix() if name == "elastix" else METHODS[name]()


# elastix loads ITK's large lazy modules on first use (tens of seconds): marked slow
ALL = [*METHODS, pytest.param("elastix", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ALL)
def test_recovers_known_affine(name, case, pairs):
    fixed, moving, truth = pairs[case]
    before = _relative_error(np.eye(3), truth, fixed)
    est = _method(name).estimate(fixed, moving, Context(seed=0))
    err = _relative_error(est.matrix, truth, fixed)
    assert before > 0.02, f"the case should start misaligned ({before:.4f})"
    assert err < 0.01, f"{name} on {case}: relative error {err:.4f} (was {before:.4f})"


@pytest.mark.parametrize("name", ALL)
def test_reports_failure_on_unrelated_tissue(name, pairs):
    fixed, _, _ = pairs["shrink-0.8"]  # kidney-like
    _, other, _ = pairs["shear"]  # lung-like, another base section
    with pytest.raises(RegistrationFailed):
        _method(name).estimate(fixed, other, Context(seed=0))


@pytest.mark.parametrize("name", ALL)
def test_reports_failure_on_blank_target(name, pairs):
    fixed, moving, _ = pairs["grow-1.25"]
    blank = ImageView(np.zeros_like(fixed.image), np.zeros_like(fixed.mask), None)
    with pytest.raises(RegistrationFailed):
        _method(name).estimate(blank, moving, Context(seed=0))


def test_feature_diagnostics_and_surf_backend(pairs):
    fixed, moving, _ = pairs["shear"]
    sift = Sift().estimate(fixed, moving, Context(seed=0)).diagnostics
    for key in ("keypoints_fixed", "keypoints_moving", "matches", "inliers", "inlier_ratio", "backend"):
        assert key in sift
    assert sift["inliers"] <= sift["matches"] and 0 < sift["inlier_ratio"] <= 1
    surf = Surf().estimate(fixed, moving, Context(seed=0)).diagnostics
    assert surf["backend"] == ("opencv" if opencv_surf_available() else "mahotas")
    assert Surf.unavailable_reason() is None


def test_surf_refuses_missing_opencv_backend(pairs):
    if opencv_surf_available():
        pytest.skip("this OpenCV build has the nonfree SURF")
    fixed, moving, _ = pairs["shear"]
    with pytest.raises(RegistrationFailed, match="nonfree"):
        Surf(backend="opencv").estimate(fixed, moving, Context())


def test_iterative_diagnostics_and_determinism(pairs):
    fixed, moving, _ = pairs["shrink-0.8"]
    a = Iterative().estimate(fixed, moving, Context(seed=5))
    b = Iterative().estimate(fixed, moving, Context(seed=5))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    d = a.diagnostics
    assert d["iterations"] > 0 and "stop_condition" in d and np.isfinite(d["final_metric"])
    assert d["metric_end"] < d["metric_start"]  # Mattes MI is minimised


def test_sitk_affine_conversion_matches_transform_point():
    sitk = pytest.importorskip("SimpleITK")
    tx = sitk.AffineTransform(2)
    tx.SetMatrix([1.1, 0.2, -0.1, 0.9])
    tx.SetCenter((40.0, 25.0))
    tx.SetTranslation((3.0, -7.0))
    m = sitk_affine_to_matrix(tx)
    for p in [(0.0, 0.0), (13.0, 57.0), (100.0, -4.0)]:
        np.testing.assert_allclose(geometry.apply(m, [p])[0], tx.TransformPoint(p), atol=1e-9)


def test_matrix_problem_flags_degenerate_matrices():
    ok = geometry.rotation(20) @ geometry.scaling(1.2)
    assert quality.matrix_problem(ok, 0.5, 2.0, 1.5) is None
    assert "scale" in quality.matrix_problem(geometry.scaling(0.3), 0.5, 2.0, 1.5)
    assert "anisotropy" in quality.matrix_problem(geometry.scaling(1.6, 0.8), 0.5, 2.0, 1.5)
    assert "reflection" in quality.matrix_problem(geometry.scaling(-1.0, 1.0), 0.5, 2.0, 1.5)


def test_register_features_recovers_and_refuses():
    rng = np.random.default_rng(0)
    truth = geometry.translation(12, -5) @ geometry.rotation(7, (100, 100)) @ geometry.scaling(1.1)
    pts_m = rng.uniform(0, 200, (120, 2))
    pts_f = geometry.apply(truth, pts_m)
    desc = rng.normal(size=(120, 32)).astype(np.float32)
    p = _features.MatchParams(gate=0.0)  # displacements here reach 40 px: no gate
    est = _features.register_features(pts_m, desc, pts_f, desc + 0.01, p, seed=0, diagonal=280.0)
    np.testing.assert_allclose(est.matrix, truth, atol=1e-3)
    assert est.diagnostics["inliers"] == 120
    # the same descriptors at unrelated positions: no consistent affine, reported as failure
    with pytest.raises(RegistrationFailed, match="inlier"):
        _features.register_features(pts_m, desc, rng.uniform(0, 200, (120, 2)), desc, p, seed=0, diagonal=280.0)
    # a gate smaller than the true displacements leaves no candidates: too few matches
    with pytest.raises(RegistrationFailed, match="matches"):
        gated = _features.MatchParams(gate=0.001)
        _features.register_features(pts_m, desc, pts_f + 50, desc, gated, seed=0, diagonal=280.0)


def test_alignment_evidence_separates_aligned_from_shifted(pairs):
    fixed, moving, truth = pairs["grow-1.25"]
    good = quality.alignment_evidence(fixed.image, fixed.mask, moving.image, moving.mask, truth)
    off = geometry.translation(25, 0) @ truth
    bad = quality.alignment_evidence(fixed.image, fixed.mask, moving.image, moving.mask, off)
    assert good["contrast"] > 1.5 > bad["contrast"]


def test_upright_surf_descriptors_follow_a_shift_and_tell_points_apart():
    from bench.methods.surf import upright_surf_descriptors

    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.random((200, 240)), (0, 0), 2.0) * 255
    pts = np.array([[60.0, 70.0, 2.0], [100.0, 120.0, 3.0], [140.0, 90.0, 2.5]])  # (y, x, scale)
    d = upright_surf_descriptors(img, pts)
    assert d.shape == (3, 64) and np.allclose(np.linalg.norm(d, axis=1), 1.0)
    shifted = np.roll(img, (9, -6), axis=(0, 1))  # content moves by (+9, -6); these points stay inside
    d2 = upright_surf_descriptors(shifted, pts + [9.0, -6.0, 0.0])
    np.testing.assert_allclose(d2, d, atol=1e-6)
    assert np.linalg.norm(d[0] - d[1]) > 0.3  # different places, different descriptors
    turned = np.ascontiguousarray(np.rot90(img))  # upright: no invariance to a 90-degree turn
    y, x = pts[0, 0], pts[0, 1]
    d3 = upright_surf_descriptors(turned, np.array([[img.shape[1] - 1 - x, y, 2.0]]))
    assert np.linalg.norm(d3[0] - d[0]) > 0.3


def test_one_to_one_matching_keeps_the_closest_match_per_fixed_keypoint():
    fixed = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 0.0]], np.float32)
    moving = np.array([[0.1, 0.0], [0.5, 0.0], [10.0, 10.2]], np.float32)  # two near fixed 0
    many = _features.match_descriptors(moving, fixed, ratio=0.9, mutual=False)
    assert sorted(many[:, 1].tolist()) == [0, 0, 1]
    one = _features.match_descriptors(moving, fixed, ratio=0.9, mutual=False, one_to_one=True)
    assert sorted(map(tuple, one.tolist())) == [(0, 0), (2, 1)]
