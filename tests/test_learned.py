"""The learned method: architecture, theta <-> pixel matrices, training step, weight files, shipped weights."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import Context, ImageView, geometry  # noqa: E402
from bench.learning import model as M  # noqa: E402


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(0)
    return M.build_model("compact").eval()


def smooth_image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random (H, W) float32 image in [0, 1], background-free."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 4.0)
    return (img - img.min()) / (img.max() - img.min())


def test_parameter_counts():
    assert M.count_parameters(M.build_model("compact")) == 1_055_910
    n_paper = M.count_parameters(M.build_model("paper"))
    assert 29_000_000 < n_paper < 32_000_000  # "slightly above 30 million" in the paper


@pytest.mark.parametrize("shape", [(224, 224), (300, 700), (512, 448), (100, 90)])
def test_compact_shapes_and_identity_at_init(compact, shape):
    src = torch.rand(1, 1, *shape)
    tgt = torch.rand(1, 1, *shape)
    with torch.inference_mode():
        theta = compact(src, tgt)
    assert theta.shape == (1, 2, 3)
    np.testing.assert_allclose(theta[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(M.theta_to_matrix(theta[0].numpy(), shape, shape), np.eye(3), atol=1e-6)


def test_grid_and_dynamic_convolutions(compact):
    assert compact.grid_shape((300, 700)) == (2, 4)
    assert compact.grid_shape((224, 224), (225, 100)) == (2, 1)
    assert compact.n_grid_convs((1, 1)) == 1
    assert compact.n_grid_convs((2, 4)) == 2  # receptive field 5 >= 4 patches
    assert compact.n_grid_convs((9, 3)) == 4
    patches = compact.unfold(torch.ones(1, 1, 300, 700), (448, 896))
    assert patches.shape == (8, 1, 224, 224)
    assert float(patches.sum()) == 300 * 700  # zero padding only


def test_different_shapes_and_no_batchnorm(compact):
    with torch.inference_mode():
        theta = compact(torch.rand(1, 1, 250, 500), torch.rand(1, 1, 230, 520))
    assert theta.shape == (1, 2, 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in compact.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in compact.modules())


def test_paper_config_tiny_forward():
    model = M.build_model("paper").eval()
    with torch.inference_mode():
        theta = model(torch.rand(1, 1, 224, 224), torch.rand(1, 1, 200, 224))
    np.testing.assert_allclose(theta[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-6)


@pytest.mark.parametrize(("src_shape", "tgt_shape"), [((120, 160), (120, 160)), ((110, 150), (130, 170))])
def test_theta_matches_cv2_warp_affine(src_shape, tgt_shape):
    image = smooth_image(1, src_shape)
    h, w = tgt_shape
    matrix = geometry.translation(6.5, -3.0) @ geometry.rotation(12, ((w - 1) / 2, (h - 1) / 2)) @ geometry.scaling(1.1)
    expected = cv2.warpAffine(image, matrix[:2], (w, h), flags=cv2.INTER_LINEAR)
    theta = M.matrix_to_theta(matrix, src_shape, tgt_shape)
    got = M.warp(torch.from_numpy(image)[None, None], torch.from_numpy(theta).float()[None], tgt_shape)[0, 0]
    inside = cv2.erode(cv2.warpAffine(np.ones(src_shape, np.uint8), matrix[:2], (w, h)), np.ones((5, 5)))
    assert inside.sum() > 0.3 * h * w
    np.testing.assert_allclose(got.numpy()[inside > 0], expected[inside > 0], atol=2e-3)
    np.testing.assert_allclose(M.theta_to_matrix(theta, src_shape, tgt_shape), matrix, atol=1e-9)


def test_training_steps_lower_the_loss():
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    from bench.learning.train import pair_loss

    pair = generate_pair(5, config=GeneratorConfig(size=224))
    fixed = 1.0 - cv2.cvtColor(pair.target_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    h, w = fixed.shape
    shift = geometry.translation(9, -6) @ geometry.rotation(6, ((w - 1) / 2, (h - 1) / 2))
    moving = cv2.warpAffine(fixed, shift[:2], (w, h))
    mv, fx = (torch.from_numpy(a)[None, None] for a in (moving, fixed))
    torch.manual_seed(0)
    model = M.build_model("compact")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, _ = pair_loss(model, mv, fx)
    for _ in range(5):
        opt.zero_grad()
        loss, _ = pair_loss(model, mv, fx)
        loss.backward()
        opt.step()
    last, _ = pair_loss(model, mv, fx)
    assert float(last.detach()) < float(first.detach()) - 1e-3


def test_save_load_round_trip_and_wrong_architecture(tmp_path, compact):
    path = M.save_weights(compact, tmp_path / "w.pt", {"note": "test"})
    loaded, meta = M.load_weights(path, expected_config="compact")
    assert meta == {"note": "test"}
    x, y = torch.rand(1, 1, 230, 300), torch.rand(1, 1, 230, 300)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, y), compact(x, y))
    with pytest.raises(ValueError, match="'compact'.*expected 'paper'"):
        M.load_weights(path, expected_config="paper")
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["grid_channels"] = 64  # declared architecture no longer fits the tensors
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        M.load_weights(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        M.load_weights(tmp_path / "missing.pt")


def test_shipped_weights_give_a_finite_matrix():
    from bench.methods.learned import SHIPPED_WEIGHTS, Learned

    if not SHIPPED_WEIGHTS.exists():
        pytest.fail(f"shipped weights missing: {SHIPPED_WEIGHTS}")
    method = Learned()
    method.prepare(Context())
    fixed = smooth_image(3, (200, 260))
    moving = cv2.warpAffine(fixed, geometry.translation(5, 3)[:2], (260, 200))
    views = [ImageView(image=a, mask=a > 0.2) for a in (fixed, moving)]
    est = method.estimate(views[0], views[1], Context())
    assert est.matrix.shape == (3, 3) and np.all(np.isfinite(est.matrix))
    assert est.diagnostics["config"] == "compact" and est.diagnostics["n_patches"] >= 1
    again = method.estimate(views[0], views[1], Context())
    np.testing.assert_array_equal(again.matrix, est.matrix)  # deterministic on CPU


def test_train_command_checkpoints_and_resumes(tmp_path):
    from bench.learning import config, train

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--n-train", "2", "--n-val", "1", "--size", "240", "--input-size", "224",
                              "--epochs", "1", "--real-batch", "2", "--out", str(tmp_path / "run")])
    assert train.run(args) == 0
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "loss.png").exists()
    args.epochs, args.resume = 2, True
    assert train.run(args) == 0
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and [h["epoch"] for h in ck["history"]] == [0, 1, 2]
    model, meta = M.load_weights(tmp_path / "run" / "weights.pt", expected_config="compact")
    assert meta["data"]["n_train"] == 2 and np.isfinite(meta["final"]["train_loss"])


@pytest.mark.parametrize("crop", [0.0, 1.0])
def test_augmentation_moves_images_and_landmarks_alike(crop):
    """A bright dot at a landmark ends where the returned augmentation matrix puts the landmark."""
    from bench.learning import data as D

    h, w = 120, 160
    img = np.zeros((h, w), np.float32)
    point = np.array([[70.0, 50.0]])
    img = cv2.GaussianBlur(cv2.circle(img, (70, 50), 3, 1.0, -1), (0, 0), 2.0)
    mask = np.zeros((h, w), bool)
    mask[20:100, 30:130] = True
    pair = D.CachedPair("dot", img, img.copy(), np.ones((h, w), bool), mask, point, point)
    cfg = D.AugmentConfig(max_rotation_deg=10, scale_range=(0.9, 1.1), max_shear=0.03, max_translation_frac=0.03,
                          crop_probability=crop, crop_range=(0.6, 0.8))
    for seed in range(5):
        mv, fx, (a_m, a_f) = D.to_tensors(pair, np.random.default_rng(seed), cfg)
        if crop:
            assert mv.shape[-2] < h and mv.shape[-1] < w
        for tensor, a in ((mv, a_m), (fx, a_f)):
            arr = tensor[0, 0].numpy()
            y, x = np.unravel_index(np.argmax(arr), arr.shape)
            expected = geometry.apply(a, point)[0]
            assert np.hypot(x - expected[0], y - expected[1]) <= 1.5, (seed, (x, y), expected)


def test_guard_keeps_the_start_when_the_prediction_lowers_the_objective(tmp_path):
    """A network that always predicts a large shift: guarded, the method returns the identity instead."""
    import torch
    from bench.methods.learned import Learned

    net = M.build_model("compact")
    with torch.no_grad():
        net.out.bias.copy_(torch.tensor([1.0, 0.0, 0.3, 0.0, 1.0, 0.0]))  # a constant 15 % shift
    path = M.save_weights(net, tmp_path / "shift.pt", {"data": {"input_size": 128}})
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), 2.0)
    view = ImageView(img, np.ones(img.shape, bool), None)
    plain = Learned(weights=str(path)).estimate(view, view, Context())
    guarded = Learned(weights=str(path), guard=True).estimate(view, view, Context())
    assert abs(plain.matrix[0, 2]) > 5  # the bad prediction itself
    np.testing.assert_allclose(guarded.matrix, np.eye(3), atol=1e-9)
    d = guarded.diagnostics
    assert d["kept_start"] and d["ncc_predicted"] < d["ncc_identity"]


def test_common_view_is_the_intersection_less_a_rim():
    from bench.learning.data import common_view

    a = np.zeros((40, 50), bool)
    a[5:35, 10:45] = True
    b = np.zeros((40, 50), bool)
    b[0:30, 0:40] = True
    got = common_view(a, b.astype(np.float32))
    inside = a & b
    assert got.sum() > 0 and not np.any(got & ~inside)  # never outside either field of view
    assert got[10:29, 11:39].all() and not got[5, 20] and not got[29, 20]  # rim of one pixel removed


def test_learned_gives_both_inputs_the_same_frame_edges(monkeypatch):
    """A moving image whose field of view misses a band: both network inputs are zero there with ``fov``."""
    from bench.methods.learned import Learned

    img = smooth_image(4, (120, 160)) + 0.1
    valid = np.ones(img.shape, bool)
    valid[:, :40] = False  # the source's frame ends at x = 40 after the initial transform
    moving = ImageView(np.where(valid, img, 0.0).astype(np.float32), valid.copy(), None, valid)
    fixed = ImageView(img.astype(np.float32), np.ones(img.shape, bool), None)
    seen = {}

    def spy(self, mv, fx):
        seen["inputs"] = (mv.copy(), fx.copy())
        return np.eye(3), np.array([[1.0, 0, 0], [0, 1.0, 0]])

    monkeypatch.setattr(Learned, "_predict", spy)
    for fov in (True, False):
        Learned(fov=fov, input_size=160).estimate(fixed, moving, Context())
        mv, fx = seen["inputs"]
        assert not mv[:, :40].any()
        assert (not fx[:, :40].any()) == fov  # the fixed image's matching band is cut only with fov
        assert fx[:, 45:].all() and mv[:, 45:].all()


def test_symmetric_inference_is_inverse_consistent():
    """``symmetric``: swapping the inputs gives the inverse matrix, two identical images the identity; the
    plain forward pass (the paper's) has neither property with the shipped weights."""
    from bench.methods.learned import Learned

    a = smooth_image(6, (150, 200)) + 0.1
    b = cv2.warpAffine(a, np.array([[1.05, 0.03, -4.0], [-0.02, 0.97, 3.0]]), (200, 150))
    view = lambda img: ImageView(img.astype(np.float32), img > 0.05, None)  # noqa: E731
    fixed, moving = view(a), view(b)
    m = Learned(symmetric=True)
    ab = m.estimate(fixed, moving, Context()).matrix
    ba = m.estimate(moving, fixed, Context()).matrix
    np.testing.assert_allclose(ab @ ba, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(m.estimate(fixed, view(a), Context()).matrix, np.eye(3), atol=1e-9)
    plain = Learned()
    assert not np.allclose(plain.estimate(fixed, moving, Context()).matrix @ plain.estimate(moving, fixed, Context()).matrix,
                           np.eye(3), atol=1e-6)


def test_preprocessing_records_the_moving_field_of_view(tmp_path):
    """The moving view's ``valid`` is the warped source frame; the cache keeps it."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    from bench.cache import PreprocessCache
    from bench.preprocess import PreprocessParams, prepare_pair

    pair = generate_pair(3, config=GeneratorConfig(size=300))
    h, w = pair.target_rgb.shape[:2]
    src = pair.target_rgb[: h // 2]  # the source scan shows only the upper half of the section
    paths = [tmp_path / "s.png", tmp_path / "t.png"]
    for p, rgb in zip(paths, (src, pair.target_rgb), strict=True):
        cv2.imwrite(str(p), rgb[..., ::-1])
    prepared = prepare_pair(*paths, PreprocessParams(rotation=False, translation_search=False, scale_hint=False))
    valid = prepared.moving.valid
    assert valid is not None and valid.shape == prepared.fixed.shape and prepared.fixed.valid is None
    frac = valid.mean()
    assert 0.4 < frac < 0.6, frac
    cache = PreprocessCache(tmp_path / "cache")
    params = PreprocessParams(rotation=False, translation_search=False, scale_hint=False)
    first, hit1 = cache.get_or_prepare(*paths, params)
    again, hit2 = cache.get_or_prepare(*paths, params)
    assert (hit1, hit2) == (False, True) and np.array_equal(again.moving.valid, first.moving.valid)


def test_weighted_ncc_ignores_what_the_weight_excludes():
    from bench.learning.train import ncc

    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random((1, 1, 30, 40)).astype(np.float32))
    b = a.clone()
    b[..., :, 25:] = torch.from_numpy(rng.random((1, 1, 30, 15)).astype(np.float32))  # unrelated right part
    w = torch.zeros_like(a)
    w[..., :, :25] = 1.0
    assert float(ncc(a, b)) < 0.9
    assert float(ncc(a, b, weight=w)) == pytest.approx(1.0, abs=1e-5)
    assert float(ncc(a[..., :25], b[..., :25])) == pytest.approx(float(ncc(a, b, weight=w)), abs=1e-5)


def test_cut_augmentation_cuts_images_and_returns_loss_weights():
    from bench.learning import data as D

    img = smooth_image(6, (100, 140)) + 0.1
    pair = D.CachedPair("cut", img, img.copy(), np.ones(img.shape, bool), np.ones(img.shape, bool))
    cfg = D.AugmentConfig(max_rotation_deg=0, scale_range=(1, 1), max_shear=0, max_translation_frac=0,
                          cut_probability=1.0, cut_range=(0.6, 0.7))
    mv, fx, _, weights = D.to_tensors(pair, np.random.default_rng(0), cfg, with_weights=True)
    assert weights is not None
    for image, weight in zip((mv, fx), weights, strict=True):
        inside = weight[0, 0].numpy() > 0.5
        assert 0.3 < inside.mean() < 0.55
        outside = weight[0, 0].numpy() < 1e-3
        assert outside.mean() > 0.4 and np.abs(image[0, 0].numpy()[outside]).max() < 1e-3  # cut away
    assert not np.array_equal(weights[0].numpy(), weights[1].numpy())  # two independent frames
    plain = D.to_tensors(pair, np.random.default_rng(0), D.AugmentConfig(), with_weights=True)
    assert plain[3] is None
