"""bench.quality: the acceptance checks the methods share (declared once) and the harness's quality score."""

from __future__ import annotations

import ast
import dataclasses
import doctest
from pathlib import Path

import cv2
import numpy as np
import pytest
from bench.datasets.synthetic import GeneratorConfig, generate_pair
from bench.methods.elastix import ElastixParams
from bench.methods.iterative import Iterative, IterativeParams
from bench.methods.sift import Sift, SiftParams
from bench.methods.surf import SurfParams

from bench import ImageView, RegistrationFailed, geometry, quality

SHARED = {f.name: f.default for f in dataclasses.fields(quality.AcceptanceParams)}
METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


def test_shared_checks_declared_once():
    assert set(SHARED) == {"min_scale", "max_scale", "max_anisotropy", "min_evidence", "evidence_sigma"}
    for params in (SiftParams, SurfParams, IterativeParams, ElastixParams):
        assert issubclass(params, quality.AcceptanceParams), params
        fields = {f.name: f.default for f in dataclasses.fields(params)}
        assert {k: fields[k] for k in SHARED} == SHARED  # flat: run.json and --set see them as the method's
        for cls in params.__mro__:  # no class but AcceptanceParams declares them again
            if cls is not quality.AcceptanceParams:
                assert not set(vars(cls).get("__annotations__", {})) & set(SHARED), cls
    # each method keeps its own values
    assert Sift(min_evidence=1.5).params.min_evidence == 1.5
    assert Iterative(max_scale=3.0).params.max_scale == 3.0 and Sift().params.max_scale == 2.0


def test_no_method_imports_private_helpers_of_another_module():
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench.methods."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


@pytest.mark.parametrize("name", ["bench.quality", "bench.methods._intensity"])
def test_doctests(name):
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------------------------------------
# generated views, built as the shared preprocessing builds them (see tests/test_classical.py)


def _view(rgb: np.ndarray, mask: np.ndarray) -> ImageView:
    gray = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gray[~mask] = 0.0
    return ImageView(gray, mask.astype(bool), rgb)


def _pair(seed: int, tissue: str, size: int = 400) -> tuple[ImageView, ImageView, np.ndarray]:
    cfg = GeneratorConfig(size=size, elastic_px=0.0, hole_probability=0.0, dust_probability=0.0,
                          max_rotation_deg=30.0, max_translation_frac=0.03)
    p = generate_pair(seed, tissue=tissue, source_stain="HE", target_stain="DAB", config=cfg)
    h, w = p.target_mask.shape
    shift = np.argwhere(p.target_mask).mean(0)[::-1] - np.argwhere(p.source_mask).mean(0)[::-1]
    pre = geometry.translation(*shift)
    rgb = cv2.warpAffine(p.source_rgb, pre[:2], (w, h), borderValue=(242, 242, 242))
    mask = cv2.warpAffine(p.source_mask.astype(np.uint8), pre[:2], (w, h), flags=cv2.INTER_NEAREST) > 0
    return _view(p.target_rgb, p.target_mask), _view(rgb, mask), p.true_matrix @ np.linalg.inv(pre)


@pytest.fixture(scope="module")
def pair():
    return _pair(5, "kidney-like")


@pytest.fixture(scope="module")
def other():
    return _pair(9, "lung-like")


def test_accept_passes_truth_and_refuses_degenerate_and_unrelated(pair, other):
    fixed, moving, truth = pair
    p = quality.AcceptanceParams()
    diag = quality.accept(fixed, moving, truth, p)
    assert diag["evidence_contrast"] >= p.min_evidence
    with pytest.raises(RegistrationFailed, match="degenerate"):
        quality.accept(fixed, moving, truth @ geometry.scaling(3.0), p)
    with pytest.raises(RegistrationFailed, match="shared structure"):
        quality.accept(fixed, other[1], np.eye(3), p)
    assert quality.accept(fixed, other[1], np.eye(3), quality.AcceptanceParams(min_evidence=0)) == {}


# ---------------------------------------------------------------------------------------------
# the harness's quality score


def _wrong(truth: np.ndarray, fixed: ImageView) -> dict[str, np.ndarray]:
    """Alignments well beyond the success threshold (0.035 of the diagonal): shifted, turned, mirrored."""
    ys, xs = np.nonzero(fixed.mask)
    c = (xs.mean(), ys.mean())
    d = 0.1 * np.hypot(*fixed.shape)
    mirror = geometry.translation(*c) @ geometry.scaling(-1.0, 1.0) @ geometry.translation(-c[0], -c[1])
    return {"shifted": geometry.translation(d, 0) @ truth, "turned": geometry.rotation(25, c) @ truth,
            "mirrored": mirror @ truth}


@pytest.mark.parametrize("which", ["pair", "other"])
def test_quality_ranks_the_right_alignment_first(which, request):
    fixed, moving, truth = request.getfixturevalue(which)
    good = quality.alignment_quality(fixed, moving, truth)
    assert good >= quality.LIKELY_FAILED_BELOW, f"right alignment scored {good:.3f}"
    for name, m in _wrong(truth, fixed).items():
        bad = quality.alignment_quality(fixed, moving, m)
        assert 0 <= bad < good, f"{name}: {bad:.3f} vs right {good:.3f}"
        assert bad < quality.LIKELY_FAILED_BELOW, f"{name} scored {bad:.3f}"


def test_quality_of_unrelated_tissue_and_degenerate_matrices(pair, other):
    fixed, _, _ = pair
    assert quality.alignment_quality(fixed, other[1], np.eye(3)) < quality.LIKELY_FAILED_BELOW
    assert quality.alignment_quality(fixed, pair[1], np.zeros((3, 3))) == 0.0
    assert quality.alignment_quality(fixed, pair[1], geometry.translation(5000, 0)) == 0.0  # no overlap
    assert quality.alignment_quality(fixed, pair[1], np.full((2, 3), np.nan)) == 0.0


def test_quality_is_a_property_of_the_alignment_not_the_frame(pair):
    """The same alignment in a frame twice as large scores about the same (the score works at a fixed
    analysis size)."""
    fixed, moving, truth = pair

    def up(v: ImageView) -> ImageView:
        h, w = v.shape
        return ImageView(cv2.resize(v.image, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR),
                         cv2.resize(v.mask.astype(np.uint8), (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST) > 0)

    s = geometry.translation(0.5, 0.5) @ geometry.scaling(2.0) @ geometry.translation(-0.25, -0.25)
    a = quality.alignment_quality(fixed, moving, truth)
    b = quality.alignment_quality(up(fixed), up(moving), s @ truth @ np.linalg.inv(s))
    assert abs(np.log(a / b)) < 0.25, (a, b)


def test_roc_auc_is_the_pairwise_ranking_probability():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=60), 1)  # ties included
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert quality.roc_auc(scores, labels) == pytest.approx(brute)
    fpr, tpr, _ = quality.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute)  # the curve's area is the same number
    assert quality.roc_auc([1.0, np.nan, 0.0], [True, True, False]) == 1.0  # NaN scores dropped


def test_elastix_ending_uses_the_shared_checks(pair, other):
    """elastix's ending (start/end metric with SimpleITK, keep the better, accept) runs without itk."""
    pytest.importorskip("SimpleITK")
    from bench.methods.elastix import Elastix

    fixed, moving, truth = pair
    est = Elastix()._checked(fixed, moving, truth, np.linalg.inv(truth), {})
    assert est.diagnostics["metric_end"] < est.diagnostics["metric_start"] and not est.diagnostics["kept_start"]
    assert est.diagnostics["evidence_contrast"] >= Elastix().params.min_evidence
    np.testing.assert_allclose(est.matrix, truth)
    with pytest.raises(RegistrationFailed, match="shared structure.*Mattes MI"):
        Elastix()._checked(fixed, other[1], np.eye(3), np.eye(3), {})


# ---------------------------------------------------------------------------------------------
# the harness's error estimate (a local re-alignment from the answer)


@pytest.mark.parametrize("which", ["pair", "other"])
def test_estimated_error_follows_the_true_error(which, request):
    """The estimate of the right alignment is small; an alignment moved by 2-5 % of the diagonal (either side of
    the 0.035 success threshold) is estimated at about that error; it is a fraction of the diagonal."""
    fixed, moving, truth = request.getfixturevalue(which)
    diag = np.hypot(*fixed.shape)
    assert quality.estimated_error(fixed, moving, truth) < 0.01
    for frac, (dx, dy) in ((0.02, (1, 0)), (0.05, (0, 1)), (0.04, (0.6, -0.8))):
        off = geometry.translation(frac * diag * dx, frac * diag * dy) @ truth
        est = quality.estimated_error(fixed, moving, off)
        assert abs(est - frac) < 0.01, f"moved by {frac}: estimated {est:.4f}"


def test_estimated_error_without_tissue_is_nan(pair):
    fixed, moving, truth = pair
    away = geometry.translation(10 * fixed.shape[1], 0) @ truth  # the moving tissue leaves the frame
    assert np.isnan(quality.estimated_error(fixed, moving, away))


def test_runs_write_the_error_estimate_of_affine_rows_when_asked(tiny_table):
    """``error_estimate`` on every ok affine row of a run that asks for it (recorded in run.json), close to the
    row's rTRE; absent from nonrigid rows and from runs that skip it (``--no-error-estimate``)."""
    import json

    import pandas as pd

    from bench.plan import RunConfig, estimate_by_default, make_plan
    from bench.runner import run

    assert not estimate_by_default()  # the suite's conftest turns the default off (HISTREG_BENCH_ERROR_ESTIMATE=0)
    frames = {}
    for on in (True, False):
        out = tiny_table.parent / f"run-{on}"
        run(make_plan(RunConfig(dataset=tiny_table, methods="preprocessed,sift,preprocessed>demons", device="cpu",
                                cache_enabled=False, out=out, error_estimate=on, limit=2)))
        frames[on] = pd.read_csv(out / "results.csv")
        assert json.loads((out / "run.json").read_text())["error_estimate"] is on
    on, off = frames[True], frames[False]
    affine = on[on.method.isin(["preprocessed", "sift"]) & (on.status == "ok")]
    assert len(affine) == 4 and affine.error_estimate.notna().all()
    assert (affine.error_estimate - affine.rtre_median).abs().max() < 0.01
    assert on[on.method == "preprocessed>demons"].error_estimate.isna().all()
    assert off.error_estimate.isna().all()
    same = ["pair_id", "method", "status", "rtre_median", "matrix", "quality", "success"]
    diff = [c for c in same if not off[c].equals(on[c])]
    assert not diff, diff  # the estimate changes nothing else


def test_estimated_error_does_not_depend_on_the_thread_count(pair):
    """Serial runs give their worker every thread, parallel ones one each: the estimate must not follow."""
    import torch

    fixed, moving, truth = pair
    off = geometry.translation(9.0, -6.0) @ truth
    before = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2):
            torch.set_num_threads(n)
            values.append(quality.estimated_error(fixed, moving, off))
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(before)
    assert values[0] == values[1]
