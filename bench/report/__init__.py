"""The report: turns stored run folders into tables, plots, a failure gallery, statistics and one HTML page.

It only reads what runs stored (``results.csv``, ``warped-landmarks/``, ``run.json`` and, for the gallery,
the images named in the results); it never re-runs a method.

>>> from bench.report import build_report, latest_run   # doctest: +SKIP
>>> build_report([latest_run(Path("reports"))])          # doctest: +SKIP
PosixPath('reports/<run>/report/report.html')
"""

from __future__ import annotations

import datetime as _dt
import html as _html
from pathlib import Path

import pandas as pd

from bench.report import gallery, page, plots, stats, tables
from bench.report.export import export_anhir
from bench.report.load import ReportError, Run, landmark_errors, latest_run, load_run, load_runs, relpath

__all__ = [
    "ReportError",
    "build_report",
    "default_out_dir",
    "export_anhir",
    "latest_run",
    "load_run",
    "load_runs",
]


def default_out_dir(run_dirs: list[Path]) -> Path:
    """``<run>/report`` for one run; ``<parent of the first run>/report-<run1>+<run2>...`` for several."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    return paths[0].parent / ("report-" + "+".join(p.name for p in paths))


def _threshold(runs: list[Run], notes: list[str]) -> float:
    values = sorted({r.threshold for r in runs})
    if len(values) > 1:
        notes.append(f"runs use different success thresholds {values}; Table 1 uses each row's stored success, "
                     f"the threshold plots use {values[0]:g}")  # fmt: skip
    return values[0]


def _write_tables(df: pd.DataFrame, out: Path, multi: bool, threshold: float) -> dict[str, pd.DataFrame]:
    t = {
        "table1": tables.summary_table(df),
        "per_tissue": tables.summary_table(df, by=("tissue",)),
        "per_pair_status": tables.summary_table(df, by=("pair_status",)),
        "status_counts": tables.status_counts(df),
        "initial": pd.DataFrame([tables.initial_row(df, threshold)]),
        "bootstrap": stats.bootstrap_table(df),
        "wilcoxon": stats.paired_tests(df),
    }
    tdir = out / "tables"
    captions = {"table1": "Accuracy, time and success per method", "per_tissue": "Per tissue",
                "per_pair_status": "Per ANHIR pair status"}  # fmt: skip
    for name in ("table1", "per_tissue", "per_pair_status"):
        tables.write_table(t[name], tdir, name, tables.display_columns(t[name], multi), captions[name])
    for name in ("status_counts", "initial", "bootstrap", "wilcoxon"):
        tables.write_table(t[name], tdir, name, list(t[name].columns), name.replace("_", " "))
    return t


def _make_plots(df, t, after, before, colours, threshold, out: Path) -> dict[str, dict[str, Path]]:
    fdir = out / "figures"
    return {
        "figure2": plots.cdf_plot(after, before, colours, fdir),
        "success_vs_threshold": plots.success_curve(df, colours, threshold, fdir),
        "pairs_rtre": plots.pair_boxplot(df, colours, threshold, fdir),
        "accuracy_vs_time": plots.accuracy_time(df, t["bootstrap"], t["table1"], colours, fdir),
        "success_per_tissue": plots.tissue_success(t["per_tissue"], colours, fdir),
    }


def _tables_html(t, multi: bool, out: Path) -> dict[str, str]:
    def show(name: str, cols=None) -> str:
        table = t[name]
        cols = cols or tables.display_columns(table, multi)
        links = " ".join(f'<a href="tables/{name}.{ext}">{ext}</a>' for ext in ("csv", "md", "tex"))
        return tables.to_html(table, cols) + f'<p class="muted">Files: {links}</p>'

    init = t["initial"]
    return {
        "table1": show("table1")
        + "<h3>Before registration (the paper's “Initial” row)</h3>"
        + show("initial", ["pairs_scored", "median_rtre", "average_rtre", "success_rate_pct"]),
        "per-tissue": show("per_tissue"),
        "per-status": show("per_pair_status")
        + "<h3>Rows per status</h3>"
        + show("status_counts", list(t["status_counts"].columns)),
        "bootstrap": show("bootstrap", list(t["bootstrap"].columns)),
        "wilcoxon": show("wilcoxon", list(t["wilcoxon"].columns)),
        "_init_n": str(int(init["pairs_scored"].iloc[0])) if len(init) else "0",
    }


def _figure_links(paths: dict[str, Path], out: Path) -> dict[str, str]:
    return {k.upper(): relpath(p, out) for k, p in paths.items()}


DEFINITIONS = """<ul>
<li><b>rTRE</b> of a landmark: distance between the warped source landmark and the target landmark, divided by
the target image diagonal; landmarks pair by row (first N common rows).</li>
<li><b>Median rTRE</b> / <b>Average rTRE</b>: median / mean over scored pairs of each pair's median rTRE (ANHIR's
Median-Median and Average-Median rTRE). <b>Avg max rTRE</b>: mean over scored pairs of each pair's max rTRE.</li>
<li><b>Scored pair</b>: a row with a finite median rTRE (failed and timed-out rows are scored with their fallback
matrix when they have one). <b>Failures</b>: rows with status failed or timeout.</li>
<li><b>Success [%]</b>: rows with success True over evaluable rows (scored rows plus failed/timeout rows; rows
without ground truth are left out). A row succeeds when its status is ok and its median rTRE is at most the run's
threshold.</li>
<li><b>Time [ms]</b>: mean of the method call's wall time (no loading or preprocessing), timeouts left out.</li>
<li><b>Robustness</b>: mean over scored pairs of the share of landmarks whose error dropped.</li>
<li><b>Statistics</b>: two-sided Wilcoxon signed-rank tests on per-pair median rTRE over the pairs both methods
scored, Holm-adjusted over all comparisons; 95 % percentile bootstrap intervals (2000 resamples, fixed seed).</li>
<li>Figure 2 recomputes every landmark's rTRE from the stored warped landmarks and the target landmark files.</li>
</ul>"""


def _sections(runs, df, t, figs, gal, notes, threshold, out: Path, multi: bool) -> list[str]:
    th = _tables_html(t, multi, out)
    n_pairs = df["pair_key"].nunique()
    summary = (
        f"<p>{len(runs)} run(s): {_html.escape(', '.join(r.name for r in runs))}; {n_pairs} pair(s); "
        f"{df['label'].nunique()} method(s); {int(df['scored'].sum())} scored rows of {len(df)}. "
        f"Success threshold on the per-pair median rTRE: {threshold:g}.</p>"
    )
    summary += "".join(f'<p class="note">{_html.escape(n)}</p>' for n in notes)
    plot_caps = {
        "success_vs_threshold": "Success rate against the threshold (dotted: the threshold used in Table 1).",
        "pairs_rtre": "Per-pair median rTRE per method: box plot and one point per pair.",
        "accuracy_vs_time": "Accuracy against method time (log-log); markers: mean time, median rTRE with 95 % CI.",
        "success_per_tissue": "Success rate per tissue.",
    }
    plot_html = "".join(
        page.figure(figs[k]["png"], cap, _figure_links(figs[k], out)) for k, cap in plot_caps.items()
    )
    gal_html = "".join(
        page.figure(e["path"], e["title"]) if e["path"] else f'<p class="note">{_html.escape(e["title"])}</p>'
        for e in gal
    )
    fig2 = page.figure(figs["figure2"]["png"], "Cumulative distribution of landmark rTRE per method "
                       "(dashed grey: before registration).", _figure_links(figs["figure2"], out))  # fmt: skip
    return [
        page.section("summary", summary),
        page.section("table1", th["table1"]),
        page.section("per-tissue", th["per-tissue"]),
        page.section("per-status", th["per-status"]),
        page.section("figure2", fig2),
        page.section("plots", plot_html),
        page.section("statistics", "<h3>Bootstrap 95 % intervals</h3>" + th["bootstrap"]
                     + "<h3>Paired Wilcoxon signed-rank tests (per-pair median rTRE)</h3>" + th["wilcoxon"]),
        page.section("gallery", gal_html),
        page.section("manifest", page.manifest_html(runs)),
        page.section("definitions", DEFINITIONS),
    ]  # fmt: skip


def build_report(run_dirs: list[Path], out_dir: Path | None = None, gallery_k: int = 3) -> Path:
    """Write tables, plots, gallery and ``report.html`` for one or several run folders; return the page.

    Parameters
    ----------
    run_dirs : list of Path
        Run folders (each with results.csv and run.json). Methods are keyed by (method, device, run).
    out_dir : Path, optional
        Where to write; default :func:`default_out_dir`.
    gallery_k : int
        Worst pairs shown per method.
    """
    runs, df = load_runs(list(run_dirs))
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    threshold = _threshold(runs, notes)
    multi = len(runs) > 1
    firsts = df.drop_duplicates("label")
    colours = plots.palette(firsts["label"].tolist(), firsts["method"].tolist())
    t = _write_tables(df, out, multi, threshold)
    after, before, lnd_notes = landmark_errors(runs, df)
    notes += lnd_notes
    figs = _make_plots(df, t, after, before, colours, threshold, out)
    gal = gallery.build_gallery(df, runs, out / "gallery", k=gallery_k)
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"Generated {created} from {', '.join(str(r.path) for r in runs)}"
    doc = page.page(
        "histreg-bench report", _sections(runs, df, t, figs, gal, notes, threshold, out, multi), subtitle
    )
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
