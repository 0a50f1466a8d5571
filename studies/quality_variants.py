"""Variants of a real pair table that differ from it the way unseen scans do, written OUTSIDE the repository,
for checking the quality score (docs/quality.md) on data it was not designed on.

Every source is moved by a random affine transform as in ``make_variants.py`` (any rotation, scale 0.85-1.2,
shear up to 0.08, a gamma change); on top of that, for both images of a pair:

- ``--gray``: a 3-channel grayscale scan (the luminance in every channel);
- ``--longer-side N``: both images resized by one factor per pair, so that the target's longer side is ``N``
  px (a coarser scan, as ANHIR's 512 px sets); landmarks, size and diagonal scaled with them;
- ``--jitter``: another scanner and staining lab: each image, on its own draw, gets its stain intensities
  changed in optical density (each channel x exp(N(0, 0.25)), channels mixed by I + N(0, 0.08)), a gamma
  change (0.7-1.4), a contrast change about the mean (0.75-1.25) and a little sensor noise (sigma 0-4 grey
  levels).

The same ``--seed`` gives the same moves, whatever the appearance options. Never commit the output (it is
derived from the real data); never tune anything on it. Usage::

    python studies/quality_variants.py ../shared/data/anhir-mini/dataset.csv /tmp/qv/gray512 --copies 3 \
        --gray --longer-side 512
    python studies/quality_variants.py ../shared/data/anhir-mini/dataset.csv /tmp/qv/jitter --copies 3 --jitter

then ``python -m bench run --dataset /tmp/qv/gray512/dataset.csv ...`` and ``python studies/quality_auc.py runs``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
from common import require_outside_repository
from make_variants import move_image, random_move

from bench import geometry
from bench.pairs import TABLE_HEADER, load_table, read_landmarks, write_landmarks


def to_gray(image: np.ndarray) -> np.ndarray:
    """A BGR uint8 image as a 3-channel grayscale one (its luminance in every channel)."""
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def jitter(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Another lab's stain and another scanner's response (see the module doc); returns (image, description)."""
    od = -np.log((image.astype(np.float64) + 1.0) / 256.0)
    weights = np.exp(rng.normal(0.0, 0.25, 3))
    mix = np.eye(3) + rng.normal(0.0, 0.08, (3, 3))
    od = (od * weights) @ mix.T
    out = 256.0 * np.exp(-np.clip(od, 0.0, None)) - 1.0
    gamma = float(math.exp(rng.uniform(math.log(0.7), math.log(1.4))))
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    contrast = float(rng.uniform(0.75, 1.25))
    out = out.mean() + contrast * (out - out.mean())
    noise = float(rng.uniform(0.0, 4.0))
    out = out + rng.normal(0.0, noise, out.shape)
    desc = f"stain x{np.round(weights, 2).tolist()} gamma {gamma:.2f} contrast {contrast:.2f} noise {noise:.1f}"
    return np.clip(out, 0, 255).astype(np.uint8), desc


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` resized by ``factor`` (area interpolation when shrinking)."""
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def scaled_points(points: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """Landmarks of ``image`` in the pixels of ``resize(image, factor)`` (pixel centres kept)."""
    h, w = image.shape[:2]
    fx = max(1, round(w * factor)) / w
    fy = max(1, round(h * factor)) / h
    return (points + 0.5) * np.array([fx, fy]) - 0.5


def build(table: Path, out: Path, *, copies: int = 1, seed: int = 2026, gray: bool = False,
          longer_side: int = 0, appearance_jitter: bool = False) -> Path:
    """Write the variant set (see the module doc) under ``out``; return its ``dataset.csv``."""
    move_rng = np.random.default_rng(seed)
    look_rng = np.random.default_rng(seed + 7)
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], {}
    for pair in load_table(table):
        src0 = cv2.imread(str(pair.source_image), cv2.IMREAD_COLOR)
        tgt0 = cv2.imread(str(pair.target_image), cv2.IMREAD_COLOR)
        factor = min(1.0, longer_side / max(tgt0.shape[:2])) if longer_side else 1.0
        src_pts = scaled_points(read_landmarks(pair.source_landmarks), src0, factor)
        tgt_pts = scaled_points(read_landmarks(pair.target_landmarks), tgt0, factor)
        for k in range(copies):
            pid = f"{pair.pair_id}-{k}" if copies > 1 else str(pair.pair_id)
            src, tgt = resize(src0, factor), resize(tgt0, factor)
            note = []
            if appearance_jitter:
                src, d1 = jitter(src, look_rng)
                tgt, d2 = jitter(tgt, look_rng)
                note += [f"source {d1}", f"target {d2}"]
            if gray:
                src, tgt = to_gray(src), to_gray(tgt)
            m, desc = random_move(move_rng, src.shape[:2], False)
            gamma = float(math.exp(move_rng.uniform(math.log(0.8), math.log(1.25))))
            src, full = move_image(src, m, gamma)
            folder = out / pair.tissue / pid
            folder.mkdir(parents=True, exist_ok=True)
            for name, img in (("source.jpg", src), ("target.jpg", tgt)):
                cv2.imwrite(str(folder / name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            write_landmarks(folder / "source.csv", geometry.apply(full, src_pts))
            write_landmarks(folder / "target.csv", tgt_pts)
            h, w = tgt.shape[:2]
            rows.append([pid, str(folder / "source.jpg"), str(folder / "source.csv"), str(folder / "target.jpg"),
                         str(folder / "target.csv"), f"{math.hypot(h, w):.2f}", f"({h}, {w})", "training"])
            notes[pid] = {"from": pair.pair_id, "factor": factor, "move": f"{desc} gamma {gamma:.3f}",
                          "appearance": note, "gray": gray}
    with (out / "dataset.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_HEADER)
        writer.writerows(rows)
    (out / "variants.json").write_text(json.dumps(notes, indent=1))
    return out / "dataset.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--copies", type=int, default=1, help="variants per pair (default 1)")
    ap.add_argument("--gray", action="store_true", help="3-channel grayscale images")
    ap.add_argument("--longer-side", type=int, default=0, help="resize so the target's longer side is this")
    ap.add_argument("--jitter", action="store_true", help="stain, gamma, contrast and noise changes")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    require_outside_repository(ap, args.out)
    path = build(args.table, args.out, copies=args.copies, seed=args.seed, gray=args.gray,
                 longer_side=args.longer_side, appearance_jitter=args.jitter)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
