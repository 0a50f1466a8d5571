"""Write evaluation variants of a real ANHIR pair table to a folder OUTSIDE the repository.

Each variant moves every source image (and its landmarks) by a random affine transform the methods have
never seen: any rotation, isotropic scale in [0.85, 1.2], shear up to 0.08, and a gamma change of the source
(0.8-1.25); ``--mirror`` also mirrors the source (left-right or top-bottom, at random) before moving it, as a
slide scanned face down. Targets are untouched, so diagonals and target landmarks stay the ANHIR ones. The
source is drawn on a canvas that holds all of it, filled with its own background colour.

Never commit the output (it is derived from the real data); never train or tune on it. Usage::

    python studies/make_variants.py ../shared/data/anhir-mini/dataset.csv /tmp/variants/moved --copies 3
    python studies/make_variants.py ../shared/data/anhir-mini/dataset.csv /tmp/variants/mirrored --mirror

then ``python -m bench run --dataset /tmp/variants/moved/dataset.csv ...``.
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

from bench import geometry
from bench.pairs import TABLE_HEADER, load_table, read_landmarks, write_landmarks


def random_move(rng: np.random.Generator, shape: tuple[int, int], mirror: bool) -> tuple[np.ndarray, str]:
    """A 3x3 matrix (source pixels -> new source pixels, before the canvas shift) and its description."""
    h, w = shape
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    angle = float(rng.uniform(-180, 180))
    scale = float(rng.uniform(0.85, 1.2))
    shear = float(rng.uniform(-0.08, 0.08))
    lin = np.array([[1.0, shear], [0.0, 1.0]]) @ (scale * geometry.rotation(angle)[:2, :2])
    desc = f"rot {angle:.1f} scale {scale:.3f} shear {shear:.3f}"
    if mirror:
        axis = "lr" if rng.random() < 0.5 else "tb"
        lin = lin @ (np.diag([-1.0, 1.0]) if axis == "lr" else np.diag([1.0, -1.0]))
        desc += f" mirror {axis}"
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c - lin @ c
    return m, desc


def move_image(image: np.ndarray, m: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` by ``m`` onto a canvas holding all of it; returns (image, full matrix incl. shift)."""
    h, w = image.shape[:2]
    corners = geometry.apply(m, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    lo, hi = np.floor(corners.min(0)) - 2, np.ceil(corners.max(0)) + 2
    full = geometry.translation(-lo[0], -lo[1]) @ m
    size = (int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = tuple(float(v) for v in np.median(border, axis=0))
    out = cv2.warpAffine(image, full[:2], size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=fill)
    lut = (255.0 * (np.arange(256) / 255.0) ** gamma).clip(0, 255).astype(np.uint8)
    return cv2.LUT(out, lut), full


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--copies", type=int, default=1, help="variants per pair (default 1)")
    ap.add_argument("--mirror", action="store_true", help="mirror every source before moving it")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    require_outside_repository(ap, args.out)
    rng = np.random.default_rng(args.seed + (1000 if args.mirror else 0))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, moves = [], {}
    for pair in load_table(args.table):
        src = cv2.imread(str(pair.source_image), cv2.IMREAD_COLOR)
        lnd = read_landmarks(pair.source_landmarks)
        for k in range(args.copies):
            pid = f"{pair.pair_id}-{k}" if args.copies > 1 else pair.pair_id
            m, desc = random_move(rng, src.shape[:2], args.mirror)
            gamma = float(math.exp(rng.uniform(math.log(0.8), math.log(1.25))))
            img, full = move_image(src, m, gamma)
            folder = args.out / pair.tissue / pid
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "source.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            write_landmarks(folder / "source.csv", geometry.apply(full, lnd))
            rows.append([pid, str(folder / "source.jpg"), str(folder / "source.csv"), str(pair.target_image),
                         str(pair.target_landmarks), pair.diagonal or "",
                         "" if pair.target_size is None else f"({pair.target_size[0]}, {pair.target_size[1]})", "training"])
            moves[pid] = {"matrix": full.tolist(), "move": f"{desc} gamma {gamma:.3f}", "from": pair.pair_id}
    with (args.out / "dataset.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TABLE_HEADER)
        w.writerows(rows)
    (args.out / "moves.json").write_text(json.dumps(moves, indent=1))
    print(f"{len(rows)} pairs -> {args.out / 'dataset.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
