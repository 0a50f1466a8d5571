"""Smoke tests of the study scripts in studies/ on tiny inputs (they are run by hand, not by the suite), and
the rules every study keeps (studies/README.md): public names of bench only, no edit of sys.path."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from bench.datasets.synthetic import GeneratorConfig, write_dataset

from bench import geometry
from bench.pairs import load_table, read_landmarks
from bench.quality import roc_auc

STUDIES = Path(__file__).resolve().parent.parent / "studies"
SCRIPTS = sorted(p.stem for p in STUDIES.glob("*.py"))


def _load(name: str):
    """``studies/<name>.py`` loaded as ``python studies/<name>.py`` runs it: its own folder first on the import
    path, so ``from common import ...`` finds the shared helpers."""
    spec = importlib.util.spec_from_file_location(f"studies_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(STUDIES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(STUDIES))
    return module


def _rows(*entries):
    return pd.DataFrame([{"pair_id": p, "method": m, "status": s, "rtre_median": r, "matrix": json.dumps(x)}
                         for p, m, s, r, x in entries])


def test_same_rows_finds_every_kind_of_difference():
    same_rows = _load("same_rows")
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    moved = [[1.0, 0.0, 1e-6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    ref = _rows(("0", "sift", "ok", 0.01, eye), ("1", "sift", "ok", 0.02, eye), ("2", "sift", "ok", 0.03, eye),
                ("3", "sift", "failed", "", eye))
    assert same_rows.differences(ref, ref.copy()) == []
    new = _rows(("0", "sift", "ok", 0.01, moved), ("1", "sift", "failed", 0.02, eye),
                ("2", "sift", "ok", 0.0300001, eye), ("4", "sift", "ok", 0.01, eye))
    diff = same_rows.differences(ref, new)
    assert any("('0', 'sift'): matrix" in d for d in diff)
    assert any("('1', 'sift'): status ok -> failed" in d for d in diff)
    assert any("('2', 'sift'): rtre_median" in d for d in diff)
    assert any("('3', 'sift'): only in the reference" in d for d in diff)
    assert any("('4', 'sift'): only in the new run" in d for d in diff)
    assert len(diff) == 5


def test_same_rows_references_cover_every_pair_and_method():
    same_rows = _load("same_rows")
    for name, pairs in (("sample", 24), ("anhir-mini", 12)):
        ref = pd.read_csv(same_rows.reference_path(name), dtype={"pair_id": str}, keep_default_na=False)
        assert ref.groupby("method").size().eq(pairs).all(), name
        assert not ref.duplicated(["pair_id", "method"]).any()


# ---------------------------------------------------------------------------------------------
# the rules of studies/README.md, checked on every script


def _violations(tree: ast.Module) -> list[str]:
    """Private names of bench (imported, or read from an imported bench module) and edits of sys.path."""
    bench_names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bench":
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bench_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bench":
            for alias in node.names:
                if any(part.startswith("_") for part in [*node.module.split("."), alias.name]):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bench_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if (isinstance(node.value, ast.Name) and node.value.id in bench_names and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
            if node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"line {node.lineno}: sys.path")
    return sorted(found, key=lambda f: int(f.split(":")[0][5:]))


def test_the_rule_check_sees_private_names_and_path_edits():
    tree = ast.parse("import sys\nfrom bench import preprocess as pre\nfrom bench.x import _y\n"
                     "import bench._z\nsys.path.insert(0, 'x')\npre._both()\npre.__doc__\n")
    assert _violations(tree) == ["line 3: from bench.x import _y", "line 4: import bench._z", "line 5: sys.path",
                                 "line 6: pre._both"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_study_uses_public_names_only_and_leaves_the_import_path_alone(name):
    path = STUDIES / f"{name}.py"
    tree = ast.parse(path.read_text(), str(path))
    assert _violations(tree) == []
    doc = ast.get_docstring(tree) or ""
    if name != "common":  # every script says how it is run
        assert f"studies/{name}.py" in doc, f"{name}: the docstring's usage names another path"
        assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_every_study_has_a_smoke_test_and_a_line_in_the_readme():
    tested = {node.args[0].value for node in ast.walk(ast.parse(Path(__file__).read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_load"
              and node.args and isinstance(node.args[0], ast.Constant)}
    assert set(SCRIPTS) - {"common"} <= tested  # common is loaded by the others
    readme = (STUDIES / "README.md").read_text()
    assert all(f"`{name}.py`" in readme for name in SCRIPTS)


# ---------------------------------------------------------------------------------------------
# smoke tests on tiny inputs


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """Two generated pairs at 256 px in the ANHIR layout."""
    return write_dataset(tmp_path_factory.mktemp("tiny") / "plain", 2, 777, config=GeneratorConfig(size=256),
                         workers=1)


def test_make_variants_moves_sources_and_landmarks_together(tiny_table, tmp_path, capsys):
    make_variants = _load("make_variants")
    with pytest.raises(SystemExit):  # never inside the repository
        make_variants.main([str(tiny_table), str(STUDIES / "variants")])
    assert not (STUDIES / "variants").exists()
    for mirror in (False, True):
        out = tmp_path / ("mirrored" if mirror else "moved")
        assert make_variants.main([str(tiny_table), str(out), "--copies", "2", *(["--mirror"] if mirror else [])]) == 0
        originals = {p.pair_id: p for p in load_table(tiny_table)}
        variants = load_table(out / "dataset.csv")
        moves = json.loads((out / "moves.json").read_text())
        assert len(variants) == 4 and set(moves) == {v.pair_id for v in variants}
        for v in variants:
            move, original = moves[v.pair_id], originals[moves[v.pair_id]["from"]]
            m = np.array(move["matrix"])
            assert (np.linalg.det(m[:2, :2]) < 0) == mirror and ("mirror" in move["move"]) == mirror
            assert np.allclose(read_landmarks(v.source_landmarks),
                               geometry.apply(m, read_landmarks(original.source_landmarks)), atol=0.01)
            assert v.target_image == original.target_image and v.diagonal == pytest.approx(original.diagonal)
            h, w = cv2.imread(str(v.source_image)).shape[:2]
            assert (read_landmarks(v.source_landmarks) >= 0).all()
            assert (read_landmarks(v.source_landmarks) <= [w - 1, h - 1]).all()
    assert "4 pairs" in capsys.readouterr().out


def test_quality_variants_gray_smaller_and_jittered_with_landmarks(tiny_table, tmp_path, capsys):
    quality_variants = _load("quality_variants")
    with pytest.raises(SystemExit):  # never inside the repository
        quality_variants.main([str(tiny_table), str(STUDIES / "variants")])
    assert not (STUDIES / "variants").exists()
    originals = {p.pair_id: p for p in load_table(tiny_table)}
    plain = quality_variants.build(tiny_table, tmp_path / "plain", copies=2, seed=5)
    assert quality_variants.main([str(tiny_table), str(tmp_path / "v"), "--copies", "2", "--seed", "5", "--gray",
                                  "--longer-side", "128", "--jitter"]) == 0
    assert "dataset.csv" in capsys.readouterr().out
    variants, same_moves = load_table(tmp_path / "v" / "dataset.csv"), load_table(plain)
    notes = json.loads((tmp_path / "v" / "variants.json").read_text())
    assert len(variants) == 4 and set(notes) == {v.pair_id for v in variants}
    for v, p in zip(variants, same_moves, strict=True):
        original = originals[notes[v.pair_id]["from"]]
        factor = notes[v.pair_id]["factor"]
        target = cv2.imread(str(v.target_image))
        source = cv2.imread(str(v.source_image))
        assert max(target.shape[:2]) == 128 and factor == pytest.approx(0.5)
        for img in (source, target):  # 3-channel grayscale (JPEG keeps the channels within a level or two)
            assert np.abs(img.astype(int) - img[..., :1].astype(int)).max() <= 3
        assert v.diagonal == pytest.approx(np.hypot(*target.shape[:2]), abs=0.01)
        assert v.diagonal == pytest.approx(original.diagonal * factor, rel=0.01)
        oh, ow = cv2.imread(str(original.target_image)).shape[:2]
        scale = np.array([target.shape[1] / ow, target.shape[0] / oh])
        assert np.allclose(read_landmarks(v.target_landmarks),
                           (read_landmarks(original.target_landmarks) + 0.5) * scale - 0.5, atol=0.01)
        # the same seed moves the sources the same way, whatever the appearance: same move description
        assert notes[v.pair_id]["move"] == json.loads((tmp_path / "plain" / "variants.json").read_text())[p.pair_id]["move"]
        h, w = source.shape[:2]
        pts = read_landmarks(v.source_landmarks)
        assert (pts >= 0).all() and (pts <= [w - 1, h - 1]).all()
    a = cv2.imread(str(same_moves[0].target_image)).astype(float)
    b = cv2.imread(str(load_table(quality_variants.build(tiny_table, tmp_path / "j", copies=2, seed=5,
                                                         appearance_jitter=True))[0].target_image)).astype(float)
    assert np.abs(a - b).mean() > 2  # the jitter changes the appearance


def _results(folder: Path, rows: list[tuple]) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=["pair_id", "method", "status", "success", "rtre_median", "time_s", "quality"]).to_csv(
        folder / "results.csv", index=False)
    return folder


def test_evaluate_real_prints_one_table_and_the_quality_auc(tmp_path, capsys):
    evaluate_real = _load("evaluate_real")
    a = _results(tmp_path / "a", [("0", "identity", "ok", False, 0.3, 0.0, None),
                                  ("0", "sift", "ok", True, 0.01, 0.5, 2.0), ("1", "sift", "ok", False, 0.2, 0.7, 0.4),
                                  ("0", "surf", "ok", True, 0.02, 1.0, 1.5), ("1", "surf", "failed", False, 0.3, 1.2, None)])
    b = _results(tmp_path / "b", [("0", "sift", "ok", True, 0.01, 0.5, 0.5), ("1", "sift", "ok", False, 0.2, 0.7, 0.9)])
    assert evaluate_real.main([f"mini={a}", f"moved={b}"]) == 0
    out = capsys.readouterr().out
    assert "| sift | 1/2 | 0.1050 | 0.600 | 1/2 | 0.1050 | 0.600 |" in out
    assert "| surf | 1/2 | 0.1600 | 1.100 | - | - | - |" in out
    assert "| identity | 0/1 | 0.3000 | - |" in out
    # over the ok rows but identity's: mini's successes score 2.0 and 1.5, its failure 0.4; moved's upside down
    assert "mini: quality ROC AUC 1.000 over 3 ok rows (2 successes)" in out
    assert "moved: quality ROC AUC 0.000 over 2 ok rows (1 successes)" in out
    assert roc_auc([2.0, 0.4, 1.5], [True, False, True]) == 1.0


def test_quality_auc_reports_run_folders(tmp_path, capsys):
    quality_auc = _load("quality_auc")
    run = _results(tmp_path / "run", [("0", "sift", "ok", True, 0.01, 0.5, 2.0), ("1", "sift", "ok", False, 0.2, 0.7, 0.4),
                                      ("2", "sift", "ok", True, 0.01, 0.5, 0.6), ("0", "surf", "ok", False, 0.3, 1.0, 1.5),
                                      ("1", "surf", "failed", False, 0.3, 1.2, None)])
    quality_auc.main(["runs", str(run)])
    out = capsys.readouterr().out
    assert f"{run}: 4 ok rows (2 successes), 1 other rows" in out
    auc = roc_auc([2.0, 0.4, 0.6, 1.5], [True, False, True, False])
    assert f"all: AUC {auc:.3f}" in out
    assert "sift: AUC 1.000" in out and "surf: AUC nan" in out
    quality_auc.main(["runs", str(run), "--methods", "surf"])
    assert "1 ok rows (0 successes), 1 other rows" in capsys.readouterr().out


def test_quality_auc_generated_design_set_sizes_gray_and_candidates(tmp_path):
    quality_auc = _load("quality_auc")
    table = quality_auc.write_generated(tmp_path, 2, 3, size=256, gray=True, stain_jitter=0.3)
    assert len(table) == 2
    for _, r in table.iterrows():
        img = cv2.imread(str(tmp_path / r["Target image"]))
        assert max(img.shape[:2]) == 256
        assert np.abs(img.astype(int) - img[..., :1].astype(int)).max() <= 3
    cands = quality_auc.generated_candidates(tmp_path, table, 3, disturbed=3, method_names=())
    assert len(cands) == 2 * (2 + 3) and set(cands["kind"]) == {"truth", "preprocessed", "disturbed"}
    truth = cands[cands["kind"] == "truth"]
    assert (truth["rtre"] < 0.01).all() and truth["success"].all() and (truth["quality"] > 0).all()
    # the error estimate offline, on the same candidates
    table.to_csv(tmp_path / "truth.csv", index=False)
    cands.to_csv(tmp_path / "candidates.csv", index=False)
    quality_auc.main(["estimate", str(tmp_path)])
    est = pd.read_csv(tmp_path / "estimate.csv")
    assert len(est) == len(cands) and est["error_estimate"].notna().all()
    assert (est.loc[est["kind"] == "truth", "error_estimate"] < 0.02).all()


def test_frame_cut_pairs_cuts_and_moves_with_the_landmarks_inside(tiny_table, tmp_path):
    frame_cut_pairs = _load("frame_cut_pairs")
    plain = load_table(tiny_table)
    for move in (False, True):
        table = frame_cut_pairs.cut_table(tiny_table, tmp_path / str(move), move)
        pairs = load_table(table)
        assert len(pairs) == len(plain)
        for pair, original in zip(pairs, plain, strict=True):
            for image, marks, before in ((pair.source_image, pair.source_landmarks, original.source_image),
                                         (pair.target_image, pair.target_landmarks, original.target_image)):
                h, w = cv2.imread(str(image)).shape[:2]
                pts = read_landmarks(marks)
                assert len(pts) > 0 and (pts >= 0).all() and (pts <= [w - 1, h - 1]).all()
                bh, bw = cv2.imread(str(before)).shape[:2]
                if not (move and image == pair.source_image):
                    assert h < bh and w < bw  # cut to a window of 60-85 % of each side
        assert len(read_landmarks(pairs[0].source_landmarks)) == len(read_landmarks(pairs[0].target_landmarks))


def test_flip_study_writes_its_sets_and_measures_both_branches(tmp_path, capsys):
    flip_study = _load("flip_study")
    tables = flip_study.make_sets(tmp_path, 2, 31, size=256)
    assert [t.parent.relative_to(tmp_path).as_posix() for t in tables] == [
        "whole/plain", "whole/mirrored", "fov/plain", "fov/mirrored"]
    plain, mirrored = (load_table(t)[0] for t in tables[:2])
    a, b = (cv2.imread(str(p.source_image)) for p in (plain, mirrored))
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert flip_study.main(["measure", str(tables[0]), str(tables[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["mirrored"] for r in rows] == [False, False, True, True]
    for r in rows:
        assert set(r) >= {"flipped", "unflipped", "decided_flipped", "decision", "search_s"}
        assert {"ncc", "angle", "rtre", "mi256_2"} <= set(r["flipped"])
    (tmp_path / "rows.jsonl").write_text("\n".join(lines))
    assert flip_study.main(["analyse", str(tmp_path / "rows.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 pairs (2 mirrored)") and "decision rules" in out
    # grayscale sets: three equal channels
    gray = flip_study.make_sets(tmp_path / "gray", 1, 31, size=256, gray=True)
    img = cv2.imread(str(load_table(gray[3])[0].source_image))
    assert np.abs(img.astype(int) - img[..., :1]).max() <= 2  # JPEG keeps the channels (almost) equal
    # outcome: the harness's choice read from run rows (the orientation record, else the stage's primary)
    diag = [{"preprocess": {"flipped": True}, "orientation": {"chosen": "as scanned"}},  # saved
            {"preprocess": {"flipped": True}},  # lost to a flip
            {"preprocess": {"flipped": False}, "orientation": {"chosen": "mirrored"}},  # found
            {}]  # no stage (identity): not counted
    sources = [str(tmp_path / f"x/{s}/00_source.jpg") for s in ("plain", "plain", "mirrored", "plain")]
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"method": "m", "source_image": sources, "success": [True, False, True, False],
                  "diagnostics": [json.dumps(d) for d in diag]}).to_csv(run / "results.csv", index=False)
    assert flip_study.main(["outcome", str(run)]) == 0
    out = capsys.readouterr().out
    assert "m: unmirrored 2, primary wrong 2, lost to a flip 1, mirrored 1, primary right 0, found 1" in out
    assert "close calls 2, success unmirrored 1, success mirrored 1" in out


def test_mask_gallery_draws_every_image_once(tiny_table, tmp_path, capsys):
    mask_gallery = _load("mask_gallery")
    out = tmp_path / "masks.png"
    mask_gallery.main([str(tiny_table), str(out), "--side", "64", "--columns", "3"])
    assert "4 images" in capsys.readouterr().out
    assert cv2.imread(str(out)).shape == (2 * (64 + 22), 3 * 64, 3)  # 4 panels in rows of 3


def test_nonrigid_defaults_runs_on_tiny_inputs(capsys):
    nonrigid_defaults = _load("nonrigid_defaults")
    nonrigid_defaults.main(["--quick", "--method", "deformable"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| deformable")]
    assert len(table) == 2  # the deformed and the not deformed cases
    before, after = (float(v) for v in table[0].split("|")[4:6])
    assert after < before  # the known deformation is (partly) recovered even with the tiny settings
