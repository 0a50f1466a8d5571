"""Helpers shared by the study scripts: moving an image onto a canvas, a gamma change, writing pairs and tables.

A study imports them as ``from common import ...``: the studies are run as ``python studies/NAME.py``, and
Python puts the script's own folder first on the import path (see ``studies/README.md``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from bench import geometry
from bench.pairs import TABLE_HEADER, write_landmarks


def move_on_canvas(rng: np.random.Generator, img: np.ndarray,
                   scale_range: tuple[float, float] = (0.8, 1.2)) -> tuple[np.ndarray, np.ndarray]:
    """``img`` moved by a random affine (any rotation, ``scale_range``, shear <= 0.08) onto a canvas holding
    all of it, filled with its median border colour; returns ``(image, (3, 3) matrix of its pixels)``."""
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


def gamma_lut(gamma: float) -> np.ndarray:
    """The uint8 lookup table of a gamma change (``cv2.LUT(img, gamma_lut(g))``)."""
    return (255.0 * (np.arange(256) / 255.0) ** gamma).clip(0, 255).astype(np.uint8)


def save_pair(folder: Path, k: int, images: Sequence[np.ndarray], points: Sequence[np.ndarray],
              bgr: bool = False) -> list:
    """Write pair ``k`` as ``kk_source.jpg/.csv`` and ``kk_target.jpg/.csv`` in ``folder``, keeping only the
    landmarks inside both images (ANHIR coordinates are non-negative); return its row of the pair table.
    ``images`` are (source, target), RGB unless ``bgr``."""
    n = min(len(p) for p in points)
    keep = np.ones(n, bool)
    for p, img in zip(points, images, strict=True):
        h, w = img.shape[:2]
        keep &= (p[:n, 0] >= 0) & (p[:n, 1] >= 0) & (p[:n, 0] <= w - 1) & (p[:n, 1] <= h - 1)
    row = [k]
    for role, img, p in zip(("source", "target"), images, points, strict=True):
        cv2.imwrite(str(folder / f"{k:02d}_{role}.jpg"), img if bgr else img[..., ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        write_landmarks(folder / f"{k:02d}_{role}.csv", p[:n][keep])
        row += [f"{k:02d}_{role}.jpg", f"{k:02d}_{role}.csv"]
    h, w = images[1].shape[:2]
    return row + [f"{np.hypot(h, w):.2f}", f"({h}, {w})", "training"]


def write_table(folder: Path, rows: list[list]) -> Path:
    """Write ``folder/dataset.csv`` (the ANHIR pair table's header, then ``rows``) and return its path."""
    with (folder / "dataset.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_HEADER)
        writer.writerows(rows)
    return folder / "dataset.csv"


def require_outside_repository(ap, out: Path) -> None:
    """Refuse (``ap.error``) an output folder inside the repository: variants of real data never land in it."""
    repo = Path(__file__).resolve().parent.parent
    if repo in out.resolve().parents or out.resolve() == repo:
        ap.error("write variants outside the repository (they are derived from the real data)")
