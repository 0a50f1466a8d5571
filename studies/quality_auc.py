"""How well the harness's landmark-free ``quality`` predicts success (docs/quality.md).

Two uses:

``python studies/quality_auc.py runs DIR [DIR ...] [--methods a,b] [--offline]``
    The ROC AUC of ``quality`` against ``success`` (median rTRE <= the run's threshold) per run folder, over
    its ``ok`` rows (those that carry a quality), overall and per method, by the Mann-Whitney statistic
    (:func:`bench.quality.roc_auc`); also the share of successes and failures below
    ``bench.quality.LIKELY_FAILED_BELOW``. ``--offline`` recomputes the quality of every ``ok`` row from its
    matrix with the current :func:`bench.quality.alignment_quality` (the pair is prepared again with the
    run's preprocessing parameters), for runs written before a change of the score.

``python studies/quality_auc.py estimate PATH [PATH ...]``
    The harness's ``error_estimate`` (:func:`bench.quality.estimated_error`) recomputed offline, for a run
    folder's ``ok`` rows (as ``--offline`` does for quality) or a ``generated`` folder's candidates: the AUC of
    its negation next to quality's, and the shares of successes and failures the verdict "estimate above the
    success threshold" flags (docs/quality.md, "The error estimate"). Writes ``estimate.csv`` beside.

``python studies/quality_auc.py cost FOLDER [--pairs N]``
    The cost of the score: median wall time of one quality call and one ``sift`` call on the same prepared
    pairs of a ``generated`` folder, interleaved in one process (compare the ratio, not the times, on a
    shared machine).

``python studies/quality_auc.py generated OUT [--pairs N] [--seed S]``
    The generated design set the score and its threshold were chosen on (never real data): ``N`` generated
    pairs written in the ANHIR layout under ``OUT`` (1024 px, elastic warp, any rotation, scale 0.85-1.2,
    shear; the source's structure finer than 3 or 6 px replaced by another section's, as between real
    consecutive cuts; a quarter of the sources mirrored: :class:`bench.datasets.synthetic.Variation`), prepared by the shared stage, and for each pair the candidate alignments
    a quality score must rank: the truth, the preprocessing alone, the results of ``sift``, ``surf``,
    ``iterative`` and ``learned``, and the truth disturbed by rotations, shifts and scalings of
    increasing size (labelled by their landmark error, so successes and failures on both sides of the
    threshold). Writes ``OUT/candidates.csv`` (one row per candidate: pair, kind, rTRE, success, quality,
    the matrix) and prints the AUC overall and per kind of candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from bench.datasets.synthetic import (
    GeneratorConfig,
    Variation,
    dataset_plan,
    generate_pair,
    write_pair,
)

from bench import Context, RegistrationFailed, geometry, quality
from bench.metrics import SUCCESS_THRESHOLD as SUCCESS
from bench.pairs import TABLE_HEADER, read_landmarks
from bench.preprocess import PreprocessParams, prepare_pair

METHODS = ("sift", "surf", "iterative", "learned")


# ---------------------------------------------------------------------------------------------
# the generated design set


def write_generated(folder: Path, n_pairs: int, seed: int, size: int = 1024, gray: bool = False,
                    stain_jitter: float = 0.12) -> pd.DataFrame:
    """Write the design pairs (ANHIR layout) and return their table plus each pair's true matrix.

    ``size``: the target's longer side (the elastic warp scales with it: 10 px at 1024); ``gray``: both
    images as 3-channel grayscale scans; ``stain_jitter``: the generator's per-image spread of stain colours.
    """
    cfg = GeneratorConfig(size=size, elastic_px=10.0 * size / 1024, scale_range=(0.85, 1.2), max_shear=0.08,
                          stain_jitter=stain_jitter)
    rows = []
    for k, (tissue, s, t, pair_seed) in enumerate(dataset_plan(n_pairs, seed)):
        # consecutive cuts share the coarse structure, not the cells: the source's structure finer than 3 or
        # 6 px (every other pair) comes from another section; a quarter of the sources are mirrored
        variation = Variation(mirror_probability=0.25, texture_swap_sigma=3.0 if k % 2 else 6.0)
        pair = generate_pair(pair_seed, tissue=tissue, source_stain=s, target_stain=t, config=cfg,
                             variation=variation)
        if gray:
            pair = dataclasses.replace(pair, source_rgb=gray_rgb(pair.source_rgb), target_rgb=gray_rgb(pair.target_rgb))
        truth, p = pair.true_matrix, pair
        paths = write_pair(folder, f"{tissue}_{k}", pair)
        h, w = p.target_rgb.shape[:2]
        rows.append([k, paths["Source image"], paths["Source landmarks"], paths["Target image"],
                     paths["Target landmarks"], f"{math.hypot(h, w):.2f}", f"({h}, {w})", "training",
                     json.dumps(truth.tolist())])
    table = pd.DataFrame(rows, columns=[*TABLE_HEADER, "truth"])
    table.drop(columns="truth").to_csv(folder / "dataset.csv", index=False)
    return table


def gray_rgb(rgb: np.ndarray) -> np.ndarray:
    """An RGB uint8 image as a 3-channel grayscale one."""
    return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def _disturbances(rng: np.random.Generator, centre: np.ndarray, radius: float, diag: float, n: int) -> list:
    """``n`` working-frame disturbances (3x3, applied after the truth) of log-uniform size 0.3-40 % of the
    diagonal: a rotation about the tissue centre, a shift and a scaling, mixed at random."""
    out = []
    for size in np.exp(rng.uniform(np.log(0.003), np.log(0.4), n)):
        u = rng.uniform(0, 1)
        angle = math.degrees((1 - u) * size * diag / max(radius, 1.0)) * rng.choice([-1, 1])
        shift = u * size * diag * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])
        scale = math.exp(rng.normal(0, 0.3 * size))
        out.append(geometry.translation(*(centre + shift)) @ geometry.rotation(angle)
                   @ geometry.scaling(scale) @ geometry.translation(*-centre))
    return out


def generated_candidates(folder: Path, table: pd.DataFrame, seed: int, disturbed: int = 8,
                         method_names: tuple[str, ...] = METHODS) -> pd.DataFrame:
    """Every candidate alignment of every design pair with its landmark error (see the module doc)."""
    from bench.registry import get

    methods = {name: get(name)() for name in method_names}
    for m in methods.values():
        m.prepare(Context())
    rng = np.random.default_rng(seed)
    rows = []
    for _, r in table.iterrows():
        prepared = prepare_pair(folder / r["Source image"], folder / r["Target image"], PreprocessParams())
        src = read_landmarks(folder / r["Source landmarks"])
        tgt = read_landmarks(folder / r["Target landmarks"])
        diag = float(r["Image diagonal [pixels]"])
        fixed, moving = prepared.fixed, prepared.moving
        truth = prepared.to_working(np.array(json.loads(r["truth"])))
        cands = {"truth": truth, "preprocessed": np.eye(3)}
        for name, m in methods.items():
            try:
                cands[name] = geometry.as_3x3(m.estimate(fixed, moving, Context(seed=0)).matrix)
            except RegistrationFailed:
                pass
        ys, xs = np.nonzero(fixed.mask)
        centre = np.array([xs.mean(), ys.mean()]) if len(xs) else np.array(fixed.shape[::-1]) / 2
        radius = float(np.sqrt(len(xs) / np.pi))
        wdiag = float(np.hypot(*fixed.shape))
        for i, e in enumerate(_disturbances(rng, centre, radius, wdiag, disturbed)):
            cands[f"disturbed-{i}"] = e @ truth
        for kind, w in cands.items():
            moved = geometry.apply(prepared.to_original(w), src)
            rtre = float(np.median(np.linalg.norm(moved - tgt, axis=1)) / diag)
            t0 = time.perf_counter()
            q = quality.alignment_quality(fixed, moving, w)
            rows.append(dict(pair=int(r[""]), kind=kind.split("-")[0], rtre=rtre, success=rtre <= SUCCESS,
                             quality=q, quality_ms=1000 * (time.perf_counter() - t0),
                             matrix=json.dumps(w.tolist())))
        print(f"pair {r['']}: {len(cands)} candidates", file=sys.stderr)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# run folders


def _run_params(run: Path) -> PreprocessParams:
    """The preprocessing parameters a run folder's rows were made with (its run.json)."""
    manifest = json.loads((run / "run.json").read_text())
    pp = manifest.get("preprocess") or manifest.get("preprocess_params") or {}
    fields = {f.name for f in dataclasses.fields(PreprocessParams)}
    return PreprocessParams(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in pp.items() if k in fields})


def offline_quality(run: Path, rows: pd.DataFrame, score=quality.alignment_quality) -> pd.Series:
    """The current ``score`` (quality, or :func:`bench.quality.estimated_error`) of each ``ok`` row, recomputed
    from its original-pixel matrix (the pair prepared again with the run's parameters)."""
    params = _run_params(run)
    out = pd.Series(np.nan, index=rows.index)
    for (src, tgt), group in rows.groupby(["source_image", "target_image"]):
        prepared = prepare_pair(src, tgt, params)
        for i, r in group.iterrows():
            working = prepared.to_working(np.array(json.loads(r["matrix"])))
            out[i] = score(prepared.fixed, prepared.moving, working)
    return out


def report_runs(runs: list[Path], methods: list[str] | None, offline: bool) -> None:
    for run in runs:
        df = pd.read_csv(run / "results.csv")
        if methods:
            df = df[df["method"].isin(methods)]
        ok = df[df["status"] == "ok"].copy()
        if offline:
            ok["quality"] = offline_quality(run, ok)
        ok = ok.dropna(subset=["quality"])
        print(f"{run}: {len(ok)} ok rows ({int(ok['success'].sum())} successes), {len(df) - len(ok)} other rows")
        print_auc(ok, "method")


def print_auc(df: pd.DataFrame, by: str) -> None:
    """The AUC of ``quality`` for ``success`` over ``df``, then per value of its column ``by``, and how many
    successes and failures score below :data:`bench.quality.LIKELY_FAILED_BELOW`."""
    cut = quality.LIKELY_FAILED_BELOW
    groups = [("all", df), *((str(k), g) for k, g in df.groupby(by))]
    for name, g in groups:
        s, f = g[g["success"].astype(bool)], g[~g["success"].astype(bool)]
        auc = quality.roc_auc(g["quality"], g["success"].astype(bool))
        print(f"  {name:>14}: AUC {auc:.3f}  successes {len(s):3d} (below {cut}: {int((s['quality'] < cut).sum())})"
              f"  failures {len(f):3d} (below: {int((f['quality'] < cut).sum())})")


def estimate_report(path: Path) -> None:
    """Offline ``error_estimate`` of a run folder's ok rows or a generated folder's candidates, and its verdict."""
    import torch

    torch.set_num_threads(1)
    if (path / "candidates.csv").exists():
        df = pd.read_csv(path / "candidates.csv")
        table = pd.read_csv(path / "truth.csv")
        df["error_estimate"] = np.nan
        for _, r in table.iterrows():
            prepared = prepare_pair(path / r["Source image"], path / r["Target image"], PreprocessParams())
            for i, c in df[df["pair"] == int(r.iloc[0])].iterrows():
                df.loc[i, "error_estimate"] = quality.estimated_error(
                    prepared.fixed, prepared.moving, np.array(json.loads(c["matrix"])))
    else:
        df = pd.read_csv(path / "results.csv")
        df = df[(df["status"] == "ok") & (df["method"] != "identity")].copy()
        df["error_estimate"] = offline_quality(path, df, quality.estimated_error)
    df.to_csv(path / "estimate.csv", index=False)
    y = df["success"].astype(bool)
    e = df["error_estimate"].to_numpy(float)
    flagged = np.isfinite(e) & (e > SUCCESS)
    print(f"{path}: {len(df)} rows ({int(y.sum())} successes / {int((~y).sum())} failures); AUC estimate "
          f"{quality.roc_auc(-e, y):.3f}, quality {quality.roc_auc(df['quality'], y):.3f}; estimate > {SUCCESS}: "
          f"{int((flagged & y).sum())} successes ({100 * (flagged & y).sum() / max(1, y.sum()):.1f} %), "
          f"{int((flagged & ~y).sum())} failures ({100 * (flagged & ~y).sum() / max(1, (~y).sum()):.0f} %)")


def cost(folder: Path, n_pairs: int, repeats: int = 3) -> None:
    """Median wall time of one quality call and of one ``sift`` call on the same prepared pairs, interleaved
    in one process (their ratio holds on a busy machine; the absolute times do not)."""
    from bench.registry import get

    table = pd.read_csv(folder / "dataset.csv").head(n_pairs)
    sift = get("sift")()
    times: dict[str, list[float]] = {"quality": [], "sift": []}
    for _, r in table.iterrows():
        prepared = prepare_pair(folder / r["Source image"], folder / r["Target image"], PreprocessParams())
        fixed, moving = prepared.fixed, prepared.moving
        m = geometry.as_3x3(sift.estimate(fixed, moving, Context(seed=0)).matrix)  # warm-up, and the matrix
        for _ in range(repeats):
            t0 = time.perf_counter()
            sift.estimate(fixed, moving, Context(seed=0))
            t1 = time.perf_counter()
            quality.alignment_quality(fixed, moving, m)
            t2 = time.perf_counter()
            times["sift"].append(t1 - t0)
            times["quality"].append(t2 - t1)
    q, s = (1000 * float(np.median(times[k])) for k in ("quality", "sift"))
    print(f"{len(table)} pairs x {repeats}, working size {fixed.shape}: quality {q:.1f} ms, sift {s:.1f} ms "
          f"(median per call; quality = {q / s:.3f} x sift)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("runs", help="AUC of quality per run folder")
    r.add_argument("runs", nargs="+", type=Path)
    r.add_argument("--methods", default="", help="comma-separated methods to keep (default: all)")
    r.add_argument("--offline", action="store_true", help="recompute quality from the matrices")
    g = sub.add_parser("generated", help="build and score the generated design set")
    g.add_argument("out", type=Path)
    g.add_argument("--pairs", type=int, default=24)
    g.add_argument("--seed", type=int, default=2024)
    g.add_argument("--size", type=int, default=1024, help="longer side of the targets, px")
    g.add_argument("--gray", action="store_true", help="grayscale scans")
    g.add_argument("--stain-jitter", type=float, default=0.12, help="the generator's stain colour spread")
    g.add_argument("--disturbed", type=int, default=8, help="disturbed truths per pair")
    g.add_argument("--methods", default=",".join(METHODS), help="methods whose results are candidates")
    e = sub.add_parser("estimate", help="the error estimate offline: run folders or generated folders")
    e.add_argument("paths", nargs="+", type=Path)
    c = sub.add_parser("cost", help="time quality vs a sift call on the pairs of a generated folder")
    c.add_argument("folder", type=Path)
    c.add_argument("--pairs", type=int, default=8)
    a = ap.parse_args(argv)
    if a.cmd == "cost":
        cost(a.folder, a.pairs)
        return
    if a.cmd == "estimate":
        for path in a.paths:
            estimate_report(path)
        return
    if a.cmd == "runs":
        report_runs(a.runs, [m for m in a.methods.split(",") if m] or None, a.offline)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    table = write_generated(a.out, a.pairs, a.seed, a.size, a.gray, a.stain_jitter)
    table.to_csv(a.out / "truth.csv", index=False)
    cands = generated_candidates(a.out, table, a.seed, a.disturbed, tuple(m for m in a.methods.split(",") if m))
    cands.to_csv(a.out / "candidates.csv", index=False)
    print(f"{a.out}: {len(cands)} candidates ({int(cands['success'].sum())} successes); quality "
          f"{cands['quality_ms'].median():.1f} ms median per call")
    print_auc(cands, "kind")


if __name__ == "__main__":
    main()
