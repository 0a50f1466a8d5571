"""The report's plots (matplotlib + seaborn), each saved as PNG and SVG at paper size.

Every plot colours a method label with the same colour (:func:`palette`); the state before registration is
always grey. Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), so the
report works headless and in threads.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib as mpl
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

INITIAL = "initial (no registration)"
INITIAL_COLOUR = (0.45, 0.45, 0.45)
FLOOR = 1e-5  # rTRE below this is drawn at it on log axes (a perfect synthetic match is 0)
MAX_CURVE_POINTS = 4000
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "none",
    "savefig.bbox": "tight",
}
WIDTH = 6.0  # inches: readable at full text width of a two-column paper and at column width when halved
# method curves cycle through these, so two curves that coincide (identity and a method that did nothing)
# still show as two patterns
LINESTYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))


def outside_legend(ax) -> None:
    """The legend to the right of the axes, so it never covers a curve (the saved figure grows to fit)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0.0)


def palette(labels: list[str], methods: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """One fixed colour per label (seaborn's colour-blind palette up to 10 labels, tab20 up to 20, else husl).

    A method of the paper's set keeps the same colour in every report (``identity`` always the first
    colour, ``sift`` always the fourth ...); other labels, and further variants of one method (several
    devices or runs), take the colours no paper method uses, then the ones left over. ``methods`` gives
    each label's method (default: the label itself).

    >>> p = palette(["sift", "mine"])
    >>> p["sift"] == palette(["identity", "sift"])["sift"] != p["mine"]
    True
    """
    from bench.report.load import PAPER_ORDER

    methods = methods or labels
    if len(labels) > 20:
        return {lab: tuple(c) for lab, c in zip(labels, sns.color_palette("husl", len(labels)), strict=True)}
    if len(labels) > 10:  # tab20's ten strong colours first, then their light shades (husl's 11-20 evenly
        # spaced hues of one lightness were too alike to tell apart)
        tab = sns.color_palette("tab20", 20)
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return {lab: tuple(tab[order[j]]) for j, lab in enumerate(labels)}
    colours = sns.color_palette("colorblind", 10)
    out: dict[str, int] = {}
    for label, method in zip(labels, methods, strict=True):
        if method in PAPER_ORDER and PAPER_ORDER.index(method) not in out.values():
            out[label] = PAPER_ORDER.index(method)
    # the two colours no paper method uses first, then the paper methods' unused ones; grey (7) last, as the
    # state before registration is grey
    free = [i for i in (8, 9, *range(len(PAPER_ORDER)), 7) if i not in out.values()]
    for label in labels:
        if label not in out:
            out[label] = free.pop(0)
    return {label: tuple(colours[out[label]]) for label in labels}


def save(fig: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem.png`` (200 dpi) and ``stem.svg``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{stem}.png", "svg": out_dir / f"{stem}.svg"}
    fig.savefig(paths["png"], dpi=200)
    fig.savefig(paths["svg"])
    return paths


def tidy_log_axis(axis, max_decades: float = 3.0) -> None:
    """Readable tick labels on a log axis: 1-2-5 steps as plain numbers when it spans at most ``max_decades``
    decades (lower it for a horizontal axis of long labels such as 0.0001, which collide sooner), powers of
    ten otherwise; minor ticks unlabelled."""
    lo, hi = sorted(axis.get_view_interval())
    if lo <= 0 or hi <= 0:
        return
    if np.log10(hi / lo) <= max_decades:
        axis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(mticker.NullFormatter())


def _curve(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF points ``(x, F(x))``, thinned to quantiles when there are very many values."""
    x = np.sort(np.maximum(np.asarray(values, float), FLOOR))
    if x.size > MAX_CURVE_POINTS:
        p = np.linspace(0.0, 1.0, MAX_CURVE_POINTS)
        return np.quantile(x, p), p
    return x, np.arange(1, x.size + 1) / x.size


def cdf_plot(after: pd.DataFrame, before: pd.DataFrame, colours: dict, out_dir: Path) -> dict[str, Path]:
    """Figure 2: cumulative distribution of landmark rTRE per method (log x axis)."""
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 3.6))
        ax = fig.subplots()
        if len(before):  # drawn first, wide and light: a method curve on top of it (identity) leaves it visible
            x, p = _curve(before["rtre"].to_numpy())
            ax.step(x, p, where="post", color=INITIAL_COLOUR, lw=5.0, alpha=0.35, zorder=1,
                    solid_capstyle="butt", label=f"{INITIAL} (n={len(before)})")
        for i, (label, colour) in enumerate(colours.items()):
            err = after.loc[after["label"] == label, "rtre"].to_numpy()
            if err.size:
                x, p = _curve(err)
                ax.step(x, p, where="post", color=colour, lw=1.5, ls=LINESTYLES[i % len(LINESTYLES)],
                        zorder=2 + i, label=f"{label} (n={err.size})")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(
            f"landmark rTRE (TRE / image diagonal), log scale; values below {FLOOR:g} drawn at {FLOOR:g}"
        )
        ax.set_ylabel("fraction of landmarks ≤ x")
        ax.set_title("Figure 2: cumulative distribution of landmark rTRE")
        outside_legend(ax)
        return save(fig, out_dir, "figure2_cdf")


def success_at(df: pd.DataFrame, threshold: float) -> pd.Series:
    """Success rate [%] per label when success means status ok and median rTRE ≤ ``threshold``.

    The denominator is the label's evaluable rows (as in Table 1).
    """
    rows = df[df["evaluable"]]
    ok = (rows["status"] == "ok") & (rows["rtre_median"] <= threshold)
    return ok.groupby(rows["label"], sort=False).mean() * 100.0


def success_curve(df: pd.DataFrame, colours: dict, threshold: float, out_dir: Path) -> dict[str, Path]:
    """Success rate against the success threshold, with the run's threshold marked."""
    grid = np.logspace(-3.5, 0, 240)
    curves = pd.DataFrame({t: success_at(df, t) for t in grid})
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 3.4))
        ax = fig.subplots()
        for i, (label, colour) in enumerate(colours.items()):
            if label in curves.index:
                ax.plot(grid, curves.loc[label].to_numpy(), color=colour, lw=1.5,
                        ls=LINESTYLES[i % len(LINESTYLES)], label=label)
        ax.axvline(threshold, color="k", ls=":", lw=1, label=f"threshold used: {threshold:g}")
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("success threshold on per-pair median rTRE, log scale")
        ax.set_ylabel("success rate [%]")
        ax.set_title("Success rate against the success threshold")
        outside_legend(ax)
        return save(fig, out_dir, "success_vs_threshold")


def pair_boxplot(df: pd.DataFrame, colours: dict, threshold: float, out_dir: Path) -> dict[str, Path]:
    """Per-pair median rTRE per method: box plot plus one point per pair (log axis)."""
    data = df[df["scored"]].copy()
    data["rtre_plot"] = np.maximum(data["rtre_median"], FLOOR)
    order = [lab for lab in colours if lab in set(data["label"])]
    with mpl.rc_context(STYLE), warnings.catch_warnings():
        fig = Figure(figsize=(WIDTH, 0.9 + 0.45 * len(order)))
        ax = fig.subplots()
        warnings.filterwarnings("ignore", message=".*vert: bool.*")  # seaborn 0.13 on matplotlib 3.11
        kw = dict(data=data, x="rtre_plot", y="label", order=order, hue="label", hue_order=order,
                  palette=colours, ax=ax, legend=False)
        sns.boxplot(**kw, showfliers=False, fill=False, width=0.6, log_scale=True)
        sns.stripplot(**kw, size=3, alpha=0.7, jitter=0.2)
        ax.axvline(threshold, color="k", ls=":", lw=1)
        ax.set_xlabel(f"per-pair median rTRE, log scale (dotted: success threshold {threshold:g})")
        ax.set_ylabel("")
        tidy_log_axis(ax.xaxis)
        ax.set_title("Per-pair median rTRE (one point per pair)")
        return save(fig, out_dir, "pairs_rtre")


def accuracy_time(df: pd.DataFrame, boot: pd.DataFrame, summary: pd.DataFrame, colours: dict,
                  out_dir: Path) -> dict[str, Path]:
    """Accuracy against time: one faint point per pair, one marker per method (median time, median rTRE with
    its 95 % bootstrap interval), so the marker sits among its points. A label whose time was reported by
    an imported tool says so in the legend."""
    data = df[df["scored"] & np.isfinite(df["time_s"]) & (df["time_s"] > 0)]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 3.6))
        ax = fig.subplots()
        for label, colour in colours.items():
            rows = data[data["label"] == label]
            ax.scatter(
                rows["time_s"] * 1000,
                np.maximum(rows["rtre_median"], FLOOR),
                s=6,
                color=colour,
                alpha=0.3,
                lw=0,
            )
            s = summary[summary["label"] == label]
            b = boot[boot["label"] == label]
            if (
                s.empty
                or b.empty
                or not math.isfinite(s["median_time_ms"].iloc[0])
                or s["median_time_ms"].iloc[0] <= 0
            ):
                continue
            t, m = s["median_time_ms"].iloc[0], max(b["median_rtre"].iloc[0], FLOOR)
            shown = label
            if "time_source" in s.columns and s["time_source"].iloc[0] != "measured":
                shown = f"{label} (time {s['time_source'].iloc[0]})"
            lo, hi = (max(b[c].iloc[0], FLOOR) for c in ("median_rtre_ci_low", "median_rtre_ci_high"))
            yerr = [[max(m - lo, 0)], [max(hi - m, 0)]] if math.isfinite(lo) else None
            ax.errorbar(
                [t], [m], yerr=yerr, fmt="o", ms=7, color=colour, mec="k", mew=0.6, capsize=3, label=shown
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        tidy_log_axis(ax.xaxis)
        tidy_log_axis(ax.yaxis)
        ax.set_xlabel("method time per pair [ms], log scale (marker: median time over the method's pairs)")
        ax.set_ylabel("per-pair median rTRE, log scale")
        ax.set_title("Accuracy against time (marker: median time, median rTRE with 95 % CI)")
        outside_legend(ax)
        return save(fig, out_dir, "accuracy_vs_time")


def tissue_success(tissue_table: pd.DataFrame, colours: dict, out_dir: Path) -> dict[str, Path]:
    """Success rate per tissue and method (grouped bars)."""
    order = [lab for lab in colours if lab in set(tissue_table["label"])]
    tissues = sorted(set(tissue_table["tissue"]))
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 3.4))
        ax = fig.subplots()
        sns.barplot(data=tissue_table, x="tissue", y="success_rate_pct", hue="label", order=tissues,
                    hue_order=order, palette=colours, ax=ax)
        ax.set_ylim(0, 105)
        ax.set_xlabel("")
        ax.set_ylabel("success rate [%]")
        ax.set_title("Success rate per tissue")
        ax.tick_params(axis="x", rotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return save(fig, out_dir, "success_per_tissue")


def quality_roc(rated: pd.DataFrame, table: pd.DataFrame, colours: dict, threshold: float,
                out_dir: Path) -> dict[str, Path]:
    """ROC curves of the landmark-free ``quality`` as a predictor of success: all methods together (black)
    and per method label (with at least one success and one failure), each with its AUC; the point of the
    "likely failed" threshold marked on the overall curve."""
    from bench.report import reliability

    aucs = dict(zip(table["label"], table["auc"], strict=True))
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH * 0.8, 3.6))
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="chance (AUC 0.5)")
        for i, (label, colour) in enumerate(colours.items()):
            rows = rated[rated["label"] == label]
            y = rows["success"].to_numpy(bool)
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = reliability.roc_points(rows["quality"].to_numpy(float), y)
            ax.step(fpr, tpr, where="post", color=colour, lw=1.3, ls=LINESTYLES[i % len(LINESTYLES)],
                    label=f"{label} (AUC {aucs.get(label, math.nan):.3f}, n={len(rows)})")
        y = rated["success"].to_numpy(bool)
        if y.any() and not y.all():
            q = rated["quality"].to_numpy(float)
            fpr, tpr, _ = reliability.roc_points(q, y)
            ax.step(fpr, tpr, where="post", color="k", lw=2.2, zorder=5,
                    label=f"all methods (AUC {aucs.get('all methods', math.nan):.3f}, n={len(rated)})")
            ofpr, otpr = reliability.operating_point(q, y, threshold)
            ax.plot([ofpr], [otpr], "o", ms=7, mfc="white", mec="k", mew=1.2, zorder=6,
                    label=f"quality ≥ {threshold:g} predicted success")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate (failures predicted successes)")
        ax.set_ylabel("true positive rate (successes predicted)")
        ax.set_title("Quality as a predictor of success (ROC)")
        outside_legend(ax)
        return save(fig, out_dir, "quality_roc")
