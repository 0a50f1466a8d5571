"""The runner's cost and its parallel speed-up, old against new, measured interleaved in one session.

Builds two source trees outside the repository (``git archive``): NEW is ``--new`` (default HEAD); OLD is the
same tree with only the runner's files taken from ``--old`` (default f94ab8b, the last commit before the
supervised runner), so both run the very same methods, preprocessing and scoring and only the harness
differs. Then runs, alternating OLD and NEW, ``python -m bench run --methods all --no-cache`` on the embedded
sample with ``--workers 1`` and ``--workers 2``, ``--rounds`` times each, and prints the wall times, the
ratios new/old (the supervision's cost), the 2-vs-1 speed-ups, and whether the rows of 1 and 2 workers are
identical (status, matrix, rTRE, for every (pair, method)).

    python benchmarks/runner_speed.py --rounds 2 --work /tmp/runner-speed

Run it on an otherwise idle machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the harness files the supervised runner replaced or added (the old tree gets the old ones, and none of the new)
OLD_FILES = ["bench/runner.py", "bench/store.py", "bench/distributed.py", "bench/cli.py", "bench/timing.py",
             "bench/schema.py"]
NEW_ONLY = ["bench/plan.py", "bench/work.py", "bench/supervise.py", "bench/executors.py", "bench/provenance.py"]


def _archive(ref: str, dest: Path) -> None:
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    for pkg in ("methods", "datasets"):  # installed as bench.methods / bench.datasets
        link = dest / "bench" / pkg
        if not link.exists():
            link.symlink_to(Path("..") / pkg)


def build(work: Path, old: str, new: str) -> dict[str, Path]:
    trees = {"old": work / "old-tree", "new": work / "new-tree"}
    for t in trees.values():
        shutil.rmtree(t, ignore_errors=True)
    _archive(new, trees["new"])
    _archive(new, trees["old"])
    for f in NEW_ONLY:
        (trees["old"] / f).unlink(missing_ok=True)
    for f in OLD_FILES:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{old}:{f}"], check=True, capture_output=True).stdout
        (trees["old"] / f).write_bytes(text)
    return trees


def run_once(tree: Path, out: Path, workers: int, limit: int | None) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of the whole process tree (user + system, every process waited for)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "bench", "run", "--methods", "all", "--no-cache", "--out", str(out),
           "--workers", str(workers), *(["--limit", str(limit)] if limit else [])]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def rows(out: Path) -> dict[tuple[str, str], tuple[str, str, str]]:
    with (out / "results.csv").open(newline="") as fh:
        return {(r["pair_id"], r["method"]): (r["status"], r["matrix"], r["rtre_median"]) for r in csv.DictReader(fh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="f94ab8b")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/runner-speed"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--limit", type=int, help="only the first N pairs (a quick look; the check uses all 24)")
    ap.add_argument("--trees", nargs="+", default=["old", "new"], choices=["old", "new"],
                    help="which runners to time (new alone: the speed-up of today's runner, twice as fast)")
    args = ap.parse_args()
    trees = build(args.work, args.old, args.new)
    times: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        # alternate the order of the workers too, so a drift of the machine's speed does not favour one
        for workers in (args.workers if r % 2 == 0 else args.workers[::-1]):
            order = args.trees if r % 2 == 0 else args.trees[::-1]
            for name in order:
                out = args.work / f"{name}-w{workers}"
                t, c = run_once(trees[name], out, workers, args.limit)
                times.setdefault((name, workers), []).append(t)
                cpu.setdefault((name, workers), []).append(c)
                ref = json.loads((out / "run.json").read_text()).get("reference_time_s", float("nan"))
                print(f"round {r + 1}: {name} --workers {workers}: {t:.1f} s wall, {c:.1f} s CPU "
                      f"(reference workload {ref:.3f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    for workers in args.workers:
        if len(args.trees) < 2:
            print(f"--workers {workers}: {args.trees[0]} {med[args.trees[0], workers]:.1f} s wall (median), "
                  f"{mcpu[args.trees[0], workers]:.1f} s CPU")
            continue
        print(f"--workers {workers}: old {med['old', workers]:.1f} s, new {med['new', workers]:.1f} s, "
              f"new/old {med['new', workers] / med['old', workers]:.3f} (CPU: old {mcpu['old', workers]:.1f} s, "
              f"new {mcpu['new', workers]:.1f} s, new/old {mcpu['new', workers] / mcpu['old', workers]:.3f})")
    if set(args.workers) != {1, 2}:
        return
    for name in args.trees:
        ratios = [a / b for a, b in zip(times[name, 1], times[name, 2], strict=True)]
        print(f"{name}: per-round speed-ups {', '.join(f'{x:.2f}x' for x in ratios)}")
        same = rows(args.work / f"{name}-w1") == rows(args.work / f"{name}-w2")
        print(f"{name}: 2 workers vs 1: {med[name, 1] / med[name, 2]:.2f}x, identical rows: {same}")


if __name__ == "__main__":
    main()
