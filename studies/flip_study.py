"""The flip test of the shared preprocessing studied on generated pairs (docs/preprocessing.md, "Flip test").

Writes generated sets in the ANHIR layout under OUT and measures, for every pair, both mirror branches of
the rotation search (``bench.preprocess.rotation_search`` with ``flip_test=True``): each branch's best
candidate, its NCC, the stage's rTRE if that branch were chosen, and candidate decision measures. Only
generated data: the flip test's thresholds were chosen from these numbers, never from real pairs.

Sets (``N`` base pairs each, generator ``bench.datasets.synthetic``, stains differ within every pair):

* ``whole/plain``: whole sections on glass; the source moved by any rotation, scale 0.85-1.2, shear <= 0.08
  (the generator's own move), then a gamma change (0.8-1.25);
* ``whole/mirrored``: the same sources mirrored (left-right or top-bottom at random) after the move;
* ``fov/plain``: fields of view (each image cropped to its own window of 60-85 % of each side, so tissue
  fills the frame and the frames do not correspond, like the lung pairs of ANHIR), the source then moved by
  any rotation, scale 0.85-1.2, shear <= 0.08, gamma 0.8-1.25, on a canvas of its border colour;
* ``fov/mirrored``: the same, the source mirrored before it is moved.

``make ... --gray`` writes both images of every pair as grayscale (3 equal channels: a scanner or stain
without colour, like the 512 px grayscale scans of issue 20); ``--size S`` the generator's image size.

usage (the documented sets: A = ``make OUT 32 31``, B = ``make OUT 48 32``; issue 20's close-call sets:
C = ``make OUT 24 41 --size 512``, C gray = ``make OUT 24 41 --size 512 --gray``)::

    python studies/flip_study.py make OUT [N=32] [SEED=31] [--gray] [--size 800]   # write the four tables
    python studies/flip_study.py measure OUT/{whole,fov}/{plain,mirrored}/dataset.csv > rows.jsonl
    python studies/flip_study.py analyse rows.jsonl            # separations, decision rules, outcomes
    python studies/flip_study.py outcome RUN [RUN ...]          # the harness's choice, from run folders

``outcome`` reads ``bench run`` folders made on (some of) these sets (any methods; a pair is mirrored when its
source image lies in a ``mirrored`` folder) and counts, per method, the unmirrored pairs lost to a flip (the stage's primary
state mirrored and the row's chosen state too: the row's ``orientation`` diagnostics, else the primary) and
the mirrored pairs found (chosen state mirrored), and how many rows were close calls.

``measure`` prints one JSON line per pair: for each mirror state (``flipped``, ``unflipped``) its NCC,
angle, the stage's rTRE if that state were chosen and the texture MI at four (size, sigma) settings, plus
the stage's own decision with the default parameters. ``analyse`` prints, per measure, how the two states'
difference separates mirrored from unmirrored pairs, the errors of a grid of decision rules, and per set
how often the right state aligns and the decision picks it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.synthetic import GeneratorConfig, generate_pair
from common import gamma_lut, move_on_canvas, save_pair, write_table

from bench import geometry
from bench import preprocess as pre
from bench.pairs import load_table, read_landmarks
from bench.preprocess.images import load_both

CONFIG = GeneratorConfig(size=800, scale_range=(0.85, 1.2), max_shear=0.08, n_landmarks=30)


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.LUT(img, gamma_lut(float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))))


def _mirror(img: np.ndarray, left_right: bool) -> tuple[np.ndarray, np.ndarray]:
    """``img`` mirrored left-right or top-bottom, and the (3, 3) map of its pixels."""
    h, w = img.shape[:2]
    if left_right:
        return img[:, ::-1].copy(), np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])
    return img[::-1].copy(), np.array([[1.0, 0, 0], [0, -1, h - 1], [0, 0, 1]])


def _gray(img: np.ndarray) -> np.ndarray:
    """``img`` (RGB) as grayscale in three equal channels."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def make_sets(out: Path, n: int, seed: int, size: int = 800, gray: bool = False) -> list[Path]:
    """Write ``whole/{plain,mirrored}`` and ``fov/{plain,mirrored}`` (see the module docstring); ``size``: the
    generator's image size (800 for the documented sets); ``gray``: both images grayscale (after the move)."""
    look = _gray if gray else (lambda img: img)
    folders = {name: out / name for name in ("whole/plain", "whole/mirrored", "fov/plain", "fov/mirrored")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {name: [] for name in folders}
    for k in range(n):
        for kind in ("whole", "fov"):
            pair_seed = int(np.random.SeedSequence([seed, k, kind == "fov"]).generate_state(1)[0])
            config = dataclasses.replace(CONFIG, size=size) if kind == "whole" else GeneratorConfig(
                size=size, n_landmarks=40, max_rotation_deg=0.0, scale_range=(1.0, 1.0), max_shear=0.0)
            pair = generate_pair(pair_seed, config=config)
            rng = np.random.default_rng([seed, k, 7 if kind == "fov" else 3])
            src, tgt = pair.source_rgb, pair.target_rgb
            ls, lt = pair.source_landmarks, pair.target_landmarks
            if kind == "fov":  # each image cut to its own window; the source then moved (mirrored first)
                cut = []
                for img, pts in ((src, ls), (tgt, lt)):
                    h, w = img.shape[:2]
                    ch, cw = int(h * rng.uniform(0.6, 0.85)), int(w * rng.uniform(0.6, 0.85))
                    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                    cut.append((img[y0:y0 + ch, x0:x0 + cw], pts - [x0, y0]))
                (src, ls), (tgt, lt) = cut
                left_right = bool(rng.random() < 0.5)
                state = rng.bit_generator.state
                for mirrored in (False, True):
                    rng.bit_generator.state = state  # the same move for both versions
                    s, m = (_mirror(src, left_right) if mirrored else (src, np.eye(3)))
                    moved, a = move_on_canvas(rng, s, scale_range=(0.85, 1.2))
                    moved = _gamma(moved, rng)
                    name = f"fov/{'mirrored' if mirrored else 'plain'}"
                    rows[name].append(save_pair(folders[name], k, (look(moved), look(tgt)),
                                                (geometry.apply(a @ m, ls), lt)))
            else:
                left_right = bool(rng.random() < 0.5)
                state = rng.bit_generator.state
                for mirrored in (False, True):
                    rng.bit_generator.state = state
                    s, m = (_mirror(src, left_right) if mirrored else (src, np.eye(3)))
                    s = _gamma(s, rng)
                    name = f"whole/{'mirrored' if mirrored else 'plain'}"
                    rows[name].append(save_pair(folders[name], k, (look(s), look(tgt)), (geometry.apply(m, ls), lt)))
    return [write_table(folders[name], rows[name]) for name in folders]


# ---------------------------------------------------------------------------------------------
# measuring both branches


def _rtre(matrix: np.ndarray, pair) -> float:
    s, t = read_landmarks(pair.source_landmarks), read_landmarks(pair.target_landmarks)
    n = min(len(s), len(t))
    return float(np.median(np.linalg.norm(geometry.apply(matrix, s[:n]) - t[:n], axis=1)) / pair.diagonal)


def branch_matrix(branch: dict, c_src, c_tgt, flipped: bool) -> np.ndarray:
    """The working-frame matrix of one branch as recorded in ``info["branches"]``."""
    return geometry.translation(*branch["shift"]) @ pre.candidate_matrices(branch["angle_deg"], flipped,
                                                                           c_src, c_tgt)[0]


def measure_pair(pair, params: pre.PreprocessParams) -> dict:
    """Both branches of one pair: NCC, rTRE if chosen, and the decision measures of ``pre``."""
    a, b, _ = load_both(Path(pair.source_image), Path(pair.target_image), params, True)
    hint = None
    if params.scale_hint and not (a.info["fallback"] or b.info["fallback"]):
        areas = [x.view.mask.size * x.info["coverage"] for x in (a, b)]
        hint = float(np.clip(np.sqrt(areas[1] / max(areas[0], 1.0)), 0.8, 1.25))
    c_src, c_tgt = a.info["centre"], b.info["centre"]
    t0 = time.perf_counter()
    _, info = pre.rotation_search(a.view.image, b.view.image, c_src, c_tgt, params, scale_hint=hint,
                                  source_mask=a.view.mask, target_mask=b.view.mask)
    row = {"pair": pair.pair_id, "search_s": time.perf_counter() - t0,
           "coverage": [a.info["coverage"], b.info["coverage"]], "decided_flipped": info["flipped"],
           "decision": info["flip_decision"]}
    for name, br in info["branches"].items():
        m = branch_matrix(br, c_src, c_tgt, name == "flipped")
        orig = geometry.to_original(np.eye(3), source_scale=a.loaded.scale, target_scale=b.loaded.scale,
                                    source_pre=m)
        mi = {f"mi{size}_{sigma:g}": float(pre.texture_mi(a.view.image, b.view.image, m[None], size, sigma,
                                                             source_mask=a.view.mask,
                                                             target_mask=b.view.mask)[0])
              for size, sigma in ((256, 2.0), (256, 1.0), (128, 1.0), (384, 2.0))}
        row[name] = {"ncc": br["ncc"], "angle": br["angle_deg"], "rtre": _rtre(orig, pair), **mi}
    return row


def measure(tables: list[str], params: pre.PreprocessParams) -> None:
    for table in tables:
        for pair in load_table(table):
            row = measure_pair(pair, params)
            row["set"] = str(Path(table).parent)
            row["mirrored"] = "mirrored" in row["set"].rsplit("/", 1)[-1]
            print(json.dumps(row), flush=True)


def analyse(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    keys = [k for k, v in rows[0]["flipped"].items() if isinstance(v, float) and k not in ("angle", "rtre")]
    print(f"{len(rows)} pairs ({sum(r['mirrored'] for r in rows)} mirrored)")
    for key in keys:
        d_m = np.array([r["flipped"][key] - r["unflipped"][key] for r in rows if r["mirrored"]])
        d_u = np.array([r["flipped"][key] - r["unflipped"][key] for r in rows if not r["mirrored"]])
        print(f"{key:16s} flipped-unflipped: mirrored min {d_m.min():+.3f} p10 {np.quantile(d_m, 0.1):+.3f} "
              f"median {np.median(d_m):+.3f} | unmirrored max {d_u.max():+.3f} p90 {np.quantile(d_u, 0.9):+.3f} "
              f"median {np.median(d_u):+.3f} | errors at margin 0: {int((d_m <= 0).sum())} + {int((d_u > 0).sum())}")
    print("decision rules: flipped iff dNCC > hi or (dNCC > lo and dMI > mi) [d = flipped - unflipped, MI at 256 px,"
          " sigma 2]; errors: mirrored kept / unmirrored flipped (in brackets: of those, pairs whose right branch"
          " aligns, rTRE <= 0.035); share of pairs that need the MI")
    d_ncc = np.array([r["flipped"]["ncc"] - r["unflipped"]["ncc"] for r in rows])
    d_mi = np.array([r["flipped"]["mi256_2"] - r["unflipped"]["mi256_2"] for r in rows])
    mir = np.array([r["mirrored"] for r in rows])
    aligned = np.array([r["flipped" if r["mirrored"] else "unflipped"]["rtre"] <= 0.035 for r in rows])
    for lo, hi, mi in [(1.0, 0.1, 0), (1.0, 0.05, 0), (1.0, 0.0, 0), (0.0, 0.1, 0.0), (0.0, 1.0, 0.0),
                       (-0.03, 0.1, 0.0), (-0.05, 0.1, 0.0), (-0.1, 0.1, 0.0), (-0.05, 0.1, 0.005), (-0.05, 0.15, 0.005),
                       (-0.1, 1.0, 0.0), (-0.1, 1.0, 0.005), (-1.0, 1.0, 0.0)]:
        flip = (d_ncc > hi) | ((d_ncc > lo) & (d_mi > mi))
        miss, false = mir & ~flip, ~mir & flip
        ambiguous = (d_ncc > lo) & (d_ncc <= hi)
        print(f"  lo {lo:+.2f} hi {hi:.2f} mi {mi:.3f}: {miss.sum()} [{(miss & aligned).sum()}] / "
              f"{false.sum()} [{(false & aligned).sum()}]; MI needed in {ambiguous.mean():.0%}")
    for name in ("plain", "mirrored"):
        sub = [r for r in rows if r["set"].endswith(name)]
        for s in sorted({r["set"] for r in sub}):
            rs = [r for r in sub if r["set"] == s]
            right = "flipped" if name == "mirrored" else "unflipped"
            ok = sum(r[right]["rtre"] <= 0.035 for r in rs)
            dec = sum(r["decided_flipped"] == (name == "mirrored") for r in rs)
            print(f"{s}: {len(rs)} pairs, right branch aligns {ok}, decided right {dec}, "
                  f"decided right and aligned {sum((r['decided_flipped'] == (name == 'mirrored')) and r[right]['rtre'] <= 0.035 for r in rs)}")


def outcome(runs: list[str]) -> None:
    """Per method: unmirrored pairs lost to a flip, mirrored pairs found, close calls (see the docstring)."""
    import pandas as pd

    counts: dict[str, dict[str, int]] = {}
    for run in runs:
        df = pd.read_csv(Path(run) / "results.csv", dtype={"pair_id": str}, keep_default_na=False)
        for _, row in df.iterrows():
            diag = json.loads(row["diagnostics"] or "{}")
            pre_diag = diag.get("preprocess", {})
            if "flipped" not in pre_diag:
                continue  # no full stage (identity) or no preprocessing at all (a failed pair)
            mirrored = Path(row["source_image"]).parent.name == "mirrored"
            o = diag.get("orientation")
            chosen = (o["chosen"] == "mirrored") if o else bool(pre_diag["flipped"])
            c = counts.setdefault(row["method"], dict.fromkeys(
                ("unmirrored", "primary wrong", "lost to a flip", "mirrored", "primary right", "found",
                 "close calls", "success unmirrored", "success mirrored"), 0))
            c["close calls"] += o is not None
            if mirrored:
                c["mirrored"] += 1
                c["primary right"] += bool(pre_diag["flipped"])
                c["found"] += chosen
                c["success mirrored"] += row["success"] == "True" or row["success"] is True
            else:
                c["unmirrored"] += 1
                c["primary wrong"] += bool(pre_diag["flipped"])
                c["lost to a flip"] += chosen
                c["success unmirrored"] += row["success"] == "True" or row["success"] is True
    for method, c in sorted(counts.items()):
        print(f"{method}: " + ", ".join(f"{k} {v}" for k, v in c.items()))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("make", "measure", "analyse", "outcome"):
        print(__doc__)
        return 2
    if argv[0] == "make":
        gray = "--gray" in argv
        size = int(argv[argv.index("--size") + 1]) if "--size" in argv else 800
        pos = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--size")]
        n = int(pos[2]) if len(pos) > 2 else 32
        seed = int(pos[3]) if len(pos) > 3 else 31
        for t in make_sets(Path(pos[1]), n, seed, size=size, gray=gray):
            print(t)
    elif argv[0] == "outcome":
        outcome(argv[1:])
    elif argv[0] == "measure":
        measure(argv[1:], pre.PreprocessParams(flip_test=True))
    else:
        analyse(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
