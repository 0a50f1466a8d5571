"""Shared fixtures: tiny ANHIR-layout datasets written per test, and the real data when present."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import geometry
from bench.cachedir import CACHE_ENV
from bench.pairs import write_landmarks
from bench.plan import ESTIMATE_ENV

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "anhir-mini"
_CACHE_KEY = pytest.StashKey[tuple]()


def pytest_configure(config: pytest.Config) -> None:
    """The suite never touches the user's cache: one fresh cache folder for the session, in the environment
    before any test runs, so the library, xdist workers and every subprocess a test starts all use it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker inherited the controller's folder with its environment
    folder = tempfile.mkdtemp(prefix="histreg-bench-tests-")
    config.stash[_CACHE_KEY] = (folder, os.environ.get(CACHE_ENV), os.environ.get(ESTIMATE_ENV))
    os.environ[CACHE_ENV] = folder
    # runs skip the error estimate (a re-alignment per row, torch in every worker) unless a test asks for it
    # (tests/test_quality.py's estimate tests, RunConfig(error_estimate=True)): the suite stays fast
    os.environ[ESTIMATE_ENV] = "0"


def pytest_unconfigure(config: pytest.Config) -> None:
    folder, before, estimate = config.stash.get(_CACHE_KEY, (None, None, None))
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for name, value in ((CACHE_ENV, before), (ESTIMATE_ENV, estimate)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def anhir_mini() -> Path:
    """The real 12-pair ANHIR sample beside the checkout (evaluation only)."""
    table = SHARED / "dataset.csv"
    if not table.exists():
        pytest.skip(f"real data not found at {SHARED} (it lives in ../shared beside the checkout)")
    return table


def blob_image(seed: int, shape=(180, 240)) -> np.ndarray:
    """A stain-like RGB image: dark-pink blobs on a light background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.full((h, w, 3), 238, np.uint8)
    for _ in range(40):
        c = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
        r = int(rng.uniform(3, 14))
        col = tuple(int(v) for v in rng.uniform([120, 40, 90], [200, 120, 170]))
        cv2.circle(img, c, r, col, -1)
    return cv2.GaussianBlur(img, (0, 0), 1.0)


def write_pair(folder: Path, name: str, seed: int, matrix: np.ndarray, n_landmarks: int = 12):
    """Write target/source images and landmarks; the source is the target moved by ``matrix``."""
    folder.mkdir(parents=True, exist_ok=True)
    tgt = blob_image(seed)
    h, w = tgt.shape[:2]
    src = cv2.warpAffine(tgt, np.linalg.inv(matrix)[:2], (w, h), borderValue=(238, 238, 238))
    rng = np.random.default_rng(seed + 1)
    tgt_pts = rng.uniform([0.3 * w, 0.3 * h], [0.7 * w, 0.7 * h], size=(n_landmarks, 2))
    src_pts = geometry.apply(np.linalg.inv(matrix), tgt_pts)
    cv2.imwrite(str(folder / f"{name}_target.jpg"), cv2.cvtColor(tgt, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / f"{name}_source.jpg"), cv2.cvtColor(src, cv2.COLOR_RGB2BGR))
    write_landmarks(folder / f"{name}_target.csv", tgt_pts)
    write_landmarks(folder / f"{name}_source.csv", src_pts)
    return tgt.shape[:2]


HEADER = ",Source image,Source landmarks,Target image,Target landmarks,Image diagonal [pixels],Image size [pixels],status\n"


@pytest.fixture
def tiny_table(tmp_path: Path) -> Path:
    """A 3-pair ANHIR table in tissue folders, sources shifted by known translations."""
    lines = [HEADER]
    for i, tissue in enumerate(["kidney_1", "kidney_2", "lung-lesion_1"]):
        folder = tmp_path / tissue / "scale-100pc"
        h, w = write_pair(folder, f"s{i}", seed=i, matrix=geometry.translation(4 + i, -3))
        rel = f"{tissue}/scale-100pc/s{i}"
        lines.append(
            f'{i},{rel}_source.jpg,{rel}_source.csv,{rel}_target.jpg,{rel}_target.csv,'
            f'{np.hypot(h, w):.2f},"({h}, {w})",training\n'
        )
    table = tmp_path / "dataset.csv"
    table.write_text("".join(lines))
    return table


FAULTY_METHODS = Path(__file__).resolve().parent / "faulty_methods.py"


@pytest.fixture(scope="module")
def faulty() -> tuple[str, ...]:
    """The misbehaving methods (``fault-*``, tests/faulty_methods.py) as a ``--plugin`` spec: a file path, so worker
    processes, Dask workers and ``check``'s children load the same module; unregistered afterwards, so no other
    test sees them."""
    from bench import registry

    yield (str(FAULTY_METHODS),)
    for name in list(registry._REGISTRY):
        if name.startswith("fault-"):
            registry._REGISTRY.pop(name)
    sys.modules.pop(registry.plugin_module_name(FAULTY_METHODS), None)
    getattr(registry, "_PLUGINS", {}).pop(str(FAULTY_METHODS), None)
