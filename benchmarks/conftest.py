"""Fixtures of the timing runs: fixed generated pairs at the working size, prepared once."""

from __future__ import annotations

import os

import cv2
import pytest

from bench.preprocess import PreprocessParams, prepare_pair


def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark_method: timing of one registered method")


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory):
    """A fixed generated stain pair written as JPEG (the same bytes on every run of one generator version)."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    pair = generate_pair(1234, tissue="kidney-like", source_stain="HE", target_stain="PAS",
                         config=GeneratorConfig(size=1000, max_rotation_deg=180))
    folder = tmp_path_factory.mktemp("bench-pair")
    paths = folder / "source.jpg", folder / "target.jpg"
    for p, img in zip(paths, (pair.source_rgb, pair.target_rgb), strict=True):
        cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


@pytest.fixture(scope="session")
def prepared(pair_files):
    src, tgt = pair_files
    return {full: prepare_pair(src, tgt, PreprocessParams(), full=full) for full in (True, False)}


@pytest.fixture(scope="session")
def slowdown() -> dict[str, float]:
    """``HISTREG_BENCH_SLOW=sift=0.05`` adds 50 ms to one method's timed call: a check of the regression gate."""
    spec = os.environ.get("HISTREG_BENCH_SLOW", "")
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, seconds = item.partition("=")
        out[name.strip()] = float(seconds)
    return out
