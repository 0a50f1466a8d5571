"""The on-disk cache of prepared pairs: hits equal fresh results; content, parameters and version key it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import cache as cache_mod
from bench import geometry
from bench.cache import PreprocessCache, cache_key, default_folder
from bench.cachedir import CACHE_ENV, cache_root
from bench.preprocess import PreprocessParams


def _blobs(seed: int, shape=(160, 200)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 236, np.uint8)
    for _ in range(30):
        c = (int(rng.uniform(0.25, 0.75) * shape[1]), int(rng.uniform(0.25, 0.75) * shape[0]))
        cv2.circle(img, c, int(rng.uniform(3, 12)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return cv2.GaussianBlur(img, (0, 0), 1.0)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    tgt = _blobs(1)
    src = cv2.warpAffine(tgt, geometry.rotation(25, (100, 80))[:2], (200, 160), borderValue=(236, 236, 236))
    s, t = tmp_path / "s.png", tmp_path / "t.png"
    cv2.imwrite(str(s), src)
    cv2.imwrite(str(t), tgt)
    return s, t


def _same(a, b) -> None:
    for role in ("fixed", "moving"):
        va, vb = getattr(a, role), getattr(b, role)
        np.testing.assert_array_equal(va.image, vb.image)
        np.testing.assert_array_equal(va.mask, vb.mask)
        np.testing.assert_array_equal(va.rgb, vb.rgb)
        assert va.image.dtype == vb.image.dtype and va.mask.dtype == vb.mask.dtype
    np.testing.assert_array_equal(a.source_pre, b.source_pre)
    assert a.source_scale == b.source_scale and a.target_scale == b.target_scale
    assert a.source_shape == b.source_shape and a.target_shape == b.target_shape
    np.testing.assert_array_equal(a.to_original(np.eye(3)), b.to_original(np.eye(3)))


@pytest.mark.parametrize("full", [True, False])
def test_second_call_hits_and_equals_the_first(tmp_path, pair, full):
    cache = PreprocessCache(tmp_path / "cache")
    params = PreprocessParams(working_size=150)
    first, hit1 = cache.get_or_prepare(*pair, params, full)
    second, hit2 = cache.get_or_prepare(*pair, params, full)
    assert (hit1, hit2) == (False, True)
    _same(first, second)
    assert second.diagnostics["cache_hit"] is True
    assert second.diagnostics["time_s"] == first.diagnostics["time_s"]  # the original compute time


def test_key_depends_on_content_params_version_and_stage(tmp_path, pair, monkeypatch):
    s, t = pair
    p = PreprocessParams()
    key = cache_key(s, t, p, True)
    assert cache_key(s, t, p, True) == key
    assert cache_key(s, t, p, False) != key
    assert cache_key(s, t, PreprocessParams(angle_step_deg=4.0), True) != key
    assert cache_key(t, s, p, True) != key
    copy = tmp_path / "copy.png"
    copy.write_bytes(s.read_bytes())
    assert cache_key(copy, t, p, True) == key  # content, not path
    monkeypatch.setattr(cache_mod, "STAGE_VERSION", "999")
    assert cache_key(s, t, p, True) != key
    monkeypatch.undo()
    assert cache_key(s, t, p, True) == key
    monkeypatch.setattr(cache_mod, "stage_fingerprint", lambda: "0" * 64)  # other code or libraries
    assert cache_key(s, t, p, True) != key


def test_stage_fingerprint_follows_the_stage_code_only(tmp_path, monkeypatch):
    """Hidden state across versions (issue 20): an edit anywhere in the code the stage runs, inside its package
    or in a module it imports (image loading), changes the fingerprint, so the cache misses; an edit elsewhere
    does not."""
    import shutil

    from bench.preprocess import fingerprint as fp

    mods = fp.stage_modules()
    assert {"bench.preprocess.stage", "bench.preprocess.flip", "bench.imageio", "bench.imaging"} <= set(mods)
    assert not {"bench", "bench.runner", "bench.cache", "bench.report"} & set(mods)
    copy = tmp_path / "bench"
    shutil.copytree(fp._ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def fingerprint_of(root: Path) -> str:
        monkeypatch.setattr(fp, "_ROOT", root)
        fp.stage_fingerprint.cache_clear()
        try:
            return fp.stage_fingerprint()
        finally:
            fp.stage_fingerprint.cache_clear()

    base = fingerprint_of(copy)
    assert fingerprint_of(copy) == base
    with (copy / "runner.py").open("a") as fh:
        fh.write("# an edit outside the stage\n")
    assert fingerprint_of(copy) == base
    for module in ("imageio.py", "preprocess/flip.py"):
        text = (copy / module).read_text()
        (copy / module).write_text(text + "# an edit of the stage's code\n")
        assert fingerprint_of(copy) != base, module
        (copy / module).write_text(text)
        assert fingerprint_of(copy) == base
    monkeypatch.setattr(fp, "library_versions", lambda: {"numpy": "0.0"})
    assert fingerprint_of(copy) != base


def test_changed_file_or_parameter_recomputes(tmp_path, pair):
    cache = PreprocessCache(tmp_path / "cache")
    s, t = pair
    cache.get_or_prepare(s, t, PreprocessParams(), True)
    assert cache.get_or_prepare(s, t, PreprocessParams(angle_step_deg=10.0), True)[1] is False
    cv2.imwrite(str(s), cv2.flip(cv2.imread(str(s)), 0))  # same path, new content
    fresh, hit = cache.get_or_prepare(s, t, PreprocessParams(), True)
    assert hit is False
    assert cache.get_or_prepare(s, t, PreprocessParams(), True)[1] is True


def test_disabled_cache_never_reads_or_writes(tmp_path, pair):
    folder = tmp_path / "cache"
    cache = PreprocessCache(folder, enabled=False)
    for _ in range(2):
        assert cache.get_or_prepare(*pair, PreprocessParams(), True)[1] is False
    assert not folder.exists() or not any(folder.rglob("*"))


def test_clear_removes_entries(tmp_path, pair):
    folder = tmp_path / "cache"
    cache = PreprocessCache(folder)
    cache.get_or_prepare(*pair, PreprocessParams(), True)
    cache.get_or_prepare(*pair, PreprocessParams(), False)
    assert len(list(folder.rglob("*.json"))) == 2 and len(list(folder.rglob("*.npz"))) == 2
    assert not list(folder.rglob("*.tmp"))  # atomic writes leave no temporaries
    assert cache.clear() == 2
    assert not list(folder.rglob("*.npz")) and not list(folder.rglob("*.json"))
    assert cache.get_or_prepare(*pair, PreprocessParams(), True)[1] is False


def test_damaged_entry_is_recomputed(tmp_path, pair):
    folder = tmp_path / "cache"
    cache = PreprocessCache(folder)
    first, _ = cache.get_or_prepare(*pair, PreprocessParams(), True)
    npz = next(folder.rglob("*.npz"))
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    again, hit = cache.get_or_prepare(*pair, PreprocessParams(), True)
    assert hit is False
    _same(first, again)
    assert cache.get_or_prepare(*pair, PreprocessParams(), True)[1] is True


def test_bad_image_is_not_cached(tmp_path, pair):
    cache = PreprocessCache(tmp_path / "cache")
    s, _ = pair
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(Exception, match="bad.png"):
        cache.get_or_prepare(s, bad, PreprocessParams(), True)
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTREG_BENCH_CACHE", str(tmp_path / "here"))
    assert default_folder() == tmp_path / "here" / "preprocess"
    assert PreprocessCache().folder == tmp_path / "here" / "preprocess"
    monkeypatch.delenv("HISTREG_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "xdg" / "histreg-bench" / "preprocess"


def test_one_cache_folder_for_the_sample_and_the_preprocessing_cache(monkeypatch, tmp_path):
    from bench.datasets import sample

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "one"))
    assert cache_root() == tmp_path / "one"
    assert sample.sample_dir().parent == cache_mod.default_folder().parent == tmp_path / "one"


def test_the_suite_never_uses_the_users_cache():
    """tests/conftest.py sets the variable for the session, for this process and the ones it starts."""
    import os
    import subprocess
    import sys

    folder = Path(os.environ["HISTREG_BENCH_CACHE"])
    assert "histreg-bench-tests-" in folder.name
    assert cache_mod.default_folder().is_relative_to(folder)
    code = "from bench import cache; print(cache.default_folder())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert Path(out.stdout.strip()).is_relative_to(folder)
