"""The shared preprocessing: composition to original pixels, masks, rotation search, light stage, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import geometry
from bench.imageio import ImageLoadError, load_image
from bench.method import make_params
from bench.preprocess import (
    PreprocessParams,
    candidate_matrices,
    params_dict,
    prepare_pair,
    shift_batch,
    texture_mi,
    tissue_mask,
    warp_batch,
)

GLASS = (238, 236, 241)
HE = np.array([0.65, 0.70, 0.29]) + np.array([0.07, 0.99, 0.11])  # haematoxylin + eosin, optical density


def _noise(rng, shape, scale):
    h, w = shape
    g = rng.standard_normal((int(h / scale) + 3, int(w / scale) + 3)).astype(np.float32)
    f = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def tissue(seed: int, shape=(300, 400), od=HE, strength=1.0) -> tuple[np.ndarray, np.ndarray]:
    """A section on glass: an asymmetric lobed outline filled with stained texture.

    Returns RGB (H, W, 3) uint8 and the true tissue mask (H, W) bool.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.indices(shape, dtype=np.float32)
    body = ((xx - 0.45 * w) / (0.3 * w)) ** 2 + ((yy - 0.5 * h) / (0.32 * h)) ** 2 < 1
    lobe = ((xx - 0.72 * w) / (0.12 * w)) ** 2 + ((yy - 0.3 * h) / (0.1 * h)) ** 2 < 1
    mask = cv2.GaussianBlur((body | lobe).astype(np.float32), (0, 0), 3) + 0.15 * _noise(rng, shape, 25) > 0.5
    density = 0.35 + 0.25 * _noise(rng, shape, 6) + 0.2 * _noise(rng, shape, 2.5)
    density = np.clip(density, 0.05, 1.2) * mask * strength
    rgb = np.asarray(GLASS, np.float32) * np.exp(-density[..., None] * np.asarray(od, np.float32))
    rgb += rng.normal(0, 1.5, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def _write(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _moved_pair(tmp_path: Path, matrix: np.ndarray, src_shape=(340, 420), seed=3):
    """Target = tissue; source = the target moved by ``matrix`` (target px -> source px) on glass."""
    tgt, tmask = tissue(seed)
    h, w = src_shape
    src = cv2.warpAffine(tgt, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderValue=GLASS)
    return _write(tmp_path / "source.png", src), _write(tmp_path / "target.png", tgt), tmask


def _true_source_to_target(angle: float, centre, shift) -> np.ndarray:
    """A source -> target rigid map; returns it (the source is drawn with its inverse)."""
    return geometry.translation(*shift) @ geometry.rotation(angle, centre)


@pytest.mark.parametrize(("angle", "working_size"), [(37.3, 300), (-141.6, 260), (4.2, 1024)])
def test_rotation_composes_to_original_pixels(tmp_path, angle, working_size):
    true = _true_source_to_target(angle, (210, 170), (-12.0, 9.0))  # source px -> target px
    src, tgt, _ = _moved_pair(tmp_path, np.linalg.inv(true))
    params = PreprocessParams(working_size=working_size)
    p = prepare_pair(src, tgt, params)
    # the stage's own estimate, in original pixels: landmarks within one working pixel
    pts = np.array([[150.0, 120.0], [260.0, 200.0], [180.0, 90.0], [230.0, 150.0]])  # target tissue points
    src_pts = geometry.apply(np.linalg.inv(true), pts)
    err = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), src_pts) - pts, axis=1)
    assert err.max() * max(p.target_scale) < 1.0
    diff = (p.diagnostics["angle_deg"] - angle + 180) % 360 - 180
    assert abs(diff) < 0.5
    # the exact residual a perfect method would return composes back to the true matrix
    r_s, r_t = geometry.resample_matrix(*p.source_scale), geometry.resample_matrix(*p.target_scale)
    residual = r_t @ true @ np.linalg.inv(r_s) @ np.linalg.inv(p.source_pre)
    np.testing.assert_allclose(p.to_original(residual), true, atol=1e-9)


def test_moving_view_is_the_source_warped_by_source_pre(tmp_path):
    true = _true_source_to_target(63.0, (200, 160), (5.0, -4.0))
    src, tgt, _ = _moved_pair(tmp_path, np.linalg.inv(true))
    params = PreprocessParams(working_size=300)
    p = prepare_pair(src, tgt, params)
    assert p.moving.image.shape == p.fixed.image.shape == p.moving.mask.shape == p.moving.rgb.shape[:2]
    small = load_image(src, (round(420 * p.diagnostics["factor"]), round(340 * p.diagnostics["factor"]))).rgb
    h, w = p.fixed.image.shape
    expect = cv2.warpAffine(small, p.source_pre[:2], (w, h), flags=cv2.INTER_LINEAR)
    inside = p.moving.mask & (cv2.erode(p.moving.mask.astype(np.uint8), np.ones((5, 5))) > 0)
    assert np.abs(p.moving.rgb[inside].astype(int) - expect[inside].astype(int)).max() <= 2


def test_views_follow_the_contract(tmp_path):
    src, tgt, _ = _moved_pair(tmp_path, geometry.rotation(20, (200, 150)))
    p = prepare_pair(src, tgt)
    for view in (p.fixed, p.moving):
        assert view.image.dtype == np.float32 and view.mask.dtype == bool and view.rgb.dtype == np.uint8
        assert 0.0 <= view.image.min() and view.image.max() <= 1.0
        assert np.all(view.image[~view.mask] == 0)  # background 0
        assert view.image[view.mask].mean() > 0.08  # tissue bright
    d = p.diagnostics
    for key in ("angle_deg", "flipped", "ncc_before", "ncc_after", "factor", "load_s", "mask_s",
                "rotation_s", "time_s", "stage_version"):
        assert key in d
    assert d["ncc_after"] > d["ncc_before"]
    assert p.source_shape == (340, 420) and p.target_shape == (300, 400)


def test_light_stage(tmp_path):
    src, tgt, _ = _moved_pair(tmp_path, geometry.rotation(30, (200, 150)))
    p = prepare_pair(src, tgt, PreprocessParams(working_size=200), full=False)
    assert p.moving.image.shape == (round(340 * 200 / 420), 200)  # its own frame, same factor
    assert p.fixed.image.shape == (round(300 * 200 / 420), round(400 * 200 / 420))
    assert p.moving.mask.all() and p.fixed.mask.all()
    np.testing.assert_array_equal(p.source_pre, np.eye(3))
    assert p.fixed.image.min() >= 0 and p.fixed.image[0, 0] < 0.1  # glass dark after inversion
    np.testing.assert_allclose(p.to_original(np.eye(3)), geometry.to_original(
        np.eye(3), source_scale=p.source_scale, target_scale=p.target_scale))


def test_one_factor_for_both_images(tmp_path):
    src, tgt, _ = _moved_pair(tmp_path, np.eye(3), src_shape=(500, 700))
    p = prepare_pair(src, tgt, PreprocessParams(working_size=350), full=False)
    assert p.diagnostics["factor"] == pytest.approx(0.5)
    assert p.moving.image.shape == (250, 350) and p.fixed.image.shape == (150, 200)


# ---------------------------------------------------------------------------------------------
# masks


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("strength", [1.0, 0.25])  # a normal and a very pale stain
def test_mask_finds_tissue_and_drops_dust_and_pen_marks(strength):
    rgb, truth = tissue(11, (360, 480), strength=strength)
    rng = np.random.default_rng(5)
    dust = np.zeros(truth.shape, bool)
    for _ in range(12):  # dark specks on the glass
        x, y = int(rng.integers(5, 70)), int(rng.integers(5, 355))
        cv2.circle(rgb, (x, y), 2, (40, 40, 40), -1)
        cv2.circle(dust.view(np.uint8), (x, y), 2, 1, -1)
    cv2.line(rgb, (470, 10), (470, 350), (30, 110, 60), 6)  # pen stroke along the right edge
    mask, info = tissue_mask(rgb, PreprocessParams())
    assert _iou(mask, truth) > 0.9
    assert not mask[dust].any()
    assert not mask[:, 462:].any()
    assert info["fallback"] == "" and 0.2 < info["coverage"] < 0.6


def test_mask_falls_back_to_whole_image_when_empty():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(236, 0.7, (200, 260, 3)), 0, 255).astype(np.uint8)  # noise, no tissue
    mask, info = tissue_mask(glass, PreprocessParams(mask_min_energy=0.02))
    assert mask.all() and "whole image" in info["fallback"]


def test_mask_can_be_turned_off(tmp_path):
    src, tgt, _ = _moved_pair(tmp_path, geometry.rotation(10, (200, 150)))
    p = prepare_pair(src, tgt, PreprocessParams(mask=False))
    assert p.fixed.mask.all() and p.diagnostics["mask_fallback_target"] == "masking off"


# ---------------------------------------------------------------------------------------------
# rotation search pieces


def test_warp_batch_matches_cv2_warps():
    rng = np.random.default_rng(1)
    src = rng.random((40, 55)).astype(np.float32)
    mats = candidate_matrices(np.arange(0, 360, 45.0), np.arange(8) % 2 == 1, (27.0, 20.0), (30.0, 22.0))
    batch = warp_batch(src, (44, 60), mats)
    for m, out in zip(mats, batch, strict=True):
        ref = cv2.warpAffine(src, m[:2], (60, 44), flags=cv2.INTER_LINEAR, borderValue=0)
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_shift_batch_recovers_subpixel_shifts():
    rgb, _ = tissue(2, (120, 160))
    target = 1 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    shifts = [(3.0, -2.0), (-7.4, 5.6), (0.0, 0.0)]
    warped = np.stack([cv2.warpAffine(target, geometry.translation(-dx, -dy)[:2], (160, 120),
                                      flags=cv2.INTER_LINEAR) for dx, dy in shifts])
    found, ncc = shift_batch(warped, target, max_shift=20)
    np.testing.assert_allclose(found, shifts, atol=0.3)
    assert np.all(ncc > 0.9)


def test_refinement_is_finer_than_the_coarse_step(tmp_path):
    angle = 52.7  # between coarse angles
    true = _true_source_to_target(angle, (210, 160), (0.0, 0.0))
    src, tgt, _ = _moved_pair(tmp_path, np.linalg.inv(true))
    coarse_only = prepare_pair(src, tgt, PreprocessParams(refine=False)).diagnostics["angle_deg"]
    refined = prepare_pair(src, tgt, PreprocessParams()).diagnostics["angle_deg"]
    assert coarse_only % 5 == pytest.approx(0, abs=1e-9) or coarse_only % 5 == pytest.approx(5)
    assert abs(refined - angle) < 0.4 < abs(coarse_only - angle)


def test_flip_is_found_with_default_settings(tmp_path):
    true = _true_source_to_target(25.0, (210, 160), (6.0, 0.0))
    src, tgt, _ = _moved_pair(tmp_path, np.linalg.inv(true))
    mirrored = tmp_path / "mirrored.png"
    img = cv2.imread(str(src))
    cv2.imwrite(str(mirrored), img[:, ::-1])
    params = PreprocessParams()
    assert params.flip_test is True  # on by default
    plain = prepare_pair(src, tgt, params).diagnostics
    flipped = prepare_pair(mirrored, tgt, params)
    assert plain["flipped"] is False and plain["flip_lead"] < 0
    assert flipped.diagnostics["flipped"] is True
    assert flipped.diagnostics["ncc_flipped"] > flipped.diagnostics["ncc_unflipped"]
    w = img.shape[1]
    mirror = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])  # mirrored px -> source px
    pts = np.array([[150.0, 120.0], [250.0, 190.0], [190.0, 100.0]])
    src_pts = geometry.apply(np.linalg.inv(mirror) @ np.linalg.inv(true), pts)  # in the mirrored image
    err = np.linalg.norm(geometry.apply(flipped.to_original(np.eye(3)), src_pts) - pts, axis=1)
    assert err.max() < 2.0
    assert np.linalg.det(flipped.source_pre[:2, :2]) < 0
    off = prepare_pair(mirrored, tgt, PreprocessParams(flip_test=False)).diagnostics
    assert off["flipped"] is False and off["flip_decision"] == "off" and off["ncc_flipped"] is None


def _generated(tmp_path: Path, seed: int, mirror: str | None):
    """A generated two-stain pair (any rotation, scale 0.85-1.2, shear), the source optionally mirrored
    ("lr" or "tb"); returns the two paths and the landmarks (source, target)."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=480, n_landmarks=20, scale_range=(0.85, 1.2), max_shear=0.08)
    pair = generate_pair(seed, source_stain="HE", target_stain="PAS", config=cfg)
    src, pts = pair.source_rgb, pair.source_landmarks.copy()
    h, w = src.shape[:2]
    if mirror == "lr":
        src, pts[:, 0] = src[:, ::-1], w - 1 - pts[:, 0]
    elif mirror == "tb":
        src, pts[:, 1] = src[::-1], h - 1 - pts[:, 1]
    s = _write(tmp_path / f"s{seed}{mirror}.png", np.ascontiguousarray(src))
    t = _write(tmp_path / f"t{seed}.png", pair.target_rgb)
    return s, t, pts, pair.target_landmarks, np.hypot(*pair.target_rgb.shape[:2])


@pytest.mark.parametrize("seed, mirror", [(3, "lr"), (8, "tb")])
def test_generated_mirrored_pair_is_found_and_aligned_by_default(tmp_path, seed, mirror):
    s, t, ls, lt, diagonal = _generated(tmp_path, seed, mirror)
    p = prepare_pair(s, t)  # default settings
    assert p.diagnostics["flipped"] is True
    rtre = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), ls) - lt, axis=1) / diagonal
    assert np.median(rtre) <= 0.035


@pytest.mark.parametrize("seed", [3, 8])
def test_generated_unmirrored_pair_is_not_flipped_and_unchanged(tmp_path, seed):
    """Default settings keep an unmirrored pair unmirrored, with the very matrix the search without the
    flip test finds (the unmirrored candidates are the same computations)."""
    s, t, ls, lt, diagonal = _generated(tmp_path, seed, None)
    on = prepare_pair(s, t)
    off = prepare_pair(s, t, PreprocessParams(flip_test=False))
    assert on.diagnostics["flipped"] is False and on.diagnostics["flip_decision"] in ("ncc", "texture")
    np.testing.assert_allclose(on.source_pre, off.source_pre, atol=1e-9)
    rtre = np.linalg.norm(geometry.apply(on.to_original(np.eye(3)), ls) - lt, axis=1) / diagonal
    assert np.median(rtre) <= 0.035


def _field_of_view(tmp_path: Path, seed: int, mirror: bool):
    """A generated two-stain pair cut to fields of view (each image its own window of 75 % of each side,
    tissue filling most of the frame), the source (mirrored left-right first, if asked) then moved by any
    rotation, scale 0.9-1.1 and shear; returns the paths, the landmarks (source, target) and the diagonal."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=480, n_landmarks=30, max_rotation_deg=0.0, scale_range=(1.0, 1.0), max_shear=0.0)
    pair = generate_pair(seed, source_stain="HE", target_stain="PAS", config=cfg)
    rng = np.random.default_rng(seed)
    cut = []
    for img, pts in ((pair.source_rgb, pair.source_landmarks), (pair.target_rgb, pair.target_landmarks)):
        h, w = img.shape[:2]
        ch, cw = int(h * 0.75), int(w * 0.75)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        cut.append((img[y0:y0 + ch, x0:x0 + cw], pts - [x0, y0]))
    (src, ls), (tgt, lt) = cut
    h, w = src.shape[:2]
    m = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) if mirror else np.eye(3)
    a = geometry.random_affine(rng, ((w - 1) / 2, (h - 1) / 2), max_rotation_deg=180, scale_range=(0.9, 1.1),
                               max_shear=0.05) @ m
    corners = geometry.apply(a, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    a = geometry.translation(*(20 - corners.min(0))) @ a
    size = tuple(int(v) for v in np.ceil(corners.max(0) - corners.min(0) + 41))
    border = tuple(int(v) for v in np.median(np.concatenate([src[0], src[-1]]), axis=0))
    moved = cv2.warpAffine(src, a[:2], size, borderValue=border)
    s, t = _write(tmp_path / f"s{seed}{mirror}.png", moved), _write(tmp_path / f"t{seed}.png", tgt)
    return s, t, geometry.apply(a, ls), lt, np.hypot(*tgt.shape[:2])


@pytest.mark.parametrize("seed", [9, 12])
def test_mirrored_field_of_view_is_found_by_default(tmp_path, seed):
    """Tissue filling the frame: the outline barely changes under a mirror, so the NCC of the two mirror
    states is close (for these pairs under the former fixed margin of 0.1); the default still finds it."""
    for mirror in (False, True):
        s, t, ls, lt, diagonal = _field_of_view(tmp_path, seed, mirror)
        p = prepare_pair(s, t)
        assert p.diagnostics["flipped"] is mirror
        rtre = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), ls) - lt, axis=1) / diagonal
        assert np.median(rtre) <= 0.035


@pytest.mark.parametrize("mirror", [None, "lr"])
def test_texture_mi_decides_the_close_calls(tmp_path, mirror):
    """With the NCC made to decide nothing (a huge flip_margin and band), the texture MI alone picks the
    right mirror state."""
    s, t, ls, lt, diagonal = _generated(tmp_path, 5, mirror)
    p = prepare_pair(s, t, PreprocessParams(flip_margin=9.0, flip_mi_band=9.0))
    d = p.diagnostics
    assert d["flip_decision"] == "texture"
    assert d["flipped"] is (mirror is not None)
    right, wrong = (d["mi_flipped"], d["mi_unflipped"]) if mirror else (d["mi_unflipped"], d["mi_flipped"])
    assert right > wrong + 0.01


def test_texture_mi_is_highest_at_the_true_alignment():
    rgb, _ = tissue(4, (240, 320))
    img = 1 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    true = geometry.rotation(0.0, (160, 120))
    mirrored = np.array([[-1.0, 0, 319], [0, 1, 0], [0, 0, 1]])
    moved = [true, geometry.translation(12, 0), mirrored]
    mi = texture_mi(img, img, np.stack(moved), size=256)
    assert mi[0] > mi[1] and mi[0] > mi[2] and mi[0] > 0.5
    assert texture_mi(img, img, np.stack([geometry.translation(400, 0)]))[0] == 0.0  # no common tissue


def test_flip_defaults_are_the_documented_ones():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "preprocessing.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `flip_test`"))
    p = PreprocessParams()
    cells = [c.strip() for c in row.split("|")[2].split(",")]
    assert cells == [str(p.flip_test), f"{p.flip_margin:g}", f"{p.flip_mi_band:g}", str(p.flip_mi_size)]


def test_translation_search_handles_tissue_filling_the_frame(tmp_path):
    """Windows into a larger section: no glass, so a centre of mass says nothing; the shift search does."""
    big, _ = tissue(8, (600, 800), strength=1.0)
    big = cv2.GaussianBlur(big, (0, 0), 0.7)
    tgt = big[150:450, 200:600]
    moved = cv2.warpAffine(big, geometry.rotation(-6.0, (400, 300))[:2], (800, 600))
    src = moved[180:480, 160:560]  # rotated by 6 degrees and shifted by tens of pixels
    s, t = _write(tmp_path / "s.png", src), _write(tmp_path / "t.png", tgt)
    # source px -> big px: +(160, 180), unrotate (the moved image is big rotated by -6 degrees)
    true = geometry.translation(-200, -150) @ geometry.rotation(6.0, (400, 300)) @ geometry.translation(160, 180)
    pts = np.array([[100.0, 100.0], [300.0, 200.0], [200.0, 150.0]])
    src_pts = geometry.apply(np.linalg.inv(true), pts)
    errs = {}
    for search in (True, False):
        p = prepare_pair(s, t, PreprocessParams(translation_search=search, mask=False))
        errs[search] = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), src_pts) - pts, axis=1).max()
    assert errs[True] < 2.0 < errs[False]


def test_search_at_the_area_scale_keeps_the_result_rigid(tmp_path):
    """A source 18 % smaller: the search also runs at the masks' scale ratio; the result stays rigid."""
    true = geometry.translation(10.0, -5.0) @ geometry.rotation(140.0, (200, 150)) @ geometry.scaling(1.22)
    src, tgt, _ = _moved_pair(tmp_path, np.linalg.inv(true), src_shape=(300, 360))
    p = prepare_pair(src, tgt)
    assert p.diagnostics["search_scale"] == pytest.approx(1.22, rel=0.08)
    assert abs((p.diagnostics["angle_deg"] - 140.0 + 180) % 360 - 180) < 2.0
    m = p.to_original(np.eye(3))
    assert np.linalg.det(m[:2, :2]) == pytest.approx(1.0, abs=0.02)  # rigid: no scale in the output


# ---------------------------------------------------------------------------------------------
# parameters and bad input


def test_params_are_typed_and_validated():
    p = make_params(PreprocessParams, {"working_size": "800", "flip_test": "true", "flip_margin": "0.2"})
    assert p.working_size == 800 and p.flip_test is True and p.flip_margin == 0.2
    assert params_dict(p)["working_size"] == 800
    with pytest.raises(ValueError, match="working_size"):
        PreprocessParams(working_size=0)
    with pytest.raises(ValueError, match="max_shift"):
        PreprocessParams(max_shift=-0.1)
    with pytest.raises(ValueError, match="did you mean"):
        make_params(PreprocessParams, {"working_sise": "800"})


def test_flat_and_missing_images_are_clear_errors(tmp_path):
    rgb, _ = tissue(1)
    good = _write(tmp_path / "good.png", rgb)
    flat = _write(tmp_path / "flat.png", np.full((50, 60, 3), 240, np.uint8))
    with pytest.raises(ImageLoadError, match="flat.png.*flat colour"):
        prepare_pair(flat, good)
    with pytest.raises(ImageLoadError, match="nothere.png.*not found"):
        prepare_pair(good, tmp_path / "nothere.png")


def test_generated_stain_pair_is_brought_close(tmp_path):
    """A generated pair of two stains, rigidly moved by a large angle: the stage alone nearly aligns it."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=400, n_landmarks=20, scale_range=(1.0, 1.0), max_shear=0.0, elastic_px=0.0)
    pair = generate_pair(4, tissue="kidney-like", source_stain="HE", target_stain="PAS", config=cfg)
    s, t = _write(tmp_path / "s.png", pair.source_rgb), _write(tmp_path / "t.png", pair.target_rgb)
    p = prepare_pair(s, t)
    err = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), pair.source_landmarks) - pair.target_landmarks,
                         axis=1)
    assert np.median(err) / np.hypot(*pair.target_rgb.shape[:2]) < 0.02


@pytest.mark.realdata
def test_anhir_mini_preprocessed_beats_identity(anhir_mini):
    """The issue's check: success (median rTRE <= 0.035) on >= 10 of 12 pairs, lower mean than identity."""
    from bench.pairs import load_table, read_landmarks

    pairs = load_table(anhir_mini)
    before, after = [], []
    for pair in pairs:
        p = prepare_pair(pair.source_image, pair.target_image)
        src, tgt = read_landmarks(pair.source_landmarks), read_landmarks(pair.target_landmarks)
        n = min(len(src), len(tgt))
        src, tgt = src[:n], tgt[:n]
        before.append(np.median(np.linalg.norm(src - tgt, axis=1)) / pair.diagonal)
        moved = geometry.apply(p.to_original(np.eye(3)), src)
        after.append(np.median(np.linalg.norm(moved - tgt, axis=1)) / pair.diagonal)
    assert len(after) == 12
    assert sum(a <= 0.035 for a in after) >= 10
    assert np.mean(after) < np.mean(before)


def _rigid_fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Best rotation + translation (no scale) taking points ``a`` onto ``b`` (Kabsch), 3x3."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, d]) @ u.T
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = r, cb - r @ ca
    return m


@pytest.mark.realdata
def test_anhir_mini_turned_and_rescaled_sources(anhir_mini, tmp_path):
    """The issue's second check: sources turned by a random angle and rescaled by up to +-20 %.

    At least half succeed, every rotation is found (within 5 degrees of the landmarks' best rotation),
    and what is left is what the best *rigid* map leaves, i.e. the scale the stage does not estimate.
    """
    from bench.pairs import load_table, read_landmarks

    rng = np.random.default_rng(0)
    after, rigid, angle_errors = [], [], []
    for pair in load_table(anhir_mini):
        src = cv2.imread(str(pair.source_image))
        h, w = src.shape[:2]
        angle, scale = rng.uniform(-180, 180), rng.uniform(0.8, 1.2)
        centre = np.array([(w - 1) / 2, (h - 1) / 2])
        lin = geometry.rotation(angle) @ geometry.scaling(scale)
        corners = geometry.apply(lin, np.array([[0, 0], [w, 0], [0, h], [w, h]]) - centre)
        size = np.ceil(corners.max(0) - corners.min(0)).astype(int)
        move = geometry.translation(*(size / 2)) @ lin @ geometry.translation(*-centre)
        glass = tuple(int(v) for v in np.median(src[:20, :20].reshape(-1, 3), axis=0))
        moved = cv2.warpAffine(src, move[:2], (int(size[0]), int(size[1])), borderValue=glass)
        path = tmp_path / f"{pair.pair_id}.png"
        cv2.imwrite(str(path), moved)
        ls = geometry.apply(move, read_landmarks(pair.source_landmarks))
        lt = read_landmarks(pair.target_landmarks)
        n = min(len(ls), len(lt))
        ls, lt = ls[:n], lt[:n]
        m = prepare_pair(path, pair.target_image).to_original(np.eye(3))
        after.append(np.median(np.linalg.norm(geometry.apply(m, ls) - lt, axis=1)) / pair.diagonal)
        best = _rigid_fit(ls, lt)
        rigid.append(np.median(np.linalg.norm(geometry.apply(best, ls) - lt, axis=1)) / pair.diagonal)
        turn = np.degrees(np.arctan2(m[0, 1], m[0, 0]) - np.arctan2(best[0, 1], best[0, 0]))
        angle_errors.append(abs((turn + 180) % 360 - 180))
    assert sum(a <= 0.035 for a in after) >= 6
    assert max(angle_errors) < 5.0
    assert np.mean(after) < 1.25 * np.mean(rigid)


@pytest.mark.realdata
def test_anhir_mini_mirrored_sources_are_found_by_default(anhir_mini, tmp_path):
    """The issue's check on real pairs: every source mirrored (left-right or top-bottom), turned by any
    angle and rescaled by 0.85-1.2; with default settings the mirror is found on at least 11 of 12 and
    at least 10 of 12 succeed (the rigid stage keeps the scale, which alone costs a pair or two)."""
    from bench.pairs import load_table, read_landmarks

    rng = np.random.default_rng(1)
    found, success = 0, 0
    for pair in load_table(anhir_mini):
        src = cv2.imread(str(pair.source_image))
        h, w = src.shape[:2]
        mirror = np.diag([-1.0, 1.0, 1.0]) if rng.random() < 0.5 else np.diag([1.0, -1.0, 1.0])
        angle, scale = rng.uniform(-180, 180), rng.uniform(0.85, 1.2)
        centre = np.array([(w - 1) / 2, (h - 1) / 2])
        lin = geometry.rotation(angle) @ geometry.scaling(scale) @ mirror
        corners = geometry.apply(lin, np.array([[0, 0], [w, 0], [0, h], [w, h]]) - centre)
        size = np.ceil(corners.max(0) - corners.min(0)).astype(int)
        move = geometry.translation(*(size / 2)) @ lin @ geometry.translation(*-centre)
        glass = tuple(int(v) for v in np.median(src[:20, :20].reshape(-1, 3), axis=0))
        path = tmp_path / f"{pair.pair_id}.png"
        cv2.imwrite(str(path), cv2.warpAffine(src, move[:2], (int(size[0]), int(size[1])), borderValue=glass))
        ls = geometry.apply(move, read_landmarks(pair.source_landmarks))
        lt = read_landmarks(pair.target_landmarks)
        n = min(len(ls), len(lt))
        p = prepare_pair(path, pair.target_image)
        found += p.diagnostics["flipped"]
        err = np.linalg.norm(geometry.apply(p.to_original(np.eye(3)), ls[:n]) - lt[:n], axis=1)
        success += np.median(err) / pair.diagonal <= 0.035
    assert found >= 11 and success >= 10


def test_to_working_inverts_to_original():
    import numpy as np

    from bench import geometry
    from bench.method import ImageView
    from bench.preprocess import PreparedPair

    view = ImageView(np.zeros((10, 10), np.float32), np.ones((10, 10), bool))
    pp = PreparedPair(fixed=view, moving=view, source_scale=(0.5, 0.4), target_scale=(0.25, 0.3),
                      source_pre=geometry.rotation(20.0, (5, 5)))
    est = np.array([[1.1, 0.1, 3.0], [-0.05, 0.9, -2.0], [0, 0, 1]])
    assert np.allclose(pp.to_working(pp.to_original(est)), est, atol=1e-9)
