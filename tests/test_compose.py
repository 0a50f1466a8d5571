"""Composed methods (bench/compose.py): parsing, fallback, refinement, diagnostics, errors, and ``cascade``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import (
    Context,
    Estimate,
    ImageView,
    Method,
    RegistrationFailed,
    compose,
    factory,
    geometry,
    quality,
    registry,
)
from bench.expression import CompositionError, parse
from bench.imaging import warp_view

# ----------------------------------------------------------------------------------------------------
# tiny test methods, registered for this module only

CALLS: list[str] = []
SEEN: dict[str, ImageView] = {}


def _make(name: str, behaviour):
    cls = type(name.replace("-", "_"), (Method,), {
        "name": name, "version": "7", "estimate": lambda self, f, m, c: (CALLS.append(name), behaviour(f, m))[1],
        "__module__": __name__})
    return cls


def _fail(f, m):
    raise RegistrationFailed("no luck")


def _crash(f, m):
    raise ValueError("boom")


def _probe(f, m):
    SEEN["probe"] = m
    return Estimate(np.eye(3))


ROT = geometry.rotation(3.0, (60.0, 50.0))
SHIFT = geometry.translation(4.0, -2.0)
TEST_METHODS = {
    "t-good": lambda f, m: Estimate(np.eye(3), {"who": "good"}),
    "t-good2": lambda f, m: Estimate(np.eye(3)),
    "t-bad": lambda f, m: Estimate(geometry.translation(17.0, 13.0)),  # far off: low quality
    "t-fail": _fail,
    "t-crash": _crash,
    "t-rot": lambda f, m: Estimate(ROT),
    "t-shift": lambda f, m: Estimate(SHIFT),
    "t-probe": _probe,
    "t-original": lambda f, m: Estimate(np.eye(3), frame="original"),
}


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    registry.discover()
    for name, behaviour in TEST_METHODS.items():
        registry.register(_make(name, behaviour))
    yield
    for name in TEST_METHODS:
        registry._REGISTRY.pop(name, None)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()
    SEEN.clear()


@pytest.fixture(scope="module")
def views() -> tuple[ImageView, ImageView]:
    """The same textured generated section as fixed and moving: the identity is the right answer."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    cfg = GeneratorConfig(size=384, n_landmarks=0, max_rotation_deg=0, hole_probability=0, dust_probability=0)
    pair = generate_pair(3, tissue="kidney-like", config=cfg)
    gray = 1 - cv2.cvtColor(pair.target_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    mask = pair.target_mask.astype(bool)
    view = ImageView(np.where(mask, gray, 0).astype(np.float32), mask, pair.target_rgb)
    return view, view


def run(expr: str, views, **params) -> Estimate:
    method = factory.resolve(expr)(**params)
    method.prepare(Context())
    return method.estimate(*views, Context())


# ----------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, canonical, top, parts", [
    ("learned>iterative|sift|preprocessed", "learned>iterative|sift|preprocessed", "|",
     ["learned>iterative", "sift", "preprocessed"]),
    ("a|b>c", "a|b>c", "|", ["a", "b>c"]),
    ("(a|b)>c", "(a|b)>c", ">", ["a|b", "c"]),
    ("a > (b | c) > d", "a>(b|c)>d", ">", ["a", "b|c", "d"]),
    ("((a))|(b|c)", "a|b|c", "|", ["a", "b", "c"]),
    ("(a>b)>c", "a>b>c", ">", ["a", "b", "c"]),
])
def test_parse_precedence(text, canonical, top, parts):
    tree = parse(text)
    assert tree.label() == canonical and tree.op == top
    assert [c.label() for c in tree.children] == parts
    assert parse(canonical) == tree  # the canonical form parses back to the same tree


@pytest.mark.parametrize("text, problem", [
    ("sift||iterative", "a method name is missing before '|' at position 5"),
    ("sift|", "a method name is missing at the end"),
    ("(sift|iterative", "')' expected at the end"),
    ("sift)|iterative", "unexpected ')' at position 4"),
    (">sift", "a method name is missing before '>' at position 0"),
    ("  ", "empty composition expression"),
])
def test_bad_syntax_names_the_problem(text, problem):
    with pytest.raises(CompositionError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        parse(text)


def test_bad_members_name_the_problem():
    with pytest.raises(CompositionError, match="unknown method 'sfit'.*did you mean 'sift'"):
        factory.resolve("sfit|iterative")
    with pytest.raises(CompositionError, match="'identity' cannot be a member"):
        factory.resolve("identity|preprocessed")
    with pytest.raises(CompositionError, match="single method"):
        factory.resolve("(sift)")
    with pytest.raises(registry.UnknownMethodError):  # what the runner turns into a clean RunError
        factory.select("preprocessed,sift|nosuch")


def test_composite_class_metadata():
    cls = factory.resolve("t-good|t-fail>t-shift")
    assert cls is factory.resolve(" t-good | t-fail > t-shift ")  # one class per canonical expression
    assert cls.name == "t-good|t-fail>t-shift"
    assert cls.version == "1[t-good@7|t-fail@7>t-shift@7]"
    assert cls.uses_preprocessing and cls.devices == ("cpu",)
    assert {f for f in cls.Params.__dataclass_fields__} == {"accept", "refuse_below", "t_good", "t_fail", "t_shift"}
    assert cls().params == cls.Params()
    assert factory.select("t-good|t-fail,t-good").chosen[0].name == "t-good|t-fail"
    assert "cuda" in factory.resolve("learned|sift").devices
    assert set(factory.resolve("learned|iterative").requires) == {"torch", "SimpleITK"}


def test_members_resolve_lazily_and_the_registry_knows_names_only():
    class Early(compose.Composite):  # declared before its member exists, as a method file the registry imports
        name = "t-early"
        expression = "t-good|t-later"

    assert Early.name == "t-early" and set(Early.Params.__dataclass_fields__) == {
        "accept", "refuse_below", "t_good", "t_later"}
    registry.register(_make("t-later", TEST_METHODS["t-good"]))
    try:
        assert Early.version == "1[t-good@7|t-later@7]" and Early.unavailable_reason() is None
        assert set(Early().members) == {"t-good", "t-later"}
    finally:
        registry._REGISTRY.pop("t-later", None)
    with pytest.raises(registry.UnknownMethodError, match=re.escape("unknown method 'sift|iterative'")):
        registry.get("sift|iterative")  # composed names are resolved above the registry (bench.factory)


def test_member_parameters():
    m = factory.resolve("sift|iterative")(sift="ratio=0.8; gate=0.05", accept="1.5")
    assert m.members["sift"].params.ratio == 0.8 and m.members["sift"].params.gate == 0.05
    assert m.members["iterative"].params == registry.get("iterative").Params()
    assert m.params.accept == 1.5
    with pytest.raises(ValueError, match="unknown parameter 'ratoi'.*did you mean 'ratio'"):
        factory.resolve("sift|iterative")(sift="ratoi=0.8")
    with pytest.raises(ValueError, match="not PARAM=VALUE"):
        factory.resolve("sift|iterative")(sift="ratio")


# ----------------------------------------------------------------------------------------------------
# fallback


def test_fallback_takes_first_accepted_and_stops(views):
    est = run("t-good|t-good2", views)
    assert CALLS == ["t-good"]
    d = est.diagnostics
    assert d["decided"] == "t-good" and d["decision"] == "accepted"
    assert [r["member"] for r in d["members"]] == ["t-good"] and d["not_run"] == ["t-good2"]
    assert d["members"][0]["accepted"] and d["members"][0]["quality"] >= compose.DEFAULT_ACCEPT
    assert d["member_diagnostics"]["who"] == "good"
    json.dumps(d)  # the row's diagnostics are JSON


def test_fallback_after_reported_failure_and_crash(views):
    est = run("t-fail|t-crash|t-good", views)
    assert CALLS == ["t-fail", "t-crash", "t-good"]
    members = est.diagnostics["members"]
    assert [r["status"] for r in members] == ["failed", "error", "ok"]
    assert members[0]["reason"] == "no luck" and "ValueError: boom" in members[1]["reason"]
    assert est.diagnostics["decided"] == "t-good"
    assert all(r["time_s"] >= 0 for r in members if r["status"] == "ok")


def test_fallback_after_low_quality(views):
    est = run("t-bad|t-good", views)
    first, second = est.diagnostics["members"]
    assert first["status"] == "ok" and not first["accepted"] and first["quality"] < second["quality"]
    assert est.diagnostics["decided"] == "t-good"
    np.testing.assert_allclose(est.matrix, np.eye(3))


def test_fallback_keeps_best_quality_when_none_accepted(views):
    q_good = quality.alignment_quality(*views, np.eye(3))
    est = run("t-bad|t-good|t-fail", views, accept=q_good + 1)  # nothing can be accepted
    assert CALLS == ["t-bad", "t-good", "t-fail"]
    assert est.diagnostics["decided"] == "t-good" and est.diagnostics["decision"] == "best quality"
    with pytest.raises(RegistrationFailed, match="no alternative of t-bad\\|t-fail reached quality"):
        run("t-bad|t-fail", views, refuse_below=q_good + 1)


def test_fallback_all_failed_lists_each_reason(views):
    with pytest.raises(RegistrationFailed, match="every alternative.*t-fail: no luck.*t-crash: ValueError: boom"):
        run("t-fail|t-crash", views)


def test_original_frame_member_is_refused(views):
    est = run("t-original|t-good", views)
    assert "working frame" in est.diagnostics["members"][0]["reason"]


# ----------------------------------------------------------------------------------------------------
# refinement


def test_refinement_composes_second_after_first(views):
    est = run("t-rot>t-shift", views)
    np.testing.assert_allclose(est.matrix, SHIFT @ ROT, atol=1e-12)
    assert not np.allclose(SHIFT @ ROT, ROT @ SHIFT)  # the order is really tested
    est = run("t-rot>t-shift>t-rot", views)
    np.testing.assert_allclose(est.matrix, ROT @ SHIFT @ ROT, atol=1e-12)
    assert [s["member"] for s in est.diagnostics["members"][0]["steps"]] == ["t-rot", "t-shift", "t-rot"]


def test_refinement_gives_the_warped_view(views):
    fixed, moving = views
    moving = ImageView(moving.image, moving.mask, moving.rgb, valid=np.ones(moving.shape, bool))
    run("t-rot>t-probe", (fixed, moving))
    seen = SEEN["probe"]
    expected = warp_view(moving, ROT, fixed.shape)
    np.testing.assert_array_equal(seen.image, expected.image)
    np.testing.assert_array_equal(seen.mask, expected.mask)
    assert seen.rgb.shape == moving.rgb.shape and seen.valid is not None and not seen.valid.all()
    h, w = fixed.shape
    ref = cv2.warpAffine(moving.image, ROT[:2], (w, h), flags=cv2.INTER_LINEAR)
    np.testing.assert_allclose(seen.image, ref)


def test_refinement_fails_when_a_step_fails(views):
    with pytest.raises(RegistrationFailed, match="t-fail>t-good: step t-fail: no luck"):
        run("t-fail>t-good", views)
    assert CALLS == ["t-fail"]
    est = run("t-shift>t-fail|t-good", views)  # a failed refinement is a failed alternative
    assert est.diagnostics["members"][0]["status"] == "failed" and est.diagnostics["decided"] == "t-good"


@pytest.fixture(scope="module")
def generated_pair(tmp_path_factory):
    """A small generated stain pair moved by a known affine (rotation <= 15 deg, scale 1.1, shear), prepared."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    from bench.preprocess import prepare_pair

    cfg = GeneratorConfig(size=384, n_landmarks=20, max_rotation_deg=15, scale_range=(1.08, 1.12), max_shear=0.05,
                          elastic_px=0.0, hole_probability=0.0, dust_probability=0.0)
    pair = generate_pair(11, tissue="kidney-like", source_stain="HE", target_stain="PAS", config=cfg)
    folder = tmp_path_factory.mktemp("compose")
    src, tgt = folder / "source.png", folder / "target.png"
    cv2.imwrite(str(src), cv2.cvtColor(pair.source_rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tgt), cv2.cvtColor(pair.target_rgb, cv2.COLOR_RGB2BGR))
    return pair, prepare_pair(src, tgt)


def _rtre(pair, prepared, matrix) -> float:
    moved = geometry.apply(prepared.to_original(matrix), pair.source_landmarks)
    return float(np.median(np.linalg.norm(moved - pair.target_landmarks, axis=1)) / np.hypot(*pair.target_rgb.shape[:2]))


def test_refinement_recovers_known_transform(generated_pair):
    pair, prepared = generated_pair
    pre = _rtre(pair, prepared, np.eye(3))
    est = factory.resolve("preprocessed>iterative")().estimate(prepared.fixed, prepared.moving, Context())
    assert _rtre(pair, prepared, est.matrix) < 0.01 < pre  # the scale and shear left by the preprocessing
    # refining a deliberately wrong start: iterative from a 2-degree turn still recovers the pair
    est = run("t-rot>iterative", (prepared.fixed, prepared.moving))
    assert _rtre(pair, prepared, est.matrix) < 0.01
    assert not np.allclose(est.matrix, ROT)


# ----------------------------------------------------------------------------------------------------
# cascade and the runner


def test_cascade_registered_and_runs_end_to_end(tmp_path):
    from bench.datasets.synthetic import GeneratorConfig, write_dataset

    from bench.runner import RunConfig, run
    from bench.store import ResultStore

    assert "cascade" in registry.names()
    cls = registry.get("cascade")
    assert issubclass(cls, compose.Composite) and cls.version.startswith(compose.COMPOSE_VERSION)
    cfg = GeneratorConfig(size=384, n_landmarks=12, max_rotation_deg=30, hole_probability=0, dust_probability=0)
    table = write_dataset(tmp_path / "data", 1, seed=5, config=cfg)
    summary = run(RunConfig(dataset=table, methods="cascade,preprocessed|sift", out=tmp_path / "run",
                            cache_enabled=False, device="cpu"))
    assert summary.counts == {"ok": 2}
    rows = {r["method"]: r for r in ResultStore(tmp_path / "run").rows()}
    assert set(rows) == {"cascade", "preprocessed|sift"}
    for row in rows.values():
        diag = row["diagnostics"] if isinstance(row["diagnostics"], dict) else json.loads(row["diagnostics"])
        assert diag["decided"] and diag["members"][0]["status"] in ("ok", "failed")
        assert str(row["success"]) == "True" and float(row["quality"]) > 0


# ----------------------------------------------------------------------------------------------------
# the harder generated pairs the cascade is chosen on (datasets/synthetic/: Variation, unrelated tables)

HARD = dict(size=320, n_landmarks=15, elastic_px=0.0, scale_range=(0.85, 1.2), max_shear=0.08)


def test_generator_mirrored_source_has_exact_ground_truth():
    from bench.datasets.synthetic import GeneratorConfig, Variation, generate_pair

    cfg = GeneratorConfig(**HARD)
    plain = generate_pair(4, config=cfg)
    assert plain.mirrored == "" and np.linalg.det(plain.true_matrix) > 0
    kinds = set()
    for seed in (4, 5, 6, 7):
        p = generate_pair(seed, config=cfg, variation=Variation(mirror_probability=1.0))
        kinds.add(p.mirrored)
        assert np.linalg.det(p.true_matrix[:2, :2]) < 0
        np.testing.assert_allclose(geometry.apply(p.true_matrix, p.source_landmarks), p.target_landmarks, atol=1e-6)
        h, w = p.target_mask.shape
        back = cv2.warpAffine(p.source_mask.astype(np.uint8), p.true_matrix[:2], (w, h), flags=cv2.INTER_NEAREST) > 0
        iou = (back & p.target_mask).sum() / (back | p.target_mask).sum()
        assert iou > 0.95, f"seed {seed}: the mirrored source's tissue does not land on the target's (IoU {iou:.3f})"
    assert kinds == {"lr", "tb"}


def test_generator_texture_swap_keeps_geometry_changes_fine_structure():
    from bench.datasets.synthetic import GeneratorConfig, Variation, generate_pair

    cfg = GeneratorConfig(**HARD)
    fine = {}
    for sigma in (0.0, 3.0):
        p = generate_pair(9, tissue="kidney-like", source_stain="HE", target_stain="HE", config=cfg,
                          variation=Variation(texture_swap_sigma=sigma))
        h, w = p.target_mask.shape
        gray = [cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) for rgb in (p.target_rgb, p.source_rgb)]
        back = cv2.warpAffine(gray[1], p.true_matrix[:2], (w, h))
        band = [cv2.GaussianBlur(g, (0, 0), 1.0) - cv2.GaussianBlur(g, (0, 0), 3.0) for g in (gray[0], back)]
        inner = cv2.erode(p.target_mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        fine[sigma] = float(np.corrcoef(band[0][inner], band[1][inner])[0, 1])
        fine[f"matrix {sigma}"] = p.true_matrix
    np.testing.assert_array_equal(fine["matrix 0.0"], fine["matrix 3.0"])  # same geometry
    assert fine[0.0] > 0.9 and fine[3.0] < fine[0.0] - 0.1, fine  # the target's fine structure is gone


def test_generator_unrelated_table_pairs_other_tissues(tmp_path):
    from bench.datasets.synthetic import GeneratorConfig, write_dataset

    from bench.pairs import load_table

    table = write_dataset(tmp_path, 4, seed=1, config=GeneratorConfig(size=200, n_landmarks=5), unrelated=True,
                          workers=1)
    pairs = load_table(table)
    assert len(pairs) == 4
    for p in pairs:
        assert Path(p.source_image).parts[-3] != Path(p.target_image).parts[-3]
    with pytest.raises(ValueError, match="at least 2"):
        write_dataset(tmp_path / "one", 1, seed=1, config=GeneratorConfig(size=200, n_landmarks=5), unrelated=True)


def test_run_accepts_composites_and_their_parameters(tmp_path):
    from bench.runner import RunConfig, RunError, parse_overrides, run

    overrides = parse_overrides(["sift|preprocessed.sift=ratio=0.8;gate=0.05", "sift|preprocessed.accept=2"])
    assert overrides == {"sift|preprocessed": {"sift": "ratio=0.8;gate=0.05", "accept": "2"}}
    with pytest.raises(RunError, match="unknown parameter 'ratoi'"):
        run(RunConfig(methods="sift|preprocessed", overrides={"sift|preprocessed": {"sift": "ratoi=1"}},
                      out=tmp_path / "a"))
    with pytest.raises(RunError, match="bad composition expression 'sift\\|\\|preprocessed'"):
        run(RunConfig(methods="sift||preprocessed", out=tmp_path / "b"))
    with pytest.raises(RunError, match="'identity' cannot be a member"):
        run(RunConfig(methods="preprocessed,identity|sift", out=tmp_path / "c"))
    assert not any((tmp_path / d / "results.csv").exists() for d in "abc")  # refused before any work
