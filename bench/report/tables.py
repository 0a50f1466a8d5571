"""Table 1 of the paper (and the same per tissue and per pair status), written as CSV, Markdown, LaTeX, HTML.

Definitions (over the rows of one method label, i.e. one (method, device) of one run):

* ``pairs``: all rows; ``pairs_scored``: rows with a finite ``rtre_median``; ``failures``: rows with
  status ``failed`` or ``timeout`` (they may still be scored, with the fallback matrix);
* ``median_rtre`` / ``average_rtre``: median / mean over scored pairs of the per-pair median rTRE
  (ANHIR's "Median-Median rTRE" / "Average-Median rTRE", the paper's "median" and "average" columns),
  shown as "Median of per-pair median rTRE" / "Mean of per-pair median rTRE";
* ``average_max_rtre``: mean over scored pairs of the per-pair max rTRE ("Average-Max rTRE"), shown as
  "Mean of per-pair max rTRE";
* ``mean_time_ms`` / ``median_time_ms``: mean / median method time ``time_s`` in ms over rows with a time,
  timeouts left out (their time is the limit, not the method's);
* ``mean_time_ref`` / ``median_time_ref``: the same of ``time_s / reference_time_s``, where
  ``reference_time_s`` is the run's fixed reference workload timed on its machine (``run.json``): a
  machine-normalised time;
* ``time_source``: ``measured`` (the harness's clock), ``reported by the tool`` (imported submissions, see
  :mod:`bench.anhir_import`) or ``mixed``;
* ``success_rate_pct``: 100 x (rows with ``success`` True) / evaluable rows (scored rows plus failed and
  timed-out rows; ``unscored`` rows, which have no ground truth, are left out);
* ``robustness_mean``: mean over scored pairs of ``robustness``.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.record import TIME_MEASURED, TIME_REPORTED
from bench.report.load import FAILURE_STATUSES

NUMBER_COLUMNS = (
    "median_rtre", "average_rtre", "average_max_rtre", "mean_time_ms", "mean_time_ref", "median_time_ms",
    "median_time_ref", "success_rate_pct", "flagged_failed", "flagged_succeeded", "unflagged_failed", "n_rows", "n_success", "n_failure", "auc", "quality",
    "error_estimate", "rtre_median",
    "robustness_mean", "pairs_scored", "failures", "n", "median_a", "median_b", "median_difference",
    "a_better_pct", "statistic", "p_value", "p_holm", "n_evaluable", "success_ci_low_pct",
    "success_ci_high_pct", "n_scored", "median_rtre_ci_low", "median_rtre_ci_high", "ok", "failed",
    "timeout", "unscored", "fallback_scored",
    "pairs", "start_median_rtre", "final_median_rtre", "final_average_rtre", "downstream_success_pct",
    "converged_pct", "worse_than_start", "stage_time_median_s", "rows", "downstream_successes", "best_threshold",
    "best_accuracy_pct", "threshold", "tp", "fp", "fn", "tn", "accuracy_pct",
)
DISPLAY = {
    "start_method": "Start (initial method)",
    "pairs": "Pairs",
    "downstream_successes": "Downstream successes",
    "stage": "Nonrigid stage",
    "start_median_rtre": "Start: median of per-pair median rTRE",
    "final_median_rtre": "Final: median of per-pair median rTRE",
    "final_average_rtre": "Final: mean of per-pair median rTRE",
    "downstream_success_pct": "Downstream success [%]",
    "converged_pct": "Converged [%]",
    "worse_than_start": "Pairs made worse",
    "stage_time_median_s": "Stage time, median [s]",
    "threshold": "Affine threshold",
    "accuracy_pct": "Accuracy [%]",
    "best_threshold": "Best start threshold",
    "best_accuracy_pct": "Its accuracy [%]",
    "label": "Method",
    "device": "Device",
    "run": "Run",
    "tissue": "Tissue",
    "pair_status": "Pair status",
    "median_rtre": "Median of per-pair median rTRE",
    "average_rtre": "Mean of per-pair median rTRE",
    "average_max_rtre": "Mean of per-pair max rTRE",
    "median_time_ms": "Time, median [ms]",
    "mean_time_ms": "Time, mean [ms]",
    "median_time_ref": "Time, median [× ref]",
    "mean_time_ref": "Time, mean [× ref]",
    "time_source": "Time source",
    "pair_id": "Pair",
    "method": "Method",
    "status": "Status",
    "quality": "Quality",
    "error_estimate": "Error estimate",
    "flagged_by": "Flagged by",
    "rtre_median": "Pair's median rTRE",
    "success": "Success",
    "n_rows": "Rows",
    "n_success": "Successes",
    "n_failure": "Failures (not success)",
    "auc": "ROC AUC",
    "expression": "Composition",
    "decided": "Member that decided",
    "decision": "How",
    "flagged_failed": "Flagged, failed",
    "flagged_succeeded": "Flagged, succeeded",
    "unflagged_failed": "Not flagged, failed",
    "success_rate_pct": "Success [%]",
    "robustness_mean": "Robustness",
    "pairs_scored": "Pairs scored",
    "failures": "Failures",
    "ok": "ok",
    "fallback_scored": "Scored with fallback",
    "method_a": "Method A",
    "method_b": "Method B",
    "n": "n pairs",
    "median_a": "Median A",
    "median_b": "Median B",
    "median_difference": "Median of A − B",
    "a_better_pct": "A better [%]",
    "statistic": "W",
    "p_value": "p",
    "p_holm": "p (Holm)",
    "note": "Note",
    "n_evaluable": "n evaluable",
    "success_ci_low_pct": "Success CI low",
    "success_ci_high_pct": "Success CI high",
    "n_scored": "n scored",
    "median_rtre_ci_low": "Median CI low",
    "median_rtre_ci_high": "Median CI high",
}
SIGNIFICANT = ("p_value", "p_holm", "mean_time_ref", "median_time_ref")  # 3 significant digits: × ref spans decades
DECIMALS = {
    "median_rtre": 4, "average_rtre": 4, "average_max_rtre": 4, "mean_time_ms": 2, "mean_time_ref": 3,
    "median_time_ms": 2, "median_time_ref": 3, "auc": 3, "quality": 3, "error_estimate": 4, "rtre_median": 4,
    "success_rate_pct": 2, "robustness_mean": 3, "median_a": 4, "median_b": 4, "median_difference": 4,
    "a_better_pct": 1, "statistic": 1, "success_ci_low_pct": 2, "success_ci_high_pct": 2,
    "median_rtre_ci_low": 4, "median_rtre_ci_high": 4, "downstream_success_pct": 1, "converged_pct": 1,
    "stage_time_median_s": 2, "accuracy_pct": 1, "best_accuracy_pct": 1, "threshold": 4, "best_threshold": 4,
}


def summarise_rows(rows: pd.DataFrame) -> dict[str, float | int]:
    """Table 1's numbers for one group of result rows (see the module docstring)."""
    scored = rows[rows["scored"]]
    times = rows.loc[(rows["status"] != "timeout") & np.isfinite(rows["time_s"]), "time_s"]
    ref_times = times / rows.loc[times.index, "reference_time_s"]
    evaluable = rows[rows["evaluable"]]

    def stat(fn, values):
        values = np.asarray(values, dtype=float)
        return float(fn(values)) if values.size else math.nan

    return {
        "pairs": int(len(rows)),
        "pairs_scored": int(len(scored)),
        "failures": int(rows["status"].isin(FAILURE_STATUSES).sum()),
        "median_rtre": stat(np.median, scored["rtre_median"]),
        "average_rtre": stat(np.mean, scored["rtre_median"]),
        "average_max_rtre": stat(np.mean, scored["rtre_max"]),
        "mean_time_ms": stat(np.mean, times * 1000.0),
        "median_time_ms": stat(np.median, times * 1000.0),
        "mean_time_ref": stat(np.mean, ref_times),
        "median_time_ref": stat(np.median, ref_times),
        "time_source": time_source(rows),
        "success_rate_pct": stat(np.mean, evaluable["success"].astype(float)) * 100.0,
        "robustness_mean": stat(np.mean, scored["robustness"]),
    }


TIME_REPORTED_TEXT = "reported by the tool"
TIME_FOOTNOTE = (
    "Time source \"reported by the tool\": the time comes from the imported submission's "
    "\"Execution time [minutes]\" column, not from the harness's clock; it may include loading and "
    "preprocessing, and was measured on an unknown machine (its × ref divides it by this run's reference time)."
)


def time_source(rows: pd.DataFrame) -> str:
    """``measured``, ``reported by the tool`` or ``mixed`` for a group of rows (empty cells are measured).

    >>> time_source(pd.DataFrame({"time_source": ["measured", ""]}))
    'measured'
    >>> time_source(pd.DataFrame({"time_source": ["reported", "reported"]}))
    'reported by the tool'
    """
    if "time_source" not in rows.columns:
        return TIME_MEASURED
    values = {str(v).strip() or TIME_MEASURED for v in rows["time_source"]}
    if values == {TIME_MEASURED}:
        return TIME_MEASURED
    if values == {TIME_REPORTED}:
        return TIME_REPORTED_TEXT
    return "mixed"


def has_reported_time(table: pd.DataFrame) -> bool:
    """Whether any row of a summary table carries a time not measured by the harness."""
    return "time_source" in table.columns and bool((table["time_source"] != TIME_MEASURED).any())


def summary_table(df: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (``by`` ..., method label): the label's method, device and run, then Table 1's numbers.

    Labels keep the order in which they first appear in ``df``.
    """
    order = {label: i for i, label in enumerate(dict.fromkeys(df["label"]))}
    records = []
    for keys, rows in df.groupby([*by, "label"], sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        first = rows.iloc[0]
        rec = dict(zip([*by, "label"], keys, strict=True))
        rec.update(method=first["method"], device=first["device"], run=first["run"])
        rec.update(summarise_rows(rows))
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    table["_order"] = table["label"].map(order)
    return table.sort_values([*by, "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def initial_row(df: pd.DataFrame, threshold: float) -> dict[str, float | int]:
    """The state before registration (the paper's "Initial" row) from ``ire_median``, once per pair."""
    pairs = df[np.isfinite(df["ire_median"])].drop_duplicates("pair_key")
    ire = pairs["ire_median"].to_numpy(float)
    return {
        "pairs_scored": int(ire.size),
        "median_rtre": float(np.median(ire)) if ire.size else math.nan,
        "average_rtre": float(np.mean(ire)) if ire.size else math.nan,
        "success_rate_pct": float(np.mean(ire <= threshold) * 100.0) if ire.size else math.nan,
    }


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows per (label, status): ok / failed / timeout / unscored, plus fallback-scored rows."""
    table = pd.crosstab(df["label"], df["status"])
    for status in ("ok", "failed", "timeout", "unscored"):
        if status not in table.columns:
            table[status] = 0
    table = table[["ok", "failed", "timeout", "unscored"]]
    table["fallback_scored"] = df[df["fallback"] & df["scored"]].groupby("label").size()
    table = table.fillna(0).astype(int)
    order = list(dict.fromkeys(df["label"]))
    return table.loc[order].reset_index()


def composition_table(df: pd.DataFrame) -> pd.DataFrame:
    """For composed methods (their rows' diagnostics name an ``expression`` and the member that ``decided``):
    per label and deciding member, how many rows it decided, how (accepted / best quality / ...), and their
    success rate and median rTRE. Empty when the run has no composed method.

    >>> rows = pd.DataFrame({"label": ["c", "c"], "status": ["ok", "ok"], "success": [True, False],
    ...     "evaluable": [True, True], "scored": [True, True], "rtre_median": [0.01, 0.05],
    ...     "diagnostics": ['{"expression": "a|b", "decided": "a", "decision": "accepted"}',
    ...                     '{"expression": "a|b", "decided": "b", "decision": "best quality"}']})
    >>> composition_table(rows)[["label", "decided", "decision", "n_rows"]].values.tolist()
    [['c', 'a', 'accepted', 1], ['c', 'b', 'best quality', 1]]
    """
    import json

    records = []
    for row in df.itertuples(index=False):
        try:
            diag = json.loads(row.diagnostics) if isinstance(row.diagnostics, str) and row.diagnostics else {}
        except ValueError:
            continue
        if not isinstance(diag, dict) or "expression" not in diag or "decided" not in diag:
            continue
        records.append({"label": row.label, "expression": str(diag["expression"]), "decided": str(diag["decided"]),
                        "decision": str(diag.get("decision", "")), "success": bool(row.success),
                        "evaluable": bool(row.evaluable), "scored": bool(row.scored),
                        "rtre_median": float(row.rtre_median)})
    cols = ["label", "expression", "decided", "decision", "n_rows", "success_rate_pct", "median_rtre"]
    if not records:
        return pd.DataFrame(columns=cols)
    rec = pd.DataFrame.from_records(records)
    out = []
    for (label, expr, decided, decision), g in rec.groupby(["label", "expression", "decided", "decision"],
                                                           sort=False):
        ev, sc = g[g["evaluable"]], g[g["scored"]]
        out.append({"label": label, "expression": expr, "decided": decided, "decision": decision,
                    "n_rows": int(len(g)),
                    "success_rate_pct": float(ev["success"].mean() * 100) if len(ev) else math.nan,
                    "median_rtre": float(sc["rtre_median"].median()) if len(sc) else math.nan})
    return pd.DataFrame.from_records(out, columns=cols)


def display_columns(table: pd.DataFrame, multi_run: bool) -> list[str]:
    """The columns shown in the human-readable formats (Markdown, LaTeX, HTML)."""
    keys = [c for c in ("tissue", "pair_status") if c in table.columns]
    cols = [*keys, "label", "device", *(["run"] if multi_run else [])]
    cols += ["median_rtre", "average_rtre", "average_max_rtre", "median_time_ms", "mean_time_ms"]
    cols += ["median_time_ref", "success_rate_pct", "robustness_mean", "pairs_scored", "failures"]
    if has_reported_time(table):
        cols.append("time_source")
    return [c for c in cols if c in table.columns]


def _fmt(value, column: str) -> str:
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "–"
        if column in SIGNIFICANT:
            return f"{value:.3g}"
        return f"{value:.{DECIMALS.get(column, 4)}f}"
    return str(value)


def formatted(table: pd.DataFrame, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header (display names) and cell strings."""
    header = [DISPLAY.get(c, c) for c in columns]
    rows = [
        [_fmt(v, c) for v, c in zip(rec, columns, strict=True)]
        for rec in table[columns].itertuples(index=False)
    ]
    return header, rows


def to_markdown(table: pd.DataFrame, columns: list[str]) -> str:
    """A GitHub-flavoured pipe table, numbers right-aligned."""
    header, rows = formatted(table, columns)
    align = ["---:" if c in NUMBER_COLUMNS else "---" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "|": r"\textbar{}",
    ">": r"\textgreater{}",
    "<": r"\textless{}",
}


def _latex_escape(text: str) -> str:
    r"""Escape LaTeX's special characters.

    >>> print(_latex_escape("a_b 50% {x}"))
    a\_b 50\% \{x\}
    >>> print(_latex_escape("sift|iterative learned>iterative"))
    sift\textbar{}iterative learned\textgreater{}iterative
    """
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, columns: list[str], caption: str = "", label: str = "",
             notes: tuple[str, ...] | list[str] = ()) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``); ``notes`` follow the tabular."""
    header, rows = formatted(table, columns)
    spec = "".join("r" if c in NUMBER_COLUMNS else "l" for c in columns)
    out = ["\\begin{table}[t]", "\\centering", "\\small"]
    if caption:
        out.append(f"\\caption{{{_latex_escape(caption)}}}")
    if label:
        out.append(f"\\label{{{label}}}")
    out += [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_latex_escape(h) for h in header) + " \\\\",
    ]
    out.append("\\midrule")
    out += [" & ".join(_latex_escape(c) for c in r) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}"]
    out += [f"\\par\\footnotesize {_latex_escape(n)}" for n in notes]
    out.append("\\end{table}")
    return "\n".join(out) + "\n"


def to_html(table: pd.DataFrame, columns: list[str], css_class: str = "results") -> str:
    """A plain ``<table>`` with escaped cells; numeric columns get class ``num``."""
    header, rows = formatted(table, columns)
    numeric = [c in NUMBER_COLUMNS for c in columns]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="num">{html.escape(v)}</td>' if n else f"<td>{html.escape(v)}</td>"
            for v, n in zip(r, numeric, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def notes_markdown(notes: tuple[str, ...] | list[str]) -> str:
    """Notes under a Markdown table: a blank line, then one paragraph each."""
    return "".join(f"\n{n}\n" for n in notes)


def notes_html(notes: tuple[str, ...] | list[str]) -> str:
    return "".join(f'<p class="muted">{html.escape(n)}</p>' for n in notes)


def write_table(
    table: pd.DataFrame, out_dir: Path, stem: str, columns: list[str], caption: str,
    notes: tuple[str, ...] | list[str] = (),
) -> dict[str, Path]:
    """Write ``stem.csv`` (every column, full precision) and ``stem.md`` / ``.tex`` / ``.html`` (display).

    ``notes`` (footnotes such as "generated data" or "time reported by the tool") follow the table in the
    Markdown, LaTeX and HTML files; the CSV holds the data only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out_dir / f"{stem}.{fmt}" for fmt in ("csv", "md", "tex", "html")}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(table, columns) + notes_markdown(notes))
    paths["tex"].write_text(to_latex(table, columns, caption=caption, label=f"tab:{stem}", notes=notes))
    paths["html"].write_text(to_html(table, columns) + notes_html(notes))
    return paths
