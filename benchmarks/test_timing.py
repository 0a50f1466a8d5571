"""Timing runs (pytest-benchmark): each registered method's estimate and the preprocessing stage.

    python -m pytest benchmarks --benchmark-only --benchmark-autosave            # time and save
    python -m pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%

Saved runs land in .benchmarks/<machine>/ with pytest-benchmark's machine information; the second command
compares against the latest saved run and fails on a regression beyond the threshold.
"""

from __future__ import annotations

import sys
import time

import pytest

from bench import registry
from bench.method import Context
from bench.preprocess import PreprocessParams, prepare_pair


def _sync(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.synchronize()


@pytest.mark.parametrize("name", registry.names())
def test_method_estimate(benchmark, name, prepared, slowdown):
    cls = registry.get(name)
    reason = cls.unavailable_reason()
    if reason:
        pytest.skip(f"{name} unavailable: {reason}")
    method = cls()
    device = method.device_for("cuda" if _cuda() else "cpu")
    ctx = Context(device=device, seed=0)
    method.prepare(ctx)
    p = prepared[cls.uses_preprocessing]
    delay = slowdown.get(name, 0.0)

    def call():
        est = method.estimate(p.fixed, p.moving, ctx)
        _sync(device)  # pytest-benchmark's timer does not wait for CUDA
        if delay:
            time.sleep(delay)
        return est

    benchmark.extra_info.update(method=name, version=cls.version, device=device,
                                image_size=list(p.fixed.shape), slowdown_s=delay)
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)


def test_preprocessing_stage(benchmark, pair_files):
    src, tgt = pair_files
    params = PreprocessParams()
    benchmark.extra_info.update(stage="preprocess", working_size=params.working_size)
    benchmark.pedantic(lambda: prepare_pair(src, tgt, params, full=True), rounds=3, iterations=1, warmup_rounds=1)


def _cuda() -> bool:
    if "torch" not in sys.modules:
        try:
            import torch
        except ImportError:
            return False
    import torch

    return torch.cuda.is_available()
