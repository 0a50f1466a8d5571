"""Generated pairs whose tissue is cut by frames that differ between the two images (docs/learned.md).

The learned method's weights and its field-of-view handling were chosen on these sets, never on real data.
Writes three ANHIR tables under OUT:

* ``plain/``: ``N`` generated pairs (``bench.datasets.synthetic.write_dataset``, seed ``SEED``);
* ``cut/``: the same pairs, each image cropped to its own random window (60-85 % of each side), so tissue
  fills the frame and the two frames do not correspond, as with many real sections;
* ``cut-moved/``: ``cut`` with each source then moved by a random affine transform (any rotation, scale
  +-20 %, shear <= 0.08) onto a canvas filled with its median border colour.

Landmarks that fall outside either cropped image are dropped (ANHIR coordinates are non-negative).

usage: python benchmarks/frame_cut_pairs.py OUT [N=48] [SEED=777]
then:  python -m bench run --dataset OUT/cut/dataset.csv --methods preprocessed,learned
"""

import csv
import sys
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.synthetic import TABLE_HEADER, write_dataset

from bench import geometry
from bench.pairs import load_table, read_landmarks, write_landmarks


def move_on_canvas(rng: np.random.Generator, img: np.ndarray,
                   scale_range: tuple[float, float] = (0.8, 1.2)) -> tuple[np.ndarray, np.ndarray]:
    """``img`` moved by a random affine onto a canvas holding all of it, filled with its border colour
    (also used by ``flip_study.py``)."""
    h, w = img.shape[:2]
    a = geometry.random_affine(rng, ((w - 1) / 2, (h - 1) / 2), max_rotation_deg=180, scale_range=scale_range,
                               max_shear=0.08)
    corners = geometry.apply(a, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    lo, hi = corners.min(0), corners.max(0)
    a = geometry.translation(-lo[0] + 20, -lo[1] + 20) @ a
    size = (int(hi[0] - lo[0] + 41), int(hi[1] - lo[1] + 41))
    border = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    out = cv2.warpAffine(img, a[:2], size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=tuple(int(v) for v in border))
    return out, a


def cut_table(table: Path, out: Path, move: bool) -> Path:
    """Write the cropped (and optionally moved) version of ``table`` into ``out``; return its table."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, pair in enumerate(load_table(table)):
        rng = np.random.default_rng([4242, k])
        images, points = [], []
        for role, image, marks in (("source", pair.source_image, pair.source_landmarks),
                                   ("target", pair.target_image, pair.target_landmarks)):
            img = cv2.imread(str(image), cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 0.85)), int(w * rng.uniform(0.6, 0.85))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img, m = img[y0:y0 + ch, x0:x0 + cw], geometry.translation(-x0, -y0)
            if move and role == "source":
                img, a = move_on_canvas(rng, img)
                m = a @ m
            images.append(img)
            points.append(geometry.apply(m, read_landmarks(marks)))
        n = min(len(p) for p in points)
        keep = np.ones(n, bool)
        for p, img in zip(points, images, strict=True):
            h, w = img.shape[:2]
            keep &= (p[:n, 0] >= 0) & (p[:n, 1] >= 0) & (p[:n, 0] <= w - 1) & (p[:n, 1] <= h - 1)
        row = [k]
        for role, img, p in zip(("source", "target"), images, points, strict=True):
            cv2.imwrite(str(out / f"{k:02d}_{role}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            write_landmarks(out / f"{k:02d}_{role}.csv", p[:n][keep])
            row += [f"{k:02d}_{role}.jpg", f"{k:02d}_{role}.csv"]
        h, w = images[1].shape[:2]
        rows.append(row + [f"{np.hypot(h, w):.2f}", f"({h}, {w})", "training"])
    with (out / "dataset.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_HEADER)
        writer.writerows(rows)
    return out / "dataset.csv"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    n = int(argv[1]) if len(argv) > 1 else 48
    seed = int(argv[2]) if len(argv) > 2 else 777
    plain = write_dataset(out / "plain", n, seed)
    for name, move in (("cut", False), ("cut-moved", True)):
        print(cut_table(plain, out / name, move))
    print(plain)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
