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

from bench import metrics, quality
from bench.report import gallery, nonrigid, page, plots, reliability, stats, tables
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
                     f"the threshold plots use {values[0]:g}")
    return values[0]


GENERATED_TITLE = "generated data, not real histology"


def generated_note(runs: list[Run]) -> str | None:
    """One sentence saying which runs hold generated data (None when none does)."""
    gen = [(r.name, r.generated) for r in runs if r.generated]
    if not gen:
        return None
    which = "; ".join(f"{name}: {why}" for name, why in gen)
    scope = "These data are" if len(gen) == len(runs) else f"{len(gen)} of {len(runs)} runs hold data that are"
    return (f"GENERATED DATA. {scope} generated images with exact landmarks ({which}), not real histology: "
            "the numbers check the benchmark and compare methods on easy, known transforms; they are not the "
            "methods' performance on real sections.")


def imported_note(df: pd.DataFrame) -> str | None:
    """One sentence naming the imported labels (time reported by the tool), or None."""
    rep = df[df["time_source"].astype(str).str.strip() == tables.TIME_REPORTED]["label"].unique().tolist()
    if not rep:
        return None
    return (f"Imported from an ANHIR submission table (python -m bench import-anhir): {', '.join(rep)}. "
            "Their landmarks are scored here by the same metrics; their time is the figure the tool reported, "
            "not measured by this harness, and they have no matrix and no quality score.")


def _table_notes(runs: list[Run], table: pd.DataFrame) -> list[str]:
    notes = []
    gen = generated_note(runs)
    if gen:
        notes.append(gen)
    if tables.has_reported_time(table):
        notes.append(tables.TIME_FOOTNOTE)
    return notes


def _write_tables(df: pd.DataFrame, out: Path, multi: bool, threshold: float, runs: list[Run],
                  q_threshold: float) -> dict[str, pd.DataFrame]:
    t = {
        "table1": tables.summary_table(df),
        "per_tissue": tables.summary_table(df, by=("tissue",)),
        "per_pair_status": tables.summary_table(df, by=("pair_status",)),
        "status_counts": tables.status_counts(df),
        "initial": pd.DataFrame([tables.initial_row(df, threshold)]),
        "bootstrap": stats.bootstrap_table(df),
        "wilcoxon": stats.paired_tests(df),
        "quality": reliability.quality_table(df, q_threshold),
        "estimate": reliability.estimate_table(df, threshold),
        "likely_failed": reliability.likely_failed(df, q_threshold, estimate_above=threshold),
        "composed": tables.composition_table(df),
        "downstream": nonrigid.downstream_table(df),
        "proxy": nonrigid.proxy_table(df, threshold),
    }
    tdir = out / "tables"
    captions = {"table1": "Accuracy, time and success per method", "per_tissue": "Per tissue",
                "per_pair_status": "Per ANHIR pair status"}
    for name in ("table1", "per_tissue", "per_pair_status"):
        tables.write_table(t[name], tdir, name, tables.display_columns(t[name], multi), captions[name],
                           _table_notes(runs, t[name]))
    for name in ("status_counts", "initial", "bootstrap", "wilcoxon", "quality", "estimate", "likely_failed",
                 "composed", "downstream", "proxy"):
        tables.write_table(t[name], tdir, name, list(t[name].columns), name.replace("_", " "))
    return t


def _make_plots(df, t, after, before, colours, threshold, q_threshold, out: Path) -> dict[str, dict[str, Path]]:
    fdir = out / "figures"
    rated = reliability.rated_rows(df)
    extra = {"quality_roc": plots.quality_roc(rated, t["quality"], colours, q_threshold, fdir)} if len(rated) else {}
    capture = nonrigid.capture_plot(df, colours, fdir, threshold)
    if capture is not None:
        extra["capture_range"] = capture
    return extra | {
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
        + show("status_counts", list(t["status_counts"].columns))
        + ("<h3>Composed methods: which member decided</h3>" + show("composed", list(t["composed"].columns))
           if len(t["composed"]) else ""),
        "bootstrap": show("bootstrap", list(t["bootstrap"].columns)),
        "wilcoxon": show("wilcoxon", list(t["wilcoxon"].columns)),
        "quality": show("quality", list(t["quality"].columns)),
        "estimate": show("estimate", list(t["estimate"].columns)),
        "likely_failed": show("likely_failed", list(t["likely_failed"].columns)),
        "downstream": show("downstream", list(t["downstream"].columns)),
        "proxy": show("proxy", list(t["proxy"].columns)),
        "_init_n": str(int(init["pairs_scored"].iloc[0])) if len(init) else "0",
    }


def _figure_links(paths: dict[str, Path], out: Path) -> dict[str, str]:
    return {k.upper(): relpath(p, out) for k, p in paths.items()}


DEFINITIONS = """<ul>
<li><b>rTRE</b> of a landmark: distance between the warped source landmark and the target landmark, divided by
the target image diagonal; landmarks pair by row (first N common rows). Each pair has a <b>per-pair median
rTRE</b> (and max) over its landmarks.</li>
<li><b>Median of per-pair median rTRE</b>: the median over scored pairs of each pair's median rTRE (ANHIR's
Median-Median rTRE, the paper's "median rTRE"). <b>Mean of per-pair median rTRE</b>: the mean over scored pairs
of each pair's median rTRE (ANHIR's Average-Median rTRE, the paper's "average rTRE"; not the mean of all
landmarks' rTRE). <b>Mean of per-pair max rTRE</b>: the mean over scored pairs of each pair's max rTRE
(ANHIR's Average-Max rTRE).</li>
<li><b>Scored pair</b>: a row with a finite median rTRE (failed and timed-out rows are scored with their fallback
matrix when they have one). <b>Failures</b>: rows with status failed or timeout.</li>
<li><b>Success [%]</b>: rows with success True over evaluable rows (scored rows plus failed/timeout rows; rows
without ground truth are left out). A row succeeds when its status is ok and its median rTRE is at most the run's
threshold.</li>
<li><b>Time, median [ms]</b> / <b>Time, mean [ms]</b>: median / mean of the method call's wall time (no loading
or preprocessing), timeouts left out. <b>Time, median [× ref]</b>: the median of each row's time divided by the
run's reference time (a fixed workload timed on the run's machine, <code>reference_time_s</code> in run.json), so
runs on different machines compare. <b>Time source</b> (shown when any row was imported): "reported by the
tool" means the time comes from the imported table, not from the harness's clock.</li>
<li><b>Robustness</b>: mean over scored pairs of the share of landmarks whose error dropped.</li>
<li><b>Quality</b>: the harness's landmark-free alignment score of an ok row (bench.quality.alignment_quality,
higher = better aligned). <b>ROC AUC</b>: the probability that a random successful row has a higher quality than
a random unsuccessful one (Mann-Whitney U / (n<sub>success</sub> n<sub>failure</sub>), ties counted half), over
the scored ok rows that have a quality. <b>Likely failed</b>: quality below the threshold named in that
section.</li>
<li><b>Statistics</b>: two-sided Wilcoxon signed-rank tests on per-pair median rTRE over the pairs both methods
scored, Holm-adjusted over all comparisons; 95 % percentile bootstrap intervals (2000 resamples, fixed seed).</li>
<li>Figure 2 recomputes every landmark's rTRE from the stored warped landmarks and the target landmark files.</li>
</ul>"""


def _quality_html(t, figs, q_threshold: float, q_source: str, out: Path, th: dict[str, str],
                  threshold: float) -> str:
    q = t["quality"]
    if q.empty or int(q["n_rows"].iloc[0]) == 0:
        return ('<p class="note">No scored ok row has a quality score (older runs, imported rows or no target '
                "landmarks): nothing to check the score against.</p>" + "<h3>Likely failed</h3>"
                + th["likely_failed"])
    overall = q.iloc[0]
    text = (
        f"<p>The landmark-free <code>quality</code> score (higher = better aligned) against the landmark "
        f"verdict, over {int(overall['n_rows'])} scored ok rows ({int(overall['n_success'])} successes, "
        f"{int(overall['n_failure'])} not): ROC AUC <b>{overall['auc']:.3f}</b> over all methods "
        "(1 = quality ranks every success above every failure, 0.5 = no better than chance). "
        f"Rows with quality below <b>{q_threshold:g}</b> ({_html.escape(q_source)}) are flagged "
        "<em>likely failed</em> when they have no error estimate (below); the table counts how this threshold "
        "alone splits the rows.</p>"
    )
    fig = page.figure(figs["quality_roc"]["png"], "ROC of quality as a predictor of success, per method and "
                      "overall (a method whose rated rows all succeeded, or all failed, has no curve); circle: the "
                      "likely-failed threshold.", _figure_links(figs["quality_roc"], out))
    est = t["estimate"]
    est_text = ""
    if len(est) and int(est["n_rows"].iloc[0]):
        e = est.iloc[0]
        est_text = (
            "<h3>Estimated error</h3><p>The landmark-free <code>error_estimate</code> of every ok affine row (how "
            "far a local re-alignment by <code>affine-io</code>, started from the answer, moves the tissue, as a "
            "fraction of the diagonal: an estimate of the row's rTRE) against the landmark verdict, over "
            f"{int(e['n_rows'])} scored ok rows: ROC AUC <b>{e['auc']:.3f}</b> (of its negation). Rows with an "
            f"estimate above the success threshold <b>{threshold:g}</b> are flagged <em>likely failed</em> (the "
            "estimate decides where there is one; quality decides for rows without it): "
            f"{int(e['flagged_failed'])} of {int(e['n_failure'])} failures and {int(e['flagged_succeeded'])} of "
            f"{int(e['n_success'])} successes here.</p>" + th["estimate"]
        )
    lf = t["likely_failed"]
    lf_text = (
        f"<p>{len(lf)} row(s), scored or not, have an error estimate above {threshold:g} or, without an "
        f"estimate, a quality below {q_threshold:g}: this is the list a user of pairs without target landmarks "
        "(ANHIR's evaluation split) would check by eye.</p>"
    )
    return text + th["quality"] + fig + est_text + "<h3>Likely failed</h3>" + lf_text + th["likely_failed"]


def _downstream_html(t, figs, threshold: float, out: Path, th: dict[str, str]) -> str:
    if t["downstream"].empty:
        return ('<p class="note">No nonrigid stage in these runs: run with <code>--then deformable</code> (or '
                "<code>bspline</code>, <code>demons</code>) to measure from which start a generic nonrigid "
                "registration converges, the paper's definition of success.</p>")
    text = (f"<p>Each nonrigid method's rows against their start (the initial method's affine result). "
            f"<b>Downstream success</b>: the row is ok, the stage converged (final &le; start + "
            f"{metrics.CONVERGENCE_SLACK:g}) and the final median rTRE is at most "
            f"{metrics.DOWNSTREAM_THRESHOLD:g} (docs/report.md).</p>")
    fig = page.figure(figs["capture_range"]["png"], "Capture range: final against start median rTRE, one point "
                      "per pair and method; below the diagonal the stage improved its start.",
                      _figure_links(figs["capture_range"], out)) if "capture_range" in figs else ""
    proxy = (f"<h3>Does the affine success (start &le; {threshold:g}) predict downstream success?</h3>"
             "<p>Confusion counts of the affine proxy against downstream success, and the start threshold that "
             "predicts it best on these rows (ties: the largest).</p>" + th["proxy"])
    return text + th["downstream"] + fig + proxy


def _sections(runs, df, t, figs, gal, notes, threshold, out: Path, multi: bool, q_threshold: float,
              q_source: str) -> list[str]:
    th = _tables_html(t, multi, out)
    n_pairs = df["pair_key"].nunique()
    summary = ""
    gen = generated_note(runs)
    if gen:
        summary += f'<p class="warn">{_html.escape(gen)}</p>'
    summary += (
        f"<p>{len(runs)} run(s): {_html.escape(', '.join(r.name for r in runs))}; {n_pairs} pair(s); "
        f"{df['label'].nunique()} method(s); {int(df['scored'].sum())} scored rows of {len(df)}. "
        f"Success threshold on the per-pair median rTRE: {threshold:g}.</p>"
    )
    imp = imported_note(df)
    if imp:
        summary += f'<p class="note">{_html.escape(imp)}</p>'
    summary += "".join(f'<p class="note">{_html.escape(n)}</p>' for n in notes)
    plot_caps = {
        "success_vs_threshold": "Success rate against the threshold (dotted: the threshold used in Table 1).",
        "pairs_rtre": "Per-pair median rTRE per method: box plot and one point per pair.",
        "accuracy_vs_time": "Accuracy against method time (log-log); markers: median time and median of the "
        "per-pair median rTRE with its 95 % CI.",
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
                       "(wide light grey: before registration, drawn under the methods' curves).",
                       _figure_links(figs["figure2"], out))
    table1 = th["table1"]
    t1_notes = _table_notes(runs, t["table1"])
    if t1_notes:
        table1 = tables.notes_html(t1_notes) + table1
    return [
        page.section("summary", summary),
        page.section("table1", table1),
        page.section("per-tissue", th["per-tissue"]),
        page.section("per-status", th["per-status"]),
        page.section("figure2", fig2),
        page.section("plots", plot_html),
        page.section("quality", _quality_html(t, figs, q_threshold, q_source, out, th, threshold)),
        page.section("downstream", _downstream_html(t, figs, threshold, out, th)),
        page.section("statistics", "<h3>Bootstrap 95 % intervals</h3>" + th["bootstrap"]
                     + "<h3>Paired Wilcoxon signed-rank tests (per-pair median rTRE)</h3>" + th["wilcoxon"]),
        page.section("gallery", gal_html),
        page.section("manifest", page.manifest_html(runs)),
        page.section("definitions", DEFINITIONS),
    ]


def _markdown_report(title: str, subtitle: str, runs, df, t, figs, notes, threshold, q_threshold, q_source,
                     out: Path, multi: bool) -> str:
    """``report.md``: the title, the summary, Table 1, the quality check and links to every figure."""
    lines = [f"# {title}", "", f"_{subtitle}_", ""]
    gen = generated_note(runs)
    if gen:
        lines += [f"> **{gen}**", ""]
    lines += [
        f"{len(runs)} run(s): {', '.join(r.name for r in runs)}; {df['pair_key'].nunique()} pair(s); "
        f"{df['label'].nunique()} method(s); {int(df['scored'].sum())} scored rows of {len(df)}. "
        f"Success threshold on the per-pair median rTRE: {threshold:g}.",
        "",
    ]
    imp = imported_note(df)
    lines += [f"> {n}\n" for n in ([imp] if imp else []) + notes]
    lines += ["## Table 1: accuracy, time and success per method", ""]
    lines += [tables.to_markdown(t["table1"], tables.display_columns(t["table1"], multi))]
    lines += [tables.notes_markdown(_table_notes(runs, t["table1"]))]
    q = t["quality"]
    lines += ["## Quality: does the landmark-free score predict success?", ""]
    if len(q) and int(q["n_rows"].iloc[0]):
        lines += [f"ROC AUC over all methods: **{q['auc'].iloc[0]:.3f}** ({int(q['n_rows'].iloc[0])} scored ok "
                  f"rows). Likely failed: an error estimate above {threshold:g}, or, without one, quality below "
                  f"{q_threshold:g} ({q_source}); {len(t['likely_failed'])} row(s), listed in "
                  "`tables/likely_failed.md`.", ""]
        lines += [tables.to_markdown(q, list(q.columns))]
        est = t["estimate"]
        if len(est) and int(est["n_rows"].iloc[0]):
            lines += ["", f"Estimated error (landmark-free, `error_estimate`): ROC AUC **{est['auc'].iloc[0]:.3f}**; "
                      f"rows above the success threshold {threshold:g} are flagged likely failed (the estimate "
                      "decides where there is one).", ""]
            lines += [tables.to_markdown(est, list(est.columns))]
    else:
        lines += ["No scored ok row has a quality score.", ""]
    if not t["downstream"].empty:
        lines += ["## Downstream: what a start is worth to a nonrigid stage", ""]
        lines += [tables.to_markdown(t["downstream"], list(t["downstream"].columns))]
        lines += [tables.to_markdown(t["proxy"], list(t["proxy"].columns))]
    lines += ["## Figures", ""]
    lines += [f"- [{k}]({relpath(v['png'], out)})" for k, v in figs.items()]
    lines += ["", "Every number is defined in `docs/report.md`; the full report with the gallery and the "
              "statistics is `report.html`.", ""]
    return "\n".join(lines)


def build_report(run_dirs: list[Path], out_dir: Path | None = None, gallery_k: int = 3) -> Path:
    """Write tables, plots, gallery, ``report.md`` and ``report.html`` for one or several run folders;
    return the HTML page.

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
    q_threshold, q_source = quality.LIKELY_FAILED_BELOW, "bench.quality.LIKELY_FAILED_BELOW"
    multi = len(runs) > 1
    firsts = df.drop_duplicates("label")
    colours = plots.palette(firsts["label"].tolist(), firsts["method"].tolist())
    t = _write_tables(df, out, multi, threshold, runs, q_threshold)
    after, before, lnd_notes = landmark_errors(runs, df)
    notes += lnd_notes
    figs = _make_plots(df, t, after, before, colours, threshold, q_threshold, out)
    gal = gallery.build_gallery(df, runs, out / "gallery", k=gallery_k)
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"Generated {created} from {', '.join(str(r.path) for r in runs)}"
    n_gen = sum(1 for r in runs if r.generated)
    title = "histreg-bench report" + (
        f" — {GENERATED_TITLE}" if n_gen == len(runs) else " — includes generated data" if n_gen else ""
    )
    sections = _sections(runs, df, t, figs, gal, notes, threshold, out, multi, q_threshold, q_source)
    (out / "report.md").write_text(
        _markdown_report(title, subtitle, runs, df, t, figs, notes, threshold, q_threshold, q_source, out, multi),
        encoding="utf-8",
    )
    path = out / "report.html"
    path.write_text(page.page(title, sections, subtitle), encoding="utf-8")
    return path
