"""The synthetic stain-pair generator and the embedded sample: determinism, exact ground truth, layout."""

from __future__ import annotations

import csv
from pathlib import Path

import bench.datasets.sample as sample
import cv2
import numpy as np
import pytest
from bench.datasets.synthetic import (
    STAINS,
    TISSUES,
    GeneratorConfig,
    dataset_plan,
    generate_pair,
    write_dataset,
)

from bench.cachedir import CACHE_ENV
from bench.geometry import apply
from bench.pairs import load_table, read_landmarks

SMALL = GeneratorConfig(size=320, n_landmarks=25)
RIGID = GeneratorConfig(size=320, n_landmarks=25, elastic_px=0.0)


def _gray_inverted(rgb: np.ndarray) -> np.ndarray:
    return 255.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def test_same_seed_same_pair_other_seed_other_pair():
    a, b = generate_pair(7, config=SMALL), generate_pair(7, config=SMALL)
    for name in ("source_rgb", "target_rgb", "source_landmarks", "target_landmarks", "true_matrix"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.tissue, a.source_stain, a.target_stain) == (b.tissue, b.source_stain, b.target_stain)
    c = generate_pair(8, config=SMALL)
    assert c.target_rgb.shape != a.target_rgb.shape or not np.array_equal(c.target_rgb, a.target_rgb)
    assert not np.allclose(c.true_matrix, a.true_matrix)


@pytest.mark.parametrize("tissue", TISSUES)
def test_landmarks_exact_without_elastic_part(tissue):
    p = generate_pair(11, tissue=tissue, config=RIGID)
    assert p.source_landmarks.shape == p.target_landmarks.shape == (RIGID.n_landmarks, 2)
    err = np.linalg.norm(apply(p.true_matrix, p.source_landmarks) - p.target_landmarks, axis=1)
    assert err.max() < 1e-6


@pytest.mark.parametrize("tissue", TISSUES)
def test_elastic_part_is_small_but_present(tissue):
    p = generate_pair(12, tissue=tissue, config=SMALL)
    err = np.linalg.norm(apply(p.true_matrix, p.source_landmarks) - p.target_landmarks, axis=1)
    assert err.max() <= np.sqrt(2) * SMALL.elastic_px + 1e-6
    assert err.max() > 0.1


@pytest.mark.parametrize("tissue", TISSUES)
def test_landmarks_lie_on_tissue_inside_both_images(tissue):
    p = generate_pair(13, tissue=tissue, config=SMALL)
    for rgb, mask, pts in ((p.source_rgb, p.source_mask, p.source_landmarks),
                           (p.target_rgb, p.target_mask, p.target_landmarks)):
        h, w = rgb.shape[:2]
        assert mask.shape == (h, w)
        assert np.all(pts >= 0) and np.all(pts[:, 0] <= w - 1) and np.all(pts[:, 1] <= h - 1)
        xi, yi = np.rint(pts).astype(int).T
        assert mask[yi, xi].mean() >= 0.95


@pytest.mark.parametrize("tissue", TISSUES)
@pytest.mark.parametrize("config", [RIGID, SMALL], ids=["rigid", "elastic"])
def test_image_content_moves_with_the_landmarks(tissue, config):
    """Warping the source by the true matrix overlays its tissue on the target's (other stain)."""
    p = generate_pair(14, tissue=tissue, config=config)
    h, w = p.target_rgb.shape[:2]
    sigma = 1.0 if config.elastic_px == 0 else 3.0  # the elastic part shifts fine texture by a few px
    src = cv2.GaussianBlur(_gray_inverted(p.source_rgb), (0, 0), sigma)
    tgt = cv2.GaussianBlur(_gray_inverted(p.target_rgb), (0, 0), sigma)
    warped = cv2.warpAffine(src, p.true_matrix[:2], (w, h))
    unwarped = cv2.resize(src, (w, h))
    aligned, misaligned = _ncc(warped, tgt, p.target_mask), _ncc(unwarped, tgt, p.target_mask)
    assert aligned > 0.4
    assert aligned > misaligned + 0.25
    warped_mask = cv2.warpAffine(p.source_mask.astype(np.uint8), p.true_matrix[:2], (w, h)) > 0
    overlap = (warped_mask & p.target_mask).sum() / (warped_mask | p.target_mask).sum()
    assert overlap > 0.9


def test_transforms_span_large_rotations_and_the_scale_range():
    mats = [generate_pair(s, config=GeneratorConfig(size=160, n_landmarks=5)).true_matrix for s in range(12)]
    angles = [np.degrees(np.arctan2(m[1, 0], m[0, 0])) for m in mats]
    scales = [np.sqrt(abs(np.linalg.det(m[:2, :2]))) for m in mats]
    assert max(abs(a) for a in angles) > 90
    assert min(angles) < 0 < max(angles)
    lo, hi = GeneratorConfig().scale_range
    assert all(1 / hi / 1.1 < s < 1 / lo * 1.1 for s in scales)


def test_stains_look_different_and_background_is_light_glass():
    means = {}
    for stain in STAINS:
        p = generate_pair(15, tissue="kidney-like", target_stain=stain, config=SMALL)
        inner = cv2.erode(p.target_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        means[stain] = p.target_rgb[inner].astype(float).mean(0)
        glass = ~cv2.dilate(p.target_mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert 225 <= np.median(p.target_rgb[glass]) <= 250
        assert p.target_stain == stain and p.source_stain != stain
    for i, a in enumerate(STAINS):
        for b in STAINS[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) > 12, (a, b, means[a], means[b])


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown tissue"):
        generate_pair(0, tissue="liver", config=SMALL)
    with pytest.raises(ValueError, match="unknown source_stain"):
        generate_pair(0, source_stain="Ki67", config=SMALL)


def test_write_dataset_in_anhir_layout(tmp_path):
    config = GeneratorConfig(size=192, n_landmarks=10)
    table = write_dataset(tmp_path / "a", 5, seed=3, config=config, workers=3)
    pairs = load_table(table)
    assert len(pairs) == 5
    assert [p.tissue for p in pairs] == [t for t, *_ in dataset_plan(5, 3)]
    assert [p.tissue for p in pairs][:4] == list(TISSUES)
    for pair in pairs:
        assert pair.problem is None and pair.status == "training"
        assert pair.source_image.parent.name == "scale-100pc"
        assert pair.source_image.stem != pair.target_image.stem
        assert read_landmarks(pair.source_landmarks).shape == read_landmarks(pair.target_landmarks).shape == (10, 2)
        h, w = cv2.imread(str(pair.target_image)).shape[:2]
        assert pair.target_size == (h, w) and pair.diagonal == pytest.approx(np.hypot(h, w), abs=0.01)
    with table.open() as fh:
        header = next(csv.reader(fh))
    assert header[0] == "" and header[-1] == "status"
    again = write_dataset(tmp_path / "b", 5, seed=3, config=config, workers=1)
    assert again.read_bytes() == table.read_bytes()
    for path in (pairs[0].source_landmarks, pairs[-1].source_image, pairs[-1].target_image):
        assert (again.parent / path.relative_to(table.parent)).read_bytes() == path.read_bytes()


def test_write_dataset_prefix_names_sets_and_tissues(tmp_path):
    table = write_dataset(tmp_path, 2, seed=1, config=GeneratorConfig(size=160, n_landmarks=5), prefix="synth-")
    assert [p.tissue for p in load_table(table)] == ["synth-" + TISSUES[0], "synth-" + TISSUES[1]]


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    sample.sample_table(cache)
    return cache


@pytest.mark.slow
def test_sample_has_enough_pairs_tissues_and_stains(sample_cache):
    table = sample.sample_table(sample_cache)
    pairs = load_table(table)
    assert len(pairs) >= 24
    assert len({p.tissue for p in pairs}) >= 3
    assert len({p.source_image.stem for p in pairs} | {p.target_image.stem for p in pairs}) >= 3
    assert all(p.scorable and p.problem is None for p in pairs)
    assert (table.parent / sample.MANIFEST).is_file()
    assert table.parent.name == sample.sample_key()


@pytest.mark.slow
def test_sample_is_reused_not_regenerated(sample_cache, monkeypatch):
    table = sample.sample_table(sample_cache)
    stamp = table.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached sample was regenerated")

    monkeypatch.setattr(sample, "write_dataset", must_not_run)
    assert sample.sample_table(sample_cache) == table
    assert table.stat().st_mtime_ns == stamp


def test_sample_cache_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert sample.sample_dir() == tmp_path / sample.sample_key()
    assert sample.sample_dir(tmp_path / "x") == tmp_path / "x" / sample.sample_key()


def test_interrupted_generation_leaves_no_half_dataset(tmp_path, monkeypatch):
    real = sample.write_dataset

    def interrupted(folder, n_pairs, seed, config):
        real(folder, 1, seed, GeneratorConfig(size=128, n_landmarks=5))
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "write_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample.sample_table(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_refresh_regenerates(tmp_path, monkeypatch):
    real = sample.write_dataset
    calls = []

    def small(folder, n_pairs, seed, config):
        calls.append(folder)
        return real(folder, len(calls), seed, GeneratorConfig(size=128, n_landmarks=5))

    monkeypatch.setattr(sample, "write_dataset", small)
    first = sample.sample_table(tmp_path)
    assert len(load_table(first)) == 1
    assert sample.sample_table(tmp_path) == first and len(calls) == 1
    second = sample.sample_table(tmp_path, refresh=True)
    assert second == first and len(load_table(second)) == 2
    assert [p.name for p in tmp_path.iterdir()] == [sample.sample_key()]


def test_config_refuses_impossible_settings():
    with pytest.raises(ValueError, match="elastic_px"):
        GeneratorConfig(size=90, elastic_px=3.0)
    with pytest.raises(ValueError, match="scale_range"):
        GeneratorConfig(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="size"):
        GeneratorConfig(size=32)


def test_elastic_inverse_solves_the_forward_map():
    from bench.datasets.synthetic.deform import _Elastic

    rng = np.random.default_rng(0)
    elastic = _Elastic.random(rng, bound=6.0, size=200)
    p = rng.uniform(0, 200, (50, 2))
    q = elastic.invert(p)
    dx, dy = elastic(q[:, 0], q[:, 1])
    np.testing.assert_allclose(q + np.stack([dx, dy], 1), p, atol=1e-8)
    assert np.abs(q - p).max() > 0.5
