"""Failure gallery (the paper's Figure 3): each method's worst pairs, before and after, as colour composites.

The target is drawn in magenta and the (warped) source in green on the target's frame, so tissue that
overlaps turns white and misalignment shows as separate magenta and green. Images are decoded already
reduced (:func:`bench.imageio.load_image`) so whole slides never load at full size; the stored matrix
(original pixels, source -> target) is composed with the two reductions and applied with
``cv2.warpAffine``. Target landmarks (white circles) and source landmarks (yellow crosses: warped by the
stored result after, unwarped before) are joined by their error lines.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import cv2
import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from bench import geometry, imageio
from bench.pairs import LandmarkError, read_landmarks
from bench.report.load import Run, read_points, resolve_file
from bench.report.plots import STYLE
from bench.store import warped_path

MAX_SIDE = 720  # longer side of the decoded target / source in the gallery, pixels


@functools.lru_cache(maxsize=16)
def read_reduced(path: str, max_side: int = MAX_SIDE) -> tuple[np.ndarray, tuple[float, float]]:
    """Decode an image reduced so its longer side is at most ``max_side`` (:func:`bench.imageio.load_image`:
    JPEG DCT scaling, TIFF pyramid levels or bands, so a whole slide is never decoded at full size).

    Returns
    -------
    rgb : (h, w, 3) uint8 array
    scale : (sx, sy)
        Exact scales from original pixel coordinates to ``rgb`` (for
        :func:`bench.geometry.resample_matrix`).
    """
    height, width = imageio.read_size(path)
    factor = min(1.0, max_side / max(width, height))
    loaded = imageio.load_image(path, imageio.target_size((height, width), factor))
    return loaded.rgb, loaded.scale


def tissue_intensity(rgb: np.ndarray) -> np.ndarray:
    """(h, w) float32 in [0, 1]: inverted grayscale (tissue bright), stretched to its 99th percentile."""
    g = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    top = float(np.percentile(g, 99)) or 1.0
    return np.clip(g / top, 0.0, 1.0)


def composite(target: np.ndarray, source_on_target: np.ndarray) -> np.ndarray:
    """(h, w, 3) float RGB: target in magenta (red + blue), source in green."""
    return np.dstack([target, source_on_target, target])


def parse_matrix(text: str) -> np.ndarray | None:
    """The stored 3x3 matrix, or None when absent or malformed."""
    try:
        return geometry.as_3x3(np.asarray(json.loads(text), dtype=float))
    except (TypeError, ValueError, json.JSONDecodeError):
        return None


def _points(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return read_landmarks(path)
    except LandmarkError:
        return None


def _draw_points(ax, target: np.ndarray | None, moved: np.ndarray | None) -> None:
    if target is None or moved is None:
        return
    n = min(len(target), len(moved))
    segs = np.stack([target[:n], moved[:n]], axis=1)
    ax.add_collection(LineCollection(segs, colors="yellow", linewidths=0.8, alpha=0.9))
    ax.scatter(target[:n, 0], target[:n, 1], s=14, facecolors="none", edgecolors="white", linewidths=0.8)
    ax.scatter(moved[:n, 0], moved[:n, 1], s=14, marker="x", color="yellow", linewidths=0.8)


class PairView:
    """Everything needed to draw one pair of one result row in the reduced target frame."""

    def __init__(self, row, run: Run, max_side: int = MAX_SIDE):
        self.row, self.problem = row, ""
        src_path = resolve_file(row.source_image, run)
        tgt_path = resolve_file(row.target_image, run)
        if src_path is None or tgt_path is None:
            self.problem = f"image not found: {row.source_image if src_path is None else row.target_image}"
            return
        try:
            self.src_rgb, src_scale = read_reduced(str(src_path), max_side)
            tgt_rgb, tgt_scale = read_reduced(str(tgt_path), max_side)
        except imageio.ImageLoadError as exc:
            self.problem = str(exc)
            return
        self.r_s = geometry.resample_matrix(*src_scale)
        self.r_t = geometry.resample_matrix(*tgt_scale)
        self.size = (tgt_rgb.shape[1], tgt_rgb.shape[0])
        self.target = tissue_intensity(tgt_rgb)
        self.source = tissue_intensity(self.src_rgb)
        self.matrix = parse_matrix(row.matrix)
        reduce = functools.partial(geometry.apply, self.r_t)
        t_lnd = _points(resolve_file(row.target_landmarks, run))
        s_lnd = _points(resolve_file(row.source_landmarks, run))
        w_lnd = read_points(warped_path(run.path, row.method, row.pair_id))
        self.t_lnd = None if t_lnd is None else reduce(t_lnd)
        self.s_lnd = None if s_lnd is None else reduce(s_lnd)  # identity: source pixels on the target frame
        self.w_lnd = None if w_lnd is None else reduce(w_lnd)

    def warped(self, matrix: np.ndarray) -> np.ndarray:
        """The reduced source warped onto the reduced target frame by an original-pixel matrix."""
        m = self.r_t @ matrix @ np.linalg.inv(self.r_s)
        return cv2.warpAffine(self.source, m[:2], self.size, flags=cv2.INTER_LINEAR, borderValue=0.0)

    def draw(self, ax, after: bool, title: str) -> None:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(title, fontsize=7)
        landmarks_only = after and self.matrix is None and self.w_lnd is not None and not self.problem
        if self.problem or (after and self.matrix is None and not landmarks_only):
            ax.text(0.5, 0.5, self.problem or "no matrix stored", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, wrap=True)
            return
        if landmarks_only:  # an imported row: the tool gave warped landmarks, no matrix to warp the image by
            moving = np.zeros_like(self.target)
            ax.text(0.02, 0.02, "imported: landmarks only", color="white",
                    fontsize=6, transform=ax.transAxes, va="bottom")
        else:
            moving = self.warped(self.matrix if after else np.eye(3))
        ax.imshow(composite(self.target, moving), interpolation="bilinear")
        _draw_points(ax, self.t_lnd, self.w_lnd if after else self.s_lnd)
        ax.set_xlim(0, self.size[0] - 1)
        ax.set_ylim(self.size[1] - 1, 0)


def worst_rows(df: pd.DataFrame, label: str, k: int) -> pd.DataFrame:
    """The ``k`` scored rows of ``label`` with the largest median rTRE (failures first on ties)."""
    rows = df[(df["label"] == label) & df["scored"]].copy()
    rows["_fail"] = rows["status"] != "ok"
    return rows.sort_values(["rtre_median", "_fail"], ascending=[False, False]).head(k)


def _title_after(row) -> str:
    status = (
        row.status if row.status == "ok" else f"{row.status.upper()}{' (fallback)' if row.fallback else ''}"
    )
    return f"after {row.label}: median rTRE {row.rtre_median:.4f} [{status}]"


def _panel_size(df_rows: pd.DataFrame, runs: dict[str, Run], width: float) -> float:
    """Panel height (inches) for a panel ``width`` wide, from the first target's aspect ratio."""
    row = df_rows.iloc[0]
    path = resolve_file(row["target_image"], runs[row["run"]])
    if path is None:
        return width * 0.75
    try:
        height, w = imageio.read_size(path)
    except imageio.ImageLoadError:
        return width * 0.75
    return width * height / w


def method_gallery(df: pd.DataFrame, runs: dict[str, Run], label: str, k: int, out_path: Path) -> Path | None:
    """One figure: ``k`` worst pairs of ``label`` as rows, before (identity) | after (stored matrix)."""
    rows = worst_rows(df, label, k)
    if rows.empty:
        return None
    height = _panel_size(rows, runs, 3.1) + 0.35
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(6.4, height * len(rows) + 0.4), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(rows), 2))
        for ax_row, row in zip(axes, rows.itertuples(index=False), strict=True):
            view = PairView(row, runs[row.run])
            before = f"pair {row.pair_id} ({row.tissue}): before, median rTRE {row.ire_median:.4f}"
            view.draw(ax_row[0], after=False, title=before)
            view.draw(ax_row[1], after=True, title=_title_after(row))
        fig.suptitle(f"{label}: worst {len(rows)} pair(s)\nmagenta: target, green: source; "
                     "o target / x source landmarks, yellow: error", fontsize=8)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=150)
    return out_path


def most_disputed_pair(df: pd.DataFrame) -> str | None:
    """The pair_key on which the labels' median rTRE spread most (log ratio), among pairs 2+ labels scored."""
    wide = df[df["scored"]].pivot_table(
        index="pair_key", columns="label", values="rtre_median", aggfunc="first"
    )
    wide = wide[wide.notna().sum(axis=1) >= 2]
    if wide.empty:
        return None
    logs = np.log10(np.maximum(wide.to_numpy(float), 1e-6))
    spread = np.nanmax(logs, axis=1) - np.nanmin(logs, axis=1)
    return str(wide.index[int(np.nanargmax(spread))])


def comparison_figure(df: pd.DataFrame, runs: dict[str, Run], pair_key: str, out_path: Path) -> Path:
    """The paper's Figure 3 layout: one pair, before and after every method, side by side."""
    rows = df[(df["pair_key"] == pair_key) & df["scored"]]
    order = {lab: i for i, lab in enumerate(dict.fromkeys(df["label"]))}
    rows = rows.sort_values("label", key=lambda s: s.map(order))
    panels = 1 + len(rows)
    ncol = min(4, panels)
    nrow = -(-panels // ncol)
    height = _panel_size(rows, runs, 1.9) + 0.3
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(1.9 * ncol + 0.2, height * nrow + 0.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
        first = rows.iloc[0]
        PairView(first, runs[first.run]).draw(axes[0], after=False, title=f"before: {first.ire_median:.4f}")
        for ax, row in zip(axes[1:], rows.itertuples(index=False), strict=False):
            flag = "" if row.status == "ok" else f" [{row.status}]"
            PairView(row, runs[row.run]).draw(
                ax, after=True, title=f"{row.label}: {row.rtre_median:.4f}{flag}"
            )
        for ax in axes[panels:]:
            ax.set_axis_off()
        fig.suptitle(
            f"Pair {first.pair_id} ({first.tissue}): median rTRE before and after each method", fontsize=8
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=150)
    return out_path


def slug(text: str) -> str:
    """A file-name-safe form of a label, bounded like the store's names (:func:`bench.store.bounded`: a long
    label keeps a prefix and a hash of the whole label).

    >>> slug("sift [cuda:0] (run-2)")
    'sift-cuda-0-run-2'
    >>> len(slug("|".join(["identity"] * 300))) <= 100
    True
    """
    from bench.store import bounded

    return bounded(re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "method", text, limit=100)


def build_gallery(df: pd.DataFrame, runs: list[Run], out_dir: Path, k: int = 3) -> list[dict]:
    """Every method's gallery plus the comparison figure; entries ``{"title", "path", "label"}``."""
    by_name = {r.name: r for r in runs}
    entries = []
    key = most_disputed_pair(df)
    if key is not None:
        path = comparison_figure(df, by_name, key, out_dir / "comparison.png")
        entries.append({"title": "Pair on which the methods differ most", "path": path, "label": ""})
    for i, label in enumerate(dict.fromkeys(df["label"])):
        path = method_gallery(df, by_name, label, k, out_dir / f"worst_{i:02d}_{slug(label)}.png")
        if path is not None:
            entries.append({"title": f"{label}: worst pairs", "path": path, "label": label})
        else:
            entries.append({"title": unscored_note(df, label), "path": None, "label": label})
    return entries


def unscored_note(df: pd.DataFrame, label: str) -> str:
    """Why a label has nothing to draw: its row count by status and its most frequent error."""
    rows = df[df["label"] == label]
    counts = ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())
    errors = rows.loc[rows["error"].astype(str).str.strip() != "", "error"].value_counts()
    why = f"; most frequent error ({errors.iloc[0]}x): {errors.index[0]}" if len(errors) else ""
    return f"{label}: no scored pair to draw ({counts}){why}"
