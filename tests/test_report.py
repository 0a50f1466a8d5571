"""Tests of the report (bench.report): tables equal an independent recomputation from results.csv, plots
and gallery are drawn, report.html has every section and renders, ANHIR export, clear errors.

The run folder used here is computed, not written by hand: synthetic pairs (random blobs warped by a known
affine, JPEG + ANHIR landmark CSVs), four small estimators actually run on them (identity, the true
matrix, a perturbed true matrix and a centre-of-mass translation that refuses large shifts), and every
result number comes from those computations.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import geometry, record
from bench import quality as bench_quality
from bench.anhir_import import import_anhir
from bench.method import ImageView
from bench.pairs import file_digest, read_landmarks, write_landmarks
from bench.report import (
    ReportError,
    build_report,
    export_anhir,
    latest_run,
    load_runs,
    page,
    plots,
    reliability,
)
from bench.report import gallery as gal
from bench.report.load import warped_file

THRESHOLD = 0.035
H, W = 240, 320
COLUMNS = list(record.COLUMNS)  # the fixture writes results.csv as the store would (one declaration of the schema)


# ---------------------------------------------------------------- a real, small run folder


def blobs(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: stained-looking ellipses on a white slide."""
    img = np.full((H, W, 3), 245, np.uint8)
    for _ in range(14):
        centre = (int(rng.integers(40, W - 40)), int(rng.integers(40, H - 40)))
        axes = (int(rng.integers(8, 34)), int(rng.integers(8, 34)))
        colour = tuple(int(c) for c in rng.integers(60, 200, size=3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return cv2.GaussianBlur(img, (5, 5), 1.5)


def centroid(gray_inv: np.ndarray) -> np.ndarray:
    m = cv2.moments(gray_inv.astype(np.float32))
    return np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


class Refused(Exception):
    pass


def estimate(method: str, source: np.ndarray, target: np.ndarray, truth: np.ndarray, rng) -> np.ndarray:
    """The four estimators of the fixture (each returns source -> target, original pixels)."""
    if method == "identity":
        return np.eye(3)
    if method == "oracle":
        return truth
    if method == "jitter":
        return (
            geometry.rotation(rng.uniform(-2, 2), (W / 2, H / 2))
            @ geometry.translation(*rng.uniform(-3, 3, 2))
            @ truth
        )
    inv = [1.0 - cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) / 255.0 for im in (source, target)]
    shift = centroid(inv[1]) - centroid(inv[0])
    if np.hypot(*shift) > 20:
        raise Refused(f"centre-of-mass shift {np.hypot(*shift):.1f} px beyond 20 px")
    return geometry.translation(*shift)


def score(moved, source, target, diagonal):
    n = min(len(moved), len(target), len(source))
    after = np.linalg.norm(moved[:n] - target[:n], axis=1) / diagonal
    before = np.linalg.norm(source[:n] - target[:n], axis=1) / diagonal
    return {
        "n_landmarks": n, "rtre_median": np.median(after), "rtre_mean": after.mean(), "rtre_max": after.max(),
        "rtre_min": after.min(), "rtre_std": after.std(), "ire_median": np.median(before),
        "robustness": float(np.mean(after < before)),
    }


def make_dataset(root: Path, seed: int = 0, n_pairs: int = 6) -> tuple[Path, list[dict]]:
    """Pairs with a known affine; pair 0 is shifted far (the centroid method refuses it), the last pair is an
    'evaluation' pair without target landmarks."""
    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for i in range(n_pairs):
        tissue = ("blobs", "spots")[i % 2]
        folder = root / f"{tissue}_{i}" / "scale-100pc"
        folder.mkdir(parents=True)
        target = blobs(rng)
        truth = geometry.random_affine(rng, (W / 2, H / 2), max_rotation_deg=25, scale_range=(0.92, 1.08),
                                       max_shear=0.03, max_translation=8)
        if i == 0:
            truth = geometry.translation(50, -20) @ truth
        source = cv2.warpAffine(target, np.linalg.inv(truth)[:2], (W, H), borderValue=(245, 245, 245))
        cv2.imwrite(str(folder / "target.jpg"), cv2.cvtColor(target, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "source.jpg"), cv2.cvtColor(source, cv2.COLOR_RGB2BGR))
        t_lnd = np.column_stack([rng.uniform(10, W - 10, 200), rng.uniform(10, H - 10, 200)])
        s_lnd = geometry.apply(np.linalg.inv(truth), t_lnd)
        inside = np.all((s_lnd > 10) & (s_lnd < [W - 10, H - 10]), axis=1)  # landmarks seen in both images
        t_lnd, s_lnd = t_lnd[inside][:12], s_lnd[inside][:12]
        write_landmarks(folder / "source.csv", s_lnd[:10] if i == 1 else s_lnd)  # pair 1: 10 vs 12 rows
        evaluation = i == n_pairs - 1
        if not evaluation:
            write_landmarks(folder / "target.csv", t_lnd)
        rel = f"{tissue}_{i}/scale-100pc/"
        rows.append({"": i, "Source image": rel + "source.jpg", "Source landmarks": rel + "source.csv",
                     "Target image": rel + "target.jpg", "Target landmarks": "" if evaluation else rel + "target.csv",
                     "Image diagonal [pixels]": math.hypot(H, W), "Image size [pixels]": f"({H}, {W})",
                     "status": "evaluation" if evaluation else "training"})
        pairs.append(
            {"pair_id": str(i), "tissue": tissue, "folder": folder, "truth": truth, "evaluation": evaluation}
        )
    table = root / "dataset.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table, pairs


def view(rgb: np.ndarray) -> ImageView:
    """The image as a method sees it: inverted grayscale in [0, 1] and a tissue mask."""
    inv = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return ImageView(image=inv, mask=np.ones(inv.shape, bool))  # whole slide: the blobs are small


def result_row(pair: dict, method: str, run: Path, rng) -> dict:
    f = pair["folder"]
    t0 = time.perf_counter()
    src = cv2.cvtColor(cv2.imread(str(f / "source.jpg")), cv2.COLOR_BGR2RGB)
    tgt = cv2.cvtColor(cv2.imread(str(f / "target.jpg")), cv2.COLOR_BGR2RGB)
    t_pre = time.perf_counter() - t0
    status, error, fallback = "ok", "", False
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        matrix = estimate(method, src, tgt, pair["truth"], rng)
    except Refused as exc:
        status, error, fallback, matrix = "failed", f"RegistrationFailed: {exc}", True, np.eye(3)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    s_lnd = read_landmarks(f / "source.csv")
    moved = geometry.apply(matrix, s_lnd)
    write_landmarks(warped_file(run, method, pair["pair_id"]), moved)
    # the harness's landmark-free quality on ok rows (the working frame is the original one here)
    q = bench_quality.alignment_quality(view(tgt), view(src), matrix) if status == "ok" else math.nan
    diag = math.hypot(H, W)
    row = {"pair_id": pair["pair_id"], "tissue": pair["tissue"], "method": method, "method_version": "1",
           "status": status, "error": error, "time_s": wall, "time_source": "measured", "time_cpu_s": cpu, "time_preprocess_s": t_pre,
           "device": "cpu", "params": "{}", "matrix": json.dumps(matrix.tolist()), "diagnostics": "{}",
           "fallback": fallback, "source_image": str(f / "source.jpg"), "target_image": str(f / "target.jpg"),
           "source_landmarks": str(f / "source.csv"), "diagonal": diag, "success": False,
           "target_landmarks": "" if pair["evaluation"] else str(f / "target.csv"), "quality": q}
    if pair["evaluation"]:
        row["status"] = "unscored" if status == "ok" else status
        return row
    row.update(score(moved, s_lnd, read_landmarks(f / "target.csv"), diag))
    row["success"] = bool(status == "ok" and row["rtre_median"] <= THRESHOLD)
    return row


def make_run(run: Path, table: Path, pairs: list[dict], methods=("identity", "oracle", "jitter", "centroid"),
             seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True)
    rows = [result_row(p, m, run, rng) for p in pairs for m in methods]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(run / "results.csv", index=False)
    manifest = {
        "schema_version": record.SCHEMA_VERSION, "command": "tests/test_report.py make_run", "git_commit": "n/a (test fixture)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {"cpus": 2}, "packages": {"numpy": np.__version__},
        "dataset": {"path": str(table), "sha256": file_digest(table), "n_pairs": len(pairs)},
        "preprocess": {"params": {}}, "methods": {m: {"version": "1", "params": {}} for m in methods},
        "success_threshold": THRESHOLD, "device": "cpu", "reference_time_s": 0.05,
    }
    (run / "run.json").write_text(json.dumps(manifest, indent=2))
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    table, pairs = make_dataset(root / "data")
    return {"root": root, "table": table, "pairs": pairs}


@pytest.fixture(scope="module")
def run_dir(data):
    return make_run(data["root"] / "runs" / "run-a", data["table"], data["pairs"])


@pytest.fixture(scope="module")
def report(run_dir):
    return build_report([run_dir])


# ---------------------------------------------------------------- Table 1 against an independent recomputation


def recompute(results: pd.DataFrame, ref: float = 0.05) -> pd.DataFrame:
    """Table 1 from results.csv with plain pandas, independent of bench.report's code (``ref``: the run's
    reference_time_s)."""
    out = {}
    for method, g in results.groupby("method"):
        scored = g[g["rtre_median"].notna()]
        evaluable = g[g["rtre_median"].notna() | g["status"].isin(["failed", "timeout"])]
        timed = g[(g["status"] != "timeout") & g["time_s"].notna()]
        out[method] = {
            "median_rtre": scored["rtre_median"].median(), "average_rtre": scored["rtre_median"].mean(),
            "average_max_rtre": scored["rtre_max"].mean(), "mean_time_ms": timed["time_s"].mean() * 1000,
            "median_time_ms": timed["time_s"].median() * 1000, "mean_time_ref": timed["time_s"].mean() / ref,
            "median_time_ref": timed["time_s"].median() / ref,
            "success_rate_pct": 100 * (evaluable["success"].astype(str) == "True").mean(),
            "robustness_mean": scored["robustness"].mean(), "pairs_scored": len(scored),
            "failures": int(g["status"].isin(["failed", "timeout"]).sum()),
        }
    return pd.DataFrame(out).T


def test_table1_equals_recomputation_from_results_csv(report, run_dir):
    table = pd.read_csv(report.parent / "tables" / "table1.csv").set_index("method")
    expected = recompute(pd.read_csv(run_dir / "results.csv", dtype={"success": str}))
    assert sorted(table.index) == sorted(expected.index) == ["centroid", "identity", "jitter", "oracle"]
    for col in expected.columns:
        np.testing.assert_allclose(table.loc[expected.index, col].to_numpy(float), expected[col].to_numpy(float),
                                   rtol=1e-12, err_msg=col)
    assert table.loc["oracle", "median_rtre"] < 1e-6 < table.loc["identity", "median_rtre"]
    assert table.loc["centroid", "failures"] == 1  # pair 0's large shift is refused and scored with identity


def test_markdown_table1_has_one_row_per_method_and_the_papers_columns(report):
    lines = (report.parent / "tables" / "table1.md").read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("Method", "Median of per-pair median rTRE", "Mean of per-pair median rTRE",
                "Mean of per-pair max rTRE", "Time, median [ms]", "Time, mean [ms]", "Time, median [× ref]",
                "Success [%]", "Robustness", "Pairs scored", "Failures", "Device"):
        assert col in header
    assert "Time source" not in header  # only when a row's time was reported by an imported tool
    assert [r.split("|")[1].strip() for r in lines[2:6]] == ["identity", "oracle", "jitter", "centroid"]
    tex = (report.parent / "tables" / "table1.tex").read_text()
    assert "\\toprule" in tex and tex.count("\\\\") == 5
    for fmt in ("md", "tex", "html"):  # the machine-normalised time is in every format
        assert "× ref]" in (report.parent / "tables" / f"table1.{fmt}").read_text(), fmt
    csv_cols = pd.read_csv(report.parent / "tables" / "table1.csv").columns
    assert {"mean_time_ms", "median_time_ms", "mean_time_ref", "median_time_ref", "time_source"} <= set(csv_cols)


def test_per_tissue_and_status_tables(report, run_dir):
    tissue = pd.read_csv(report.parent / "tables" / "per_tissue.csv")
    assert set(tissue["tissue"]) == {"blobs", "spots"} and len(tissue) == 8
    results = pd.read_csv(run_dir / "results.csv")
    g = results[(results["method"] == "jitter") & (results["tissue"] == "spots")]
    row = tissue[(tissue["label"] == "jitter") & (tissue["tissue"] == "spots")].iloc[0]
    assert row["median_rtre"] == pytest.approx(g["rtre_median"].median(), rel=1e-12)
    status = pd.read_csv(report.parent / "tables" / "per_pair_status.csv")
    assert set(status["pair_status"]) == {"training", "evaluation"}  # read from the run's pair table
    counts = pd.read_csv(report.parent / "tables" / "status_counts.csv").set_index("label")
    assert counts.loc["centroid", "failed"] == 1 and counts.loc["oracle", "unscored"] == 1


def test_initial_row_uses_each_pair_once(report, run_dir):
    init = pd.read_csv(report.parent / "tables" / "initial.csv").iloc[0]
    ire = pd.read_csv(run_dir / "results.csv").drop_duplicates("pair_id")["ire_median"].dropna()
    assert init["pairs_scored"] == 5 and init["median_rtre"] == pytest.approx(ire.median())


# ---------------------------------------------------------------- figures, statistics, gallery


def _nonblank_png(path: Path) -> bool:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return img is not None and img.shape[0] > 50 and float(img.std()) > 5


PLOTS = ("figure2_cdf", "success_vs_threshold", "pairs_rtre", "accuracy_vs_time", "success_per_tissue", "quality_roc")


def test_every_plot_is_written_as_png_and_svg(report):
    for stem in PLOTS:
        assert _nonblank_png(report.parent / "figures" / f"{stem}.png"), stem
        assert "<svg" in (report.parent / "figures" / f"{stem}.svg").read_text()[:2000]


def test_landmark_errors_recomputed_from_files_agree_with_results(run_dir):
    from bench.report.load import landmark_errors

    runs, df = load_runs([run_dir])
    after, before, notes = landmark_errors(runs, df)
    assert notes == []
    medians = after.groupby(["label", "pair_key"])["rtre"].median()
    scored = df[df["scored"]].set_index(["label", "pair_key"])["rtre_median"]
    np.testing.assert_allclose(medians.loc[scored.index].to_numpy(), scored.to_numpy(), rtol=1e-9, atol=1e-12)
    assert (
        len(after[(after["label"] == "oracle") & after["pair_key"].str.endswith(":1")]) == 10
    )  # first N common


def test_success_curve_at_the_threshold_equals_the_stored_success(run_dir):
    _, df = load_runs([run_dir])
    stored = df[df["evaluable"]].groupby("label")["success"].mean() * 100
    curve = plots.success_at(df, THRESHOLD)
    np.testing.assert_allclose(curve.loc[stored.index].to_numpy(), stored.to_numpy())


def test_wilcoxon_and_bootstrap(report, run_dir):
    tests = pd.read_csv(report.parent / "tables" / "wilcoxon.csv")
    assert len(tests) == 6
    res = pd.read_csv(run_dir / "results.csv", dtype={"pair_id": str})
    a = res[res["method"] == "identity"].set_index("pair_id")["rtre_median"].dropna()
    b = res[res["method"] == "jitter"].set_index("pair_id")["rtre_median"].dropna()
    common = a.index.intersection(b.index)
    row = tests[(tests["method_a"] == "identity") & (tests["method_b"] == "jitter")].iloc[0]
    assert row["n"] == len(common) == 5
    assert row["p_value"] == pytest.approx(sps.wilcoxon(a[common], b[common]).pvalue)
    assert (tests["p_holm"].dropna() >= tests["p_value"].dropna() - 1e-15).all()
    boot = pd.read_csv(report.parent / "tables" / "bootstrap.csv").set_index("label")
    for label, r in boot.iterrows():
        assert r["median_rtre_ci_low"] <= r["median_rtre"] <= r["median_rtre_ci_high"], label
        assert r["success_ci_low_pct"] <= r["success_rate_pct"] <= r["success_ci_high_pct"], label
    again = build_report([run_dir], run_dir.parent / "again")
    pd.testing.assert_frame_equal(
        pd.read_csv(again.parent / "tables" / "bootstrap.csv").set_index("label"), boot
    )


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_gallery_warp_composes_the_stored_matrix_with_the_reduction(run_dir):
    runs, df = load_runs([run_dir])
    row = next(df[(df["label"] == "oracle") & (df["pair_id"] == "2")].itertuples(index=False))
    view = gal.PairView(row, runs[0], max_side=160)  # a 2x reduction of 320 x 240
    assert view.size == (160, 120)
    after, before = _ncc(view.target, view.warped(view.matrix)), _ncc(view.target, view.warped(np.eye(3)))
    assert after > 0.9 and after > before + 0.2
    inside = view.warped(view.matrix) > 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(
        view.w_lnd, view.t_lnd, atol=1e-6
    )  # the oracle's landmarks land on the targets


def test_gallery_files_show_the_worst_pairs(report, run_dir):
    files = sorted((report.parent / "gallery").glob("*.png"))
    assert len(files) == 5 and all(_nonblank_png(f) for f in files)  # comparison + one per method
    _, df = load_runs([run_dir])
    worst = gal.worst_rows(df, "identity", 3)
    scored = df[(df["label"] == "identity") & df["scored"]]["rtre_median"]
    assert list(worst["rtre_median"]) == sorted(scored, reverse=True)[:3]


# ---------------------------------------------------------------- the HTML page


def chromium() -> str | None:
    """The browser that renders the report page; in CI (``CI`` set, where ``.ci/run`` installs Chromium) a
    missing browser fails the test instead of skipping it, so the page is rendered in every CI run."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None and os.environ.get("CI"):
        pytest.fail("CI is set but no Chromium was found: .ci/run installs it (apt-get install chromium)")
    return exe


def render(page_path: Path, shot: Path, size: tuple[int, int]) -> list[str]:
    """Screenshot ``page_path`` in headless Chromium; returns every message the page wrote to the console (the
    report has no script: any message is an error, e.g. an uncaught exception or a resource that failed)."""
    exe = chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium) - cannot render report.html")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={tempfile.mkdtemp()}",
           f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", page_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_report_html_has_every_section_and_renders(report):
    text = report.read_text()
    for sid in page.SECTIONS:
        assert f'<section id="{sid}">' in text, sid
    assert text.count("data:image/png;base64,") >= 1 + 4 + 5  # Figure 2, four plots, gallery
    assert 'src="http' not in text and "<link" not in text  # self-contained
    for method in ("identity", "oracle", "jitter", "centroid"):
        assert f"<td>{method}</td>" in text


def test_render_hears_console_errors(tmp_path):
    page_path = tmp_path / "broken.html"
    page_path.write_text("<html><body><p>x</p><script>console.error('boom'); notDefined();</script></body></html>")
    errors = render(page_path, tmp_path / "broken.png", (300, 200))
    assert any("boom" in e for e in errors) and any("notDefined" in e for e in errors)


def test_report_html_screenshot_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    errors = render(report, shot, (1400, 3000))
    assert errors == []
    assert _nonblank_png(shot)
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (3000, 1400)
    rgb = img[..., ::-1].astype(float)
    colours = plots.palette(["identity", "oracle", "jitter", "centroid"])  # the report's method colours
    for label, colour in colours.items():  # every method's curve or marker is on screen, not only text
        near = np.abs(rgb - np.array(colour) * 255).max(axis=2) < 12
        assert near.sum() > 200, label


def test_palette_keeps_many_labels_apart():
    """11-20 labels (e.g. 8 methods and their `--then` refinements) get distinct colours at least as far apart
    (RGB distance) as tab20's closest pair, 0.098 (15 husl hues, used before, had pairs at 0.084 that looked
    alike in the capture-range figure); the first ten are tab20's strong colours. More labels: husl, distinct."""
    for n in (11, 15, 20, 25):
        colours = np.array(list(plots.palette([f"m{i}" for i in range(n)]).values()))
        gaps = np.linalg.norm(colours[:, None] - colours[None], axis=2) + np.eye(n) * 9
        assert gaps.min() > (0.09 if n <= 20 else 0.0), (n, gaps.min())
    first = np.array(list(plots.palette([f"m{i}" for i in range(15)]).values()))[:10]
    assert np.allclose(first, np.array(plots.sns.color_palette("tab20", 20))[::2])


# ---------------------------------------------------------------- several runs, export, errors


def test_several_runs_are_keyed_by_method_device_and_run(data, run_dir, tmp_path):
    second = make_run(tmp_path / "run-b", data["table"], data["pairs"], methods=("oracle", "jitter"), seed=7)
    # same (method, device) in two runs: labels carry the run name
    runs, df = load_runs([run_dir, second])
    assert {"jitter (run-a)", "jitter (run-b)", "identity"} <= set(df["label"])
    # a method stored under another device (as a GPU run would store it) is keyed by its device
    res = pd.read_csv(second / "results.csv")
    res["device"] = "cuda:0"
    res.to_csv(second / "results.csv", index=False)
    page_path = build_report([run_dir, second], tmp_path / "both")
    table = pd.read_csv(page_path.parent / "tables" / "table1.csv")
    assert {"oracle [cpu]", "oracle [cuda:0]", "jitter [cpu]", "jitter [cuda:0]", "centroid"} <= set(
        table["label"]
    )
    assert len(table) == 6 and "Run" in (page_path.parent / "tables" / "table1.md").read_text()


def test_export_anhir_layout(run_dir, data, tmp_path):
    out = export_anhir(run_dir, "jitter", tmp_path / "sub")
    table = pd.read_csv(out / "registration-results.csv", dtype=str, keep_default_na=False)
    original = pd.read_csv(data["table"], dtype=str, keep_default_na=False)
    assert list(table.columns) == list(original.columns) + [
        "Warped source landmarks",
        "Execution time [minutes]",
        "Method status",
        "Method error",
    ]
    pd.testing.assert_frame_equal(table[original.columns], original)
    res = pd.read_csv(run_dir / "results.csv", dtype={"pair_id": str}).set_index("pair_id")
    res = res[res["method"] == "jitter"]
    for _, r in table.iterrows():
        pid = r.iloc[0]
        lnd = out / r["Warped source landmarks"]
        assert not Path(r["Warped source landmarks"]).is_absolute() and lnd.is_file()
        np.testing.assert_allclose(
            read_landmarks(lnd), read_landmarks(run_dir / "warped-landmarks/jitter" / f"{pid}.csv")
        )
        expected = (res.loc[pid, "time_s"] + res.loc[pid, "time_preprocess_s"]) / 60
        assert float(r["Execution time [minutes]"]) == pytest.approx(expected)
    with pytest.raises(ReportError, match="not in this run"):
        export_anhir(run_dir, "nosuch", tmp_path / "x")


def test_latest_run_picks_the_newest(data, run_dir, tmp_path):
    old = make_run(tmp_path / "old", data["table"], data["pairs"][:2], methods=("identity",))
    new = make_run(tmp_path / "new", data["table"], data["pairs"][:2], methods=("identity",))
    (tmp_path / "not-a-run").mkdir()
    import os

    os.utime(old / "results.csv", (time.time() - 100, time.time() - 100))
    assert latest_run(tmp_path) == new
    with pytest.raises(ReportError, match="no run folder"):
        latest_run(tmp_path / "not-a-run")


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_clear_errors(run_dir, tmp_path):
    with pytest.raises(ReportError, match="run folder not found"):
        build_report([tmp_path / "missing"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="no run.json"):
        build_report([foreign])
    (foreign / "run.json").write_text(json.dumps({"schema_version": record.SCHEMA_VERSION}))
    with pytest.raises(ReportError, match="not a histreg-bench results file"):
        build_report([foreign])
    old = _copy_run(run_dir, tmp_path / "old")
    manifest = json.loads((old / "run.json").read_text())
    manifest["schema_version"] = 0
    (old / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match="older results schema 0"):
        build_report([old])
    del manifest["schema_version"]
    (old / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match="older results schema"):
        build_report([old])
    empty = _copy_run(run_dir, tmp_path / "unscored")
    res = pd.read_csv(empty / "results.csv")
    res = res[res["rtre_median"].isna()]  # keep only the evaluation pair's rows
    res.to_csv(empty / "results.csv", index=False)
    with pytest.raises(ReportError, match="no scored pairs") as info:
        build_report([empty])
    assert "\n" not in str(info.value)
    assert export_anhir(empty, "oracle", tmp_path / "sub").is_dir()  # an evaluation-only run still exports


def test_rows_run_would_refuse_are_refused(run_dir, tmp_path):
    """The report reads through the record's one reader: a junk line or a second row for one (pair, method),
    which `bench run` refuses, is refused here too, naming its line."""
    dup = _copy_run(run_dir, tmp_path / "dup")
    lines = (dup / "results.csv").read_text().splitlines()
    (dup / "results.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(ReportError, match=f"line {len(lines) + 1}: a second row for pair '0'"):
        build_report([dup])
    (dup / "results.csv").write_text("\n".join([*lines, "not,a,result,row"]) + "\n")
    with pytest.raises(ReportError, match=f"line {len(lines) + 1}: not a result row"):
        build_report([dup])


# ---------------------------------------------------------------- the report cannot mislead


def _set_manifest(run: Path, **dataset) -> None:
    manifest = json.loads((run / "run.json").read_text())
    manifest["dataset"].update(dataset)
    (run / "run.json").write_text(json.dumps(manifest))


def test_generated_data_is_said_in_titles_and_summaries(run_dir, report, tmp_path):
    text = report.read_text()
    assert "generated data" not in text.lower()  # the fixture's table says nothing of the generator
    assert "generated data" not in (report.parent / "report.md").read_text().lower()
    gen = _copy_run(run_dir, tmp_path / "sample")
    _set_manifest(gen, embedded_sample=True)
    page_path = build_report([gen])
    html_text = page_path.read_text()
    title = html_text.split("<title>")[1].split("</title>")[0]
    h1 = html_text.split("<h1>")[1].split("</h1>")[0]
    summary = html_text.split('<section id="summary">')[1].split("</section>")[0]
    assert "generated data" in title and "generated data" in h1 and "GENERATED DATA" in summary
    md = (page_path.parent / "report.md").read_text()
    assert md.splitlines()[0].startswith("# ") and "generated data" in md.splitlines()[0]
    assert "GENERATED DATA" in md
    for fmt in ("md", "tex", "html"):
        assert "GENERATED DATA" in (page_path.parent / "tables" / f"table1.{fmt}").read_text(), fmt
    if chromium() is not None:  # rendered, the page shows the red "generated data" box (the .warn border colour)
        shot = tmp_path / "shot.png"
        assert render(page_path, shot, (1200, 900)) == []
        assert _pixels_near(shot, (0xC6 / 255, 0x28 / 255, 0x28 / 255), tol=8) > 300
    # a table written by the generator is recognised by its tissue names, without the manifest flag
    from bench.report.load import generated_reason

    assert generated_reason({"dataset": {}}, pd.DataFrame({"tissue": ["colon-ihc", "breast-like"]}))


def _pixels_near(png: Path, rgb: tuple[float, float, float], tol: int = 10) -> int:
    img = cv2.imread(str(png))[..., ::-1].astype(float)
    return int((np.abs(img - np.array(rgb) * 255).max(axis=2) < tol).sum())


def test_figure2_shows_the_initial_curve_under_identity(report):
    """identity leaves every landmark where it was, so its curve is the initial one: the initial curve is
    drawn first, wide and light, and stays visible around identity's."""
    png = report.parent / "figures" / "figure2_cdf.png"
    light = tuple(1 - 0.35 * (1 - c) for c in plots.INITIAL_COLOUR)  # the grey at alpha 0.35 on white
    assert _pixels_near(png, light, tol=6) > 2000


def test_auc_is_the_mann_whitney_statistic_and_the_area_under_the_roc():
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.4
    q = np.round(rng.normal(y * 1.0, 1.0), 1)  # overlapping classes with ties
    pos, neg = q[y], q[~y]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    value = reliability.auc(q, y)
    assert value == pytest.approx(brute, rel=1e-12) and 0.6 < value < 0.9
    fpr, tpr, _ = reliability.roc_points(q, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(value, rel=1e-12)
    assert math.isnan(reliability.auc(q[y], y[y]))  # one class only


def test_quality_tables_against_results_csv(report, run_dir):
    res = pd.read_csv(run_dir / "results.csv", dtype={"pair_id": str})
    threshold = bench_quality.LIKELY_FAILED_BELOW  # the report reads it there, and says so
    rated = res[(res["status"] == "ok") & res["rtre_median"].notna() & res["quality"].notna()]
    y = rated["success"].astype(bool).to_numpy()
    assert 0 < y.sum() < len(y)
    q = pd.read_csv(report.parent / "tables" / "quality.csv").set_index("label")
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in rated["quality"][y] for b in rated["quality"][~y]])
    assert q.loc["all methods", "n_rows"] == len(rated) and q.loc["all methods", "auc"] == pytest.approx(brute)
    lf = pd.read_csv(report.parent / "tables" / "likely_failed.csv", dtype={"pair_id": str})
    expected = res[res["quality"] < threshold]
    assert sorted(zip(lf["label"], lf["pair_id"], strict=True)) == sorted(
        zip(expected["method"], expected["pair_id"], strict=True)
    )
    assert set(lf.loc[lf["status"] == "unscored", "success"]) <= {"unknown (no target landmarks)"}
    text = report.read_text()
    assert "ROC AUC" in text and '<section id="quality">' in text
    assert f"Rows with quality below <b>{threshold:g}</b> (bench.quality.LIKELY_FAILED_BELOW)" in text


def test_composed_method_names_display_everywhere(run_dir, tmp_path):
    """Names like ``sift|iterative|preprocessed`` and ``learned>iterative`` (composed methods) in every format."""
    run = _copy_run(run_dir, tmp_path / "composed")
    names = {"jitter": "sift|iterative|preprocessed", "centroid": "learned>iterative"}
    res = pd.read_csv(run / "results.csv", dtype=str, keep_default_na=False)
    for old, new in names.items():
        for pid in res.loc[res["method"] == old, "pair_id"]:
            dest = warped_file(run, new, pid)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(warped_file(run, old, pid), dest)
    res["method"] = res["method"].replace(names)
    composed = res["method"] == "sift|iterative|preprocessed"
    decided = ["sift" if i % 2 else "iterative" for i in range(int(composed.sum()))]  # as bench.compose records
    res.loc[composed, "diagnostics"] = [json.dumps({"expression": "sift|iterative|preprocessed", "decided": d,
                                                    "decision": "accepted"}) for d in decided]
    res.to_csv(run / "results.csv", index=False)
    page_path = build_report([run], tmp_path / "composed-report")
    who = pd.read_csv(page_path.parent / "tables" / "composed.csv").set_index("decided")
    assert who.loc["sift", "n_rows"] == decided.count("sift") and who.loc["iterative", "n_rows"] == decided.count(
        "iterative"
    )
    assert "which member decided" in page_path.read_text()
    out = page_path.parent
    html_text = page_path.read_text()
    assert "<td>sift|iterative|preprocessed</td>" in html_text and "<td>learned&gt;iterative</td>" in html_text
    assert "recomputed median rTRE differs" not in html_text and "lack a readable" not in html_text
    md = (out / "tables" / "table1.md").read_text()
    assert "| sift\\|iterative\\|preprocessed |" in md  # escaped: the row keeps its column count
    assert all(line.count(" | ") == md.splitlines()[0].count(" | ") for line in md.splitlines()[2:6])
    tex = (out / "tables" / "table1.tex").read_text()
    assert "sift\\textbar{}iterative\\textbar{}preprocessed" in tex and "learned\\textgreater{}iterative" in tex
    gallery_files = sorted(p.name for p in (out / "gallery").glob("worst_*.png"))
    assert len(gallery_files) == 4 and all("|" not in n and ">" not in n for n in gallery_files)
    assert all(_nonblank_png(out / "figures" / f"{stem}.png") for stem in PLOTS)
    runs, df = load_runs([run])
    row = next(df[(df["method"] == "learned>iterative") & (df["pair_id"] == "2")].itertuples(index=False))
    assert gal.PairView(row, runs[0]).w_lnd is not None  # the gallery finds the composed method's landmarks
    sub = export_anhir(run, "sift|iterative|preprocessed", tmp_path / "sub")
    table = pd.read_csv(sub / "registration-results.csv", dtype=str, keep_default_na=False)
    assert all((sub / rel).is_file() for rel in table["Warped source landmarks"])


# ---------------------------------------------------------------- ANHIR import


def _export_import(run_dir, data, tmp_path, method="jitter", name="outside"):
    sub = export_anhir(run_dir, method, tmp_path / "sub")
    other = make_run(tmp_path / "other", data["table"], data["pairs"], methods=("identity",), seed=5)
    summary = import_anhir(other, name, sub / "registration-results.csv")
    return sub, other, summary


def test_import_anhir_round_trip_equals_the_original_scores(run_dir, data, tmp_path):
    sub, other, summary = _export_import(run_dir, data, tmp_path, method="centroid")
    assert summary.counts == {"failed": 1, "ok": 4, "unscored": 1}  # centroid refused pair 0
    res = pd.read_csv(other / "results.csv", dtype={"pair_id": str})
    imported = res[res["method"] == "outside"].set_index("pair_id").sort_index()
    original = pd.read_csv(run_dir / "results.csv", dtype={"pair_id": str})
    original = original[original["method"] == "centroid"].set_index("pair_id").sort_index()
    for col in ("rtre_median", "rtre_mean", "rtre_max", "ire_median", "robustness", "n_landmarks"):
        np.testing.assert_allclose(imported[col].to_numpy(float), original[col].to_numpy(float), rtol=1e-12,
                                   equal_nan=True, err_msg=col)
    assert list(imported["success"]) == list(original["success"])
    assert list(imported["status"]) == list(original["status"])  # the tool's own failure verdict is kept
    assert list(imported["fallback"]) == list(original["fallback"])
    np.testing.assert_allclose(imported["time_s"], original["time_s"] + original["time_preprocess_s"], rtol=1e-9)
    assert set(imported["time_source"]) == {"reported"} and set(imported["method_version"]) == {"imported"}
    for pid in imported.index:  # stored like the run's own warped landmarks
        np.testing.assert_allclose(read_landmarks(warped_file(other, "outside", pid)),
                                   read_landmarks(warped_file(run_dir, "centroid", pid)))
    manifest = json.loads((other / "run.json").read_text())
    rec = manifest["methods"]["outside"]
    assert rec["version"] == "imported"
    assert rec["source"] == {"table": str((sub / "registration-results.csv").resolve()),
                             "sha256": file_digest(sub / "registration-results.csv")}
    # the report shows the imported rows beside the built-in ones, with the caveat
    page_path = build_report([other])
    md = (page_path.parent / "tables" / "table1.md").read_text()
    assert "Time source" in md and "reported by the tool" in md and md.count("| outside |") == 1
    for fmt in ("md", "tex", "html"):
        assert "not from the harness" in (page_path.parent / "tables" / f"table1.{fmt}").read_text()
    assert "import-anhir" in page_path.read_text()
    table = pd.read_csv(page_path.parent / "tables" / "table1.csv").set_index("label")
    assert table.loc["outside", "median_rtre"] == pytest.approx(original["rtre_median"].median(), rel=1e-12)


def test_import_anhir_bad_files_become_failed_rows(run_dir, data, tmp_path):
    sub = export_anhir(run_dir, "oracle", tmp_path / "sub")
    path = sub / "registration-results.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[1, "Warped source landmarks"] = "warped-landmarks/missing.csv"
    (sub / "garbage.csv").write_text(",X,Y\n1,abc,3\n")
    table.loc[2, "Warped source landmarks"] = "garbage.csv"
    table.loc[3, "Warped source landmarks"] = ""
    table.loc[4, "Execution time [minutes]"] = "soon"
    table = table.drop(index=0)  # pair 0 left out of the submission: a failed row, not a silent gap
    table.to_csv(path, index=False)
    other = make_run(tmp_path / "other", data["table"], data["pairs"], methods=("identity",), seed=5)
    summary = import_anhir(other, "outside", path)
    assert summary.counts == {"failed": 4, "ok": 1, "unscored": 1}
    res = pd.read_csv(other / "results.csv", dtype={"pair_id": str}, keep_default_na=False)
    rows = res[res["method"] == "outside"].set_index("pair_id")
    assert "not found" in rows.loc["1", "error"] and "cannot read coordinates" in rows.loc["2", "error"]
    assert "no warped landmark file" in rows.loc["3", "error"] and "no row for pair 0" in rows.loc["0", "error"]
    assert all("\n" not in e for e in rows["error"])
    assert rows.loc["4", "status"] == "ok" and rows.loc["4", "time_s"] == ""  # an unreadable time is no time
    assert not warped_file(other, "outside", "1").exists()
    assert build_report([other]).is_file()


def test_import_anhir_refusals(run_dir, data, tmp_path):
    sub, other, _ = _export_import(run_dir, data, tmp_path)
    path = sub / "registration-results.csv"
    with pytest.raises(ReportError, match="already in this run"):
        import_anhir(other, "outside", path)
    with pytest.raises(ReportError, match="already in this run"):
        import_anhir(other, "identity", path)
    again = import_anhir(other, "outside", path, replace=True)
    assert again.replaced == 6
    res = pd.read_csv(other / "results.csv")
    assert (res["method"] == "outside").sum() == 6
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    extra = table.iloc[[0]].copy()
    extra.iloc[0, 0] = "99"
    pd.concat([table, extra]).to_csv(tmp_path / "extra.csv", index=False)
    shutil.copytree(sub / "warped-landmarks", tmp_path / "warped-landmarks")
    with pytest.raises(ReportError, match="99 not in the run's dataset"):
        import_anhir(other, "more", tmp_path / "extra.csv")
    moved = table.copy()
    moved.loc[2, "Source image"] = "elsewhere/scale-5pc/other.jpg"
    moved.to_csv(sub / "moved.csv", index=False)
    with pytest.raises(ReportError, match="another dataset"):
        import_anhir(other, "more", sub / "moved.csv")
    (tmp_path / "plain.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="not an ANHIR submission"):
        import_anhir(other, "more", tmp_path / "plain.csv")
    assert "more" not in set(pd.read_csv(other / "results.csv")["method"])  # nothing written on refusal


def test_import_anhir_command_line(run_dir, data, tmp_path, capsys):
    from bench.cli import main

    sub = export_anhir(run_dir, "jitter", tmp_path / "sub")
    other = make_run(tmp_path / "other", data["table"], data["pairs"], methods=("identity",), seed=5)
    args = ["import-anhir", "--run", str(other), "--method", "outside", str(sub / "registration-results.csv")]
    assert main(args) == 0
    assert main(args) == 2  # the name is taken now: one error line, exit 2
    assert main([*args, "--replace"]) == 0


# ---------------------------------------------------------------- end to end with the harness


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    import sys

    proc = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def check_report_against_results(run: Path, report_dir: Path) -> pd.DataFrame:
    """Table 1 equals the recomputation from results.csv; one Markdown row per method; every output exists."""
    results = pd.read_csv(run / "results.csv", dtype={"success": str, "pair_id": str})
    table = pd.read_csv(report_dir / "tables" / "table1.csv").set_index("method")
    expected = recompute(results, json.loads((run / "run.json").read_text())["reference_time_s"])
    assert sorted(table.index) == sorted(expected.index) == sorted(set(results["method"]))
    for col in expected.columns:
        np.testing.assert_allclose(
            table.loc[expected.index, col].to_numpy(float),
            expected[col].to_numpy(float),
            rtol=1e-12,
            err_msg=col,
        )
    md = (report_dir / "tables" / "table1.md").read_text().strip().splitlines()
    assert sorted(r.split("|")[1].strip() for r in md[2:]) == sorted(set(results["method"]))
    html_text = (report_dir / "report.html").read_text()
    assert all(f'<section id="{sid}">' in html_text for sid in page.SECTIONS)
    assert "recomputed median rTRE differs" not in html_text
    for stem in PLOTS:
        assert _nonblank_png(report_dir / "figures" / f"{stem}.png"), stem
    assert len(list((report_dir / "gallery").glob("worst_*.png"))) == results["method"].nunique()
    return table


@pytest.mark.slow
def test_end_to_end_bench_run_then_report_and_export(data, tmp_path):
    run = tmp_path / "harness-run"
    bench_cli("run", "--dataset", str(data["table"]), "--methods", "identity,preprocessed,sift", "--out", str(run),
              "--no-cache", "--device", "cpu")
    out = bench_cli("report", "--run", str(run))
    assert "report.html" in out.stdout + out.stderr
    table = check_report_against_results(run, run / "report")
    assert table.loc["identity", "pairs_scored"] == 5  # the evaluation pair has no target landmarks
    bench_cli("export-anhir", "--run", str(run), "--method", "preprocessed", "--out", str(tmp_path / "sub"))
    sub = pd.read_csv(tmp_path / "sub" / "registration-results.csv", dtype=str, keep_default_na=False)
    assert len(sub) == 6 and all((tmp_path / "sub" / p).is_file() for p in sub["Warped source landmarks"])
    # the check: export-anhir of the sift rows, import-anhir of that table into another run of the
    # same pairs as a method from "outside": the imported rows' rTRE equal the original run's
    bench_cli("export-anhir", "--run", str(run), "--method", "sift", "--out", str(tmp_path / "sift-sub"))
    other = tmp_path / "other-run"
    bench_cli("run", "--dataset", str(data["table"]), "--methods", "identity", "--out", str(other), "--no-cache",
              "--device", "cpu")
    bench_cli("import-anhir", "--run", str(other), "--method", "outside",
              str(tmp_path / "sift-sub" / "registration-results.csv"))
    res = pd.read_csv(run / "results.csv", dtype={"pair_id": str})
    imp = pd.read_csv(other / "results.csv", dtype={"pair_id": str})
    sift = res[res["method"] == "sift"].set_index("pair_id").sort_index()
    outside = imp[imp["method"] == "outside"].set_index("pair_id").sort_index()
    assert list(outside.index) == list(sift.index)
    np.testing.assert_allclose(outside["rtre_median"], sift["rtre_median"], rtol=1e-12, equal_nan=True)
    assert list(outside["status"]) == list(sift["status"])  # "Method status" keeps a failure a failure
    assert list(outside["success"]) == list(sift["success"])
    assert set(outside["time_source"]) == {"reported"}
    bench_cli("report", "--run", str(other))
    assert "reported by the tool" in (other / "report" / "tables" / "table1.md").read_text()


ANHIR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "anhir-mini" / "dataset.csv"


@pytest.mark.realdata
@pytest.mark.slow
def test_report_on_real_anhir_pairs(tmp_path):
    if not ANHIR_MINI.is_file():
        pytest.skip(f"real data not found at {ANHIR_MINI} (it lives in ../shared beside the checkout)")
    run = tmp_path / "mini"
    bench_cli("run", "--dataset", str(ANHIR_MINI), "--methods", "identity,preprocessed", "--out", str(run),
              "--no-cache", "--device", "cpu")
    report_path = build_report([run])
    table = check_report_against_results(run, report_path.parent)
    assert table.loc["identity", "pairs_scored"] == 12


def test_likely_failed_uses_the_error_estimate_where_there_is_one():
    """The verdict: an estimate above the success threshold flags a row whatever its quality; a row without an
    estimate (nonrigid, or a run that skipped it) is flagged by quality; estimate_table counts the estimate's
    split and its AUC is that of the negated estimate."""
    df = pd.DataFrame({
        "label": ["a", "a", "a", "b", "b", "b"], "pair_id": list("012012"), "tissue": "t", "pair_status": "training",
        "status": "ok", "scored": True,
        "quality": [0.8, 3.0, 2.0, 0.5, 5.0, 0.9],  # low quality on rows 0 and 3 (and 5)
        "error_estimate": [0.01, 0.05, 0.002, np.nan, np.nan, 0.02],
        "rtre_median": [0.012, 0.048, 0.003, 0.2, 0.004, 0.021], "success": [True, False, True, False, True, True],
    })
    lf = reliability.likely_failed(df, 1.0, estimate_above=0.035)
    flagged = {(r.label, r.pair_id): r.flagged_by for r in lf.itertuples()}
    assert flagged == {("a", "1"): "error estimate", ("b", "0"): "quality"}  # not a-0 nor b-2: their estimate is low
    est = reliability.estimate_table(df, 0.035).set_index("label")
    assert est.loc["all methods", "n_rows"] == 4  # rows with an estimate
    assert (est.loc["all methods", "flagged_failed"], est.loc["all methods", "flagged_succeeded"]) == (1, 0)
    assert est.loc["a", "auc"] == pytest.approx(1.0)
