"""Generated pairs whose tissue is cut by frames that differ between the two images (docs/learned.md).

The learned method's weights and its field-of-view handling were chosen on these sets, never on real data.
Writes three ANHIR tables under OUT:

* ``plain/``: ``N`` generated pairs (``bench.datasets.synthetic.write_dataset``, seed ``SEED``);
* ``cut/``: the same pairs, each image cropped to its own random window (60-85 % of each side), so tissue
  fills the frame and the two frames do not correspond, as with many real sections;
* ``cut-moved/``: ``cut`` with each source then moved by a random affine transform (any rotation, scale
  +-20 %, shear <= 0.08) onto a canvas filled with its median border colour.

Landmarks that fall outside either cropped image are dropped (ANHIR coordinates are non-negative).

usage: python studies/frame_cut_pairs.py OUT [N=48] [SEED=777]
then:  python -m bench run --dataset OUT/cut/dataset.csv --methods preprocessed,learned
"""

import sys
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.synthetic import write_dataset
from common import move_on_canvas, save_pair, write_table

from bench import geometry
from bench.pairs import load_table, read_landmarks


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
        rows.append(save_pair(out, k, images, points, bgr=True))
    return write_table(out, rows)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
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
