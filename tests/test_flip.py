"""Close flip calls (issue 20): the stage carries both mirror states, the cache keeps them, the harness runs a
method on both and keeps the answer of higher landmark-free quality."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import work
from bench.cache import PreprocessCache
from bench.method import Estimate, RegistrationFailed
from bench.pairs import write_landmarks
from bench.plan import RunConfig, make_plan
from bench.preprocess import PreparedPair, PreprocessParams, prepare_pair

# the NCC decides nothing: every pair is a close call, decided by the texture MI (which picks the right state
# on these generated pairs, tests/test_preprocess.py::test_texture_mi_decides_the_close_calls)
CLOSE = PreprocessParams(flip_margin=9.0, flip_mi_band=9.0)
HEADER = ",Source image,Source landmarks,Target image,Target landmarks,Image diagonal [pixels],Image size [pixels],status\n"


def _generated(tmp_path: Path, seed: int, mirror: str | None):
    """A generated two-stain pair (as in tests/test_preprocess.py), the source optionally mirrored ("lr"):
    the two paths, the landmarks (source, target) and the target's diagonal."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=480, n_landmarks=20, scale_range=(0.85, 1.2), max_shear=0.08)
    pair = generate_pair(seed, source_stain="HE", target_stain="PAS", config=cfg)
    src, pts = pair.source_rgb, pair.source_landmarks.copy()
    if mirror == "lr":
        src, pts[:, 0] = src[:, ::-1], src.shape[1] - 1 - pts[:, 0]
    s, t = tmp_path / f"s{seed}{mirror}.png", tmp_path / f"t{seed}.png"
    cv2.imwrite(str(s), cv2.cvtColor(np.ascontiguousarray(src), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(t), cv2.cvtColor(pair.target_rgb, cv2.COLOR_RGB2BGR))
    return s, t, pts, pair.target_landmarks, np.hypot(*pair.target_rgb.shape[:2])


def test_close_call_carries_the_other_mirror_state(tmp_path):
    s, t, *_ = _generated(tmp_path, 5, "lr")
    p = prepare_pair(s, t, CLOSE)
    alt = p.alternative
    assert p.diagnostics["flip_decision"] == "texture" and p.diagnostics["flip_close_call"] is True
    assert p.diagnostics["flipped"] is True and alt is not None and alt.alternative is None
    assert alt.diagnostics["flipped"] is False and alt.diagnostics["orientation"] == "alternative"
    assert alt.fixed is p.fixed and alt.source_scale == p.source_scale and alt.target_shape == p.target_shape
    assert np.linalg.det(p.source_pre[:2, :2]) < 0 < np.linalg.det(alt.source_pre[:2, :2])
    # the unmirrored state is exactly what the search without the flip test returns
    off = prepare_pair(s, t, PreprocessParams(flip_test=False))
    np.testing.assert_array_equal(alt.source_pre, off.source_pre)
    np.testing.assert_array_equal(alt.moving.image, off.moving.image)
    np.testing.assert_array_equal(alt.moving.mask, off.moving.mask)


@pytest.mark.parametrize("mirror", [None, "lr"])
def test_clear_call_carries_no_alternative(tmp_path, mirror):
    s, t, *_ = _generated(tmp_path, 3, mirror)
    p = prepare_pair(s, t)  # default settings: NCC leads by about 0.2 either way
    assert p.diagnostics["flip_decision"] == "ncc" and p.alternative is None
    assert "flip_close_call" not in p.diagnostics
    assert prepare_pair(s, t, full=False).alternative is None


def test_cache_round_trip_keeps_the_alternative(tmp_path):
    s, t, *_ = _generated(tmp_path, 5, None)
    cache = PreprocessCache(tmp_path / "cache")
    first, hit = cache.get_or_prepare(s, t, CLOSE)
    assert not hit and first.alternative is not None
    again, hit = cache.get_or_prepare(s, t, CLOSE)
    assert hit and again.alternative is not None and again.alternative.fixed is again.fixed
    for a, b in ((first, again), (first.alternative, again.alternative)):
        np.testing.assert_array_equal(a.source_pre, b.source_pre)
        for role in ("fixed", "moving"):
            va, vb = getattr(a, role), getattr(b, role)
            for f in ("image", "mask", "rgb", "valid"):
                np.testing.assert_array_equal(getattr(va, f), getattr(vb, f))
        assert {k: v for k, v in b.diagnostics.items() if k != "cache_hit"} == json.loads(json.dumps(a.diagnostics))
    # a clear call stores and restores no alternative
    s2, t2, *_ = _generated(tmp_path, 3, None)
    cache.get_or_prepare(s2, t2)
    assert cache.get_or_prepare(s2, t2)[0].alternative is None


def _swapped(p: PreparedPair) -> PreparedPair:
    """The same pair with its two mirror states swapped: a close call whose primary state is the wrong one."""
    alt = p.alternative
    primary = dataclasses.replace(alt, alternative=None)
    return dataclasses.replace(primary, alternative=dataclasses.replace(p, alternative=None))


def _task(tmp_path: Path, mirror, methods: str):
    s, t, ls, lt, diagonal = _generated(tmp_path, 5, mirror)
    write_landmarks(tmp_path / "s.csv", ls)
    write_landmarks(tmp_path / "t.csv", lt)
    table = tmp_path / "dataset.csv"
    table.write_text(HEADER + f"0,{s.name},s.csv,{t.name},t.csv,{diagonal:.3f},,training\n")
    plan = make_plan(RunConfig(dataset=table, methods=methods, cache_enabled=False, device="cpu",
                               out=tmp_path / "unused"))
    return dataclasses.replace(plan.task(plan.pairs[0], plan.specs), preprocess=CLOSE)


@pytest.mark.parametrize("mirror", [None, "lr"])
def test_harness_keeps_the_orientation_of_higher_quality(tmp_path, monkeypatch, mirror):
    """A close call whose primary state is right: the row is aligned, the right state chosen; the same pair with
    the primary state made wrong: the harness still picks the right one, with the very same matrix."""
    task = _task(tmp_path, mirror, "preprocessed,identity")
    right = "mirrored" if mirror else "as scanned"
    monkeypatch.setattr(work, "_PREPARED", type(work._PREPARED)())
    rows = {r.method: r for r in work.run_pair(task).rows}
    row = rows["preprocessed"]
    o = row.diagnostics["orientation"]
    assert row.success and o["close_call"] is True and o["primary"] == right and o["chosen"] == right
    wrong = "as scanned" if mirror else "mirrored"
    q = {k: o[f"quality_{k.replace(' ', '_')}"] for k in (right, wrong)}
    assert q[right] > 1.3 > q[wrong] and row.quality == pytest.approx(q[right])
    assert "orientation" not in rows["identity"].diagnostics  # the light stage has no mirror states

    real = work._prepare_now

    def wrong_primary(task, full):
        prepared, spent, cached = real(task, full)
        return (_swapped(prepared) if prepared.alternative is not None else prepared), spent, cached

    monkeypatch.setattr(work, "_prepare_now", wrong_primary)
    swapped = next(r for r in work.run_pair(task).rows if r.method == "preprocessed")
    o2 = swapped.diagnostics["orientation"]
    assert o2["primary"] == wrong and o2["chosen"] == right and swapped.success
    np.testing.assert_array_equal(swapped.matrix, row.matrix)
    # a failed call falls back on the primary state's preprocessing, the wrong one here
    assert swapped.diagnostics["preprocess"]["flipped"] is (mirror is None)


class _Fake:
    """A method that answers identity after ``sleep`` seconds, failing on the states listed in ``fail``."""

    def __init__(self, sleep: float = 0.0, fail: tuple[bool, ...] = ()):
        self.sleep, self.fail, self.calls = sleep, fail, []

    def estimate(self, fixed, moving, ctx):
        flipped = any(moving is p.moving and p.diagnostics["flipped"] for p in self.states)
        self.calls.append(flipped)
        time.sleep(self.sleep)
        if flipped in self.fail:
            raise RegistrationFailed(f"no answer {'mirrored' if flipped else 'as scanned'}")
        return Estimate(np.eye(3))


def test_estimate_oriented_failures_and_time(tmp_path):
    s, t, *_ = _generated(tmp_path, 5, "lr")
    p = prepare_pair(s, t, CLOSE)
    fake = _Fake(sleep=0.2)
    fake.states = (p, p.alternative)
    t0 = time.perf_counter()
    est, chosen, diag = work._estimate_oriented(fake, p, None)
    assert time.perf_counter() - t0 >= 0.4 and fake.calls == [True, False]  # both states, in one call
    assert chosen is p and diag["chosen"] == "mirrored" and diag["time_mirrored_s"] >= 0.2
    # a failure on one state leaves the other, even when the other is worse
    fake = _Fake(fail=(True,))
    fake.states = (p, p.alternative)
    est, chosen, diag = work._estimate_oriented(fake, p, None)
    assert chosen is p.alternative and diag["quality_mirrored"] is None and "mirrored" in diag["failed"]
    fake = _Fake(fail=(True, False))
    fake.states = (p, p.alternative)
    with pytest.raises(RegistrationFailed, match="mirrored"):  # both failed: the primary's reason
        work._estimate_oriented(fake, p, None)
    # no alternative: one call, no orientation record
    fake = _Fake()
    fake.states = (p,)
    single = dataclasses.replace(p, alternative=None)
    assert work._estimate_oriented(fake, single, None)[1:] == (single, None) and len(fake.calls) == 1


@pytest.mark.parametrize("q_primary, q_alternative, chosen", [
    (0.7, 0.9, "mirrored"),  # both look failed: the flip test's call stands
    (0.7, 1.1, "as scanned"),  # the alternative looks aligned and better
    (2.0, 1.5, "mirrored"),  # the primary is better
    (2.0, 2.0, "mirrored"),  # a tie keeps the primary
])
def test_alternative_wins_only_when_better_and_not_likely_failed(tmp_path, monkeypatch, q_primary, q_alternative,
                                                                 chosen):
    s, t, *_ = _generated(tmp_path, 5, "lr")
    p = prepare_pair(s, t, CLOSE)  # primary: mirrored
    fake = _Fake()
    fake.states = (p, p.alternative)
    monkeypatch.setattr(work.quality, "alignment_quality",
                        lambda fixed, moving, m: q_primary if moving is p.moving else q_alternative)
    _, _, diag = work._estimate_oriented(fake, p, None)
    assert diag["chosen"] == chosen and diag["quality_mirrored"] == q_primary


def test_harness_time_covers_both_calls(tmp_path, monkeypatch):
    from bench.methods.preprocessed import Preprocessed

    task = _task(tmp_path, "lr", "preprocessed")
    original = Preprocessed.estimate

    def slow(self, fixed, moving, context):
        time.sleep(0.3)
        return original(self, fixed, moving, context)

    monkeypatch.setattr(Preprocessed, "estimate", slow)
    monkeypatch.setattr(work, "_PREPARED", type(work._PREPARED)())
    row = work.run_pair(task).rows[0]
    assert row.status == "ok" and row.time_s >= 0.6
    o = row.diagnostics["orientation"]
    assert o["time_mirrored_s"] >= 0.3 and o["time_as_scanned_s"] >= 0.3
