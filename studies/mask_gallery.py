"""Render the shared preprocessing's tissue masks of every image of an ANHIR table into one PNG, to look at.

usage: python studies/mask_gallery.py TABLE.csv OUT.png [--side 230]

Each image is loaded at a small size through ``bench.imageio.load_image``, masked with
``bench.preprocess.tissue_mask`` (default parameters), and drawn with the mask outline in green, the masked-out
area greyed and the tissue coverage in the caption. Write the result outside the repository when the table is
real data (``../shared/data`` must not be copied into the project, thumbnails included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from bench.imageio import load_image
from bench.pairs import load_table
from bench.preprocess import PreprocessParams, tissue_mask


def panel(path: Path, side: int) -> np.ndarray:
    """One thumbnail (BGR uint8, ``side`` x ``side``) with the mask drawn on it."""
    img = load_image(path, (side * 2, side * 2)).rgb
    mask, info = tissue_mask(img, PreprocessParams())
    f = side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    out = np.where(m[..., None] > 0, small, (small * 0.35 + 90).astype(np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    bgr = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
    cv2.drawContours(bgr, contours, -1, (0, 200, 0), 1)
    canvas = np.full((side + 22, side, 3), 255, np.uint8)
    canvas[: bgr.shape[0], : bgr.shape[1]] = bgr
    label = f"{path.stem[:22]} {100 * float(info.get('coverage', m.mean())):.0f}%"
    cv2.putText(canvas, label, (2, side + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--side", type=int, default=230)
    ap.add_argument("--columns", type=int, default=5)
    a = ap.parse_args(argv)
    paths = []
    for pair in load_table(a.table):
        for p in (pair.source_image, pair.target_image):
            if p not in paths:
                paths.append(p)
    panels = [panel(Path(p), a.side) for p in paths]
    while len(panels) % a.columns:
        panels.append(np.full_like(panels[0], 255))
    rows = [np.hstack(panels[i : i + a.columns]) for i in range(0, len(panels), a.columns)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(a.out), np.vstack(rows))
    print(f"{len(paths)} images -> {a.out}")


if __name__ == "__main__":
    main()
