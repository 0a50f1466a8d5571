"""Choose the default composition ``cascade`` on generated data only (docs/compose.md), reproducibly.

Four generated sets, written to ``OUT/data`` in the ANHIR layout (``datasets/synthetic/``):

* ``moved``: ``N`` pairs, any rotation, scale 0.85-1.2, shear up to 0.08, elastic 3 px, and the source's fine
  structure (below ``--swap`` px) taken from another section of the same tissue (``Variation.texture_swap_sigma``);
* ``mirrored``: ``N / 2`` pairs moved the same way, every source mirrored first;
* ``unrelated``: ``N / 2`` pairs of two different tissues (must be refused);
* ``hard``: ``2 N / 3`` pairs moved the same way with elastic 10 px, fine structure swapped below 1.75 ``--swap``
  px, a quarter of the sources mirrored.

Stages (``--stage``, default all):

1. ``members``: ``bench run`` of the single methods and refinements a composition can be made of, on each set
   (always without the preprocessing cache);
2. ``simulate``: the members' ``quality`` recomputed with the current score (:func:`current_quality`), then every
   fallback order of those members (1-4 of them, optionally ending in ``preprocessed``) and
   several ``accept`` / ``refuse_below`` values, evaluated from the member rows: a fallback's decision depends only
   on each member's status and ``quality`` (the harness computes the same ``alignment_quality`` the composite
   uses), so its result is known without running it; its time is the sum of its members' times (the quality
   checks excluded). Ranked by: successes on moved + mirrored, then unrelated pairs wrongly accepted, then median
   time;
3. ``validate``: the named candidates (``--candidates``, parameters with ``--set``) run for real as composites on
   every set, beside ``sift`` (times compare within one run), so the simulation is checked and the times include
   everything.

usage: python benchmarks/cascade_study.py OUT [--n 16] [--size 800] [--swap 4] [--stage ...]
                                              [--pre flip_test=true] [--candidates 'sift|iterative|preprocessed' ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench.datasets.synthetic import GeneratorConfig, Variation, write_dataset

from bench.runner import RunConfig, parse_overrides, run

MEMBERS = ("preprocessed", "sift", "surf", "iterative", "learned", "learned>iterative")
ACCEPT = (0.0, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0)
REFUSE = (0.0, 1.0, 1.1, 1.2, 1.3, 1.5)
SETS = ("moved", "mirrored", "hard", "unrelated")


def make_sets(out: Path, n: int, size: int, swap: float) -> dict[str, Path]:
    cfg = GeneratorConfig(size=size, n_landmarks=30, max_rotation_deg=180.0, scale_range=(0.85, 1.2), max_shear=0.08,
                          elastic_px=3.0 * size / 800)
    # hard: consecutive sections further apart (more elastic, less fine structure shared), a quarter mirrored
    hard = dataclasses.replace(cfg, elastic_px=10.0 * size / 800)
    tables = {}
    for k, (name, count, config, variation, unrelated) in enumerate([
        ("moved", n, cfg, Variation(texture_swap_sigma=swap), False),
        ("mirrored", max(2, n // 2), cfg, Variation(mirror_probability=1.0, texture_swap_sigma=swap), False),
        ("unrelated", max(2, n // 2), cfg, Variation(texture_swap_sigma=swap), True),
        ("hard", max(2, 2 * n // 3), hard, Variation(mirror_probability=0.25, texture_swap_sigma=1.75 * swap), False),
    ]):
        folder = out / "data" / name
        table = folder / "dataset.csv"
        if not table.exists():
            write_dataset(folder, count, seed=2026 + k, config=config, prefix=f"{name}-", variation=variation,
                          unrelated=unrelated)
        tables[name] = table
    return tables


def run_methods(tables: dict[str, Path], out: Path, methods: list[str], overrides: dict[str, dict[str, str]],
                tag: str) -> None:
    for name, table in tables.items():
        t0 = time.perf_counter()
        summary = run(RunConfig(dataset=table, methods=",".join(methods), out=out / "runs" / f"{tag}-{name}",
                                cache_enabled=False, device="cpu", overrides=overrides, command=" ".join(sys.argv)))
        print(f"[{tag}] {name}: {summary.counts} in {time.perf_counter() - t0:.0f} s", flush=True)


def load(out: Path, tag: str, requality: bool = False) -> dict[str, pd.DataFrame]:
    frames = {}
    for name in SETS:
        path = out / "runs" / f"{tag}-{name}" / "results.csv"
        if path.exists():
            df = pd.read_csv(path, dtype={"pair_id": str})
            df["success"] = df["success"].astype(str).str.lower() == "true"
            if requality:
                df["quality"] = current_quality(path.parent, df)
            frames[name] = df
    return frames


def current_quality(run_dir: Path, df: pd.DataFrame) -> pd.Series:
    """``quality`` of every ok row recomputed with today's :func:`bench.quality.alignment_quality` (the score was
    being tuned while the members ran): each pair preprocessed again with the run's parameters, each row's
    original-pixel matrix brought to that working frame. Cached beside the run, keyed by the quality code."""
    import hashlib
    import inspect
    import json

    from bench import quality
    from bench.method import make_params
    from bench.preprocess import PreprocessParams, prepare_pair

    digest = hashlib.sha256(inspect.getsource(quality).encode()).hexdigest()[:12]
    cache = run_dir / f"quality-{digest}.csv"
    if cache.exists():
        q = pd.read_csv(cache, dtype={"pair_id": str}).set_index(["pair_id", "method"])["quality"]
        return pd.Series([q.get((p, m), np.nan) for p, m in zip(df["pair_id"], df["method"], strict=True)],
                         index=df.index)
    pre = json.loads((run_dir / "run.json").read_text())["preprocess"]
    known = {f.name for f in dataclasses.fields(PreprocessParams)}
    params = make_params(PreprocessParams, {k: v for k, v in pre.items() if k in known})
    values = pd.Series(np.nan, index=df.index)
    for (src, tgt), g in df.groupby(["source_image", "target_image"]):
        prepared = prepare_pair(src, tgt, params)
        for i, row in g.iterrows():
            if row["status"] == "ok":
                working = prepared.to_working(np.array(json.loads(row["matrix"])))
                values[i] = quality.alignment_quality(prepared.fixed, prepared.moving, working)
    pd.DataFrame({"pair_id": df["pair_id"], "method": df["method"], "quality": values}).to_csv(cache, index=False)
    return values


def simulate(rows: dict[str, dict], order: tuple[str, ...], accept: float, refuse: float) -> dict:
    """The fallback ``order`` on one pair from its member rows (method -> row)."""
    spent, tried = 0.0, []
    for m in order:
        r = rows[m]
        spent += float(r["time_s"])
        if r["status"] != "ok":
            continue
        q = float(r["quality"]) if pd.notna(r["quality"]) else 0.0
        tried.append((q, m))
        if q >= accept:
            return {"ok": True, "by": m, "time": spent}
    if tried:
        q, m = max(tried)
        if q >= refuse:
            return {"ok": True, "by": m, "time": spent}
    return {"ok": False, "by": "", "time": spent}


_BY_PAIR: dict[int, dict[str, dict[str, dict]]] = {}


def _by_pair(frames: dict[str, pd.DataFrame]) -> dict[str, dict[str, dict]]:
    """set -> pair -> method -> row, computed once per frames dict."""
    key = id(frames)
    if key not in _BY_PAIR:
        _BY_PAIR[key] = {name: {pid: {r["method"]: r for r in g.to_dict("records")} for pid, g in df.groupby("pair_id")}
                         for name, df in frames.items()}
    return _BY_PAIR[key]


def summarise(frames: dict[str, pd.DataFrame], order: tuple[str, ...], accept: float, refuse: float) -> dict:
    out: dict = {"order": "|".join(order), "accept": accept, "refuse_below": refuse}
    times, times_unrelated = [], []
    for name, by_pair in _by_pair(frames).items():
        res = []
        for rows in by_pair.values():
            s = simulate(rows, order, accept, refuse)
            fallback = rows["preprocessed"]["rtre_median"]
            res.append((s["ok"] and bool(rows[s["by"]]["success"]), rows[s["by"]]["rtre_median"] if s["ok"] else fallback,
                        s["ok"]))
            (times_unrelated if name == "unrelated" else times).append(s["time"])
        if name == "unrelated":
            out["unrelated accepted"] = sum(r[2] for r in res)
        else:
            out[f"{name} success"] = sum(r[0] for r in res)
            out[f"{name} rTRE"] = float(np.median([r[1] for r in res]))
    out["median time"] = float(np.median(times))  # over the pairs to align (unrelated ones apart)
    if times_unrelated:
        out["unrelated time"] = float(np.median(times_unrelated))
    return out


def member_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    recs = []
    for name, df in frames.items():
        for m, g in df.groupby("method", sort=False):
            ok = g["status"] == "ok"
            rec = {"set": name, "method": m, "ok": int(ok.sum()), "n": len(g), "median time": g["time_s"].median()}
            if name == "unrelated":
                rec["accepted"] = int(ok.sum())
            else:
                rec["success"] = int(g["success"].sum())
                rec["median rTRE"] = g["rtre_median"].median()
                q = g.loc[ok, "quality"]
                rec["quality ok: success/failure median"] = (
                    f"{q[g.loc[ok, 'success']].median():.2f} / {q[~g.loc[ok, 'success']].median():.2f}")
            recs.append(rec)
    return pd.DataFrame(recs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--swap", type=float, default=4.0, help="texture swap sigma, px at size 800 (0: off)")
    ap.add_argument("--stage", choices=("members", "simulate", "validate", "all"), default="all")
    ap.add_argument("--pre", nargs="*", default=[], help="preprocess parameters, e.g. flip_test=true")
    ap.add_argument("--candidates", nargs="*", default=[], help="compositions to run for real (validate)")
    ap.add_argument("--set", nargs="*", default=[], dest="settings",
                    help="parameters of the validated compositions, e.g. 'sift|iterative.accept=1.5'")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    pre = {"preprocess": dict(kv.split("=", 1) for kv in args.pre)} if args.pre else {}
    tables = make_sets(args.out, args.n, args.size, args.swap)
    for name, table in tables.items():
        print(f"{name}: {len(pd.read_csv(table))} pairs ({table})")
    if args.stage in ("members", "all"):
        run_methods(tables, args.out, list(MEMBERS), pre, "members")
    frames = load(args.out, "members", requality=args.stage in ("simulate", "all"))
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    if args.stage in ("simulate", "all"):
        print(member_table(frames).to_string(index=False))
        singles = [m for m in MEMBERS if m != "preprocessed"]
        orders = [o + tail for k in range(1, 5) for o in itertools.permutations(singles, k)
                  for tail in ((), ("preprocessed",))]
        recs = [summarise(frames, o, a, r) for o in orders for a in ACCEPT for r in REFUSE if r <= a or a == 0]
        table = pd.DataFrame(recs)
        aligned = [s for s in frames if s != "unrelated"]
        table["success"] = sum(table[f"{s} success"] for s in aligned)
        # accuracy: median rTRE within 10 % of the best single member's on every set
        best = {s: min(summarise(frames, (m,), 0.0, 0.0)[f"{s} rTRE"] for m in singles) for s in aligned}
        table["accurate"] = np.logical_and.reduce([table[f"{s} rTRE"] <= 1.1 * best[s] for s in aligned])
        sift_time = summarise(frames, ("sift",), 0.0, 0.0)["median time"]
        table["time / sift"] = table["median time"] / sift_time
        table = table.sort_values(["accurate", "success", "unrelated accepted", "median time"],
                                  ascending=[False, False, True, True])
        table.to_csv(args.out / "simulation.csv", index=False)
        print(f"\nbest single-member median rTRE: {best}; sift's median time {sift_time:.3f} s")
        print(f"\n{len(orders)} orders x thresholds = {len(table)} simulated fallbacks; the best {args.top}:")
        print(table.head(args.top).to_string(index=False))
        named = ["sift|iterative|preprocessed", "sift|learned>iterative|preprocessed",
                 "sift|iterative|learned>iterative|preprocessed", "sift|iterative|learned>iterative",
                 "surf|sift|iterative|learned>iterative|preprocessed", *args.candidates]
        print("\nnamed orders (all thresholds):")
        print(table[table["order"].isin(named)].to_string(index=False))
    if args.stage in ("validate", "all") and args.candidates:
        # sift runs again beside the candidates: their times compare within one run
        run_methods(tables, args.out, ["sift", *args.candidates], {**pre, **parse_overrides(args.settings)}, "validate")
        valid = load(args.out, "validate")
        print(member_table(valid).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
