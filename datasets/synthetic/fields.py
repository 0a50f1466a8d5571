"""Raster building blocks of the generator: the structure channels, and the small fields tissues use.

:data:`CHANNELS` are the five stain-independent structure channels a section is described by (tissues fill
them, :mod:`.stains` colours them). The helpers make smooth noise, blurs, round and elongated nuclei and
Voronoi cells; lengths scale with ``u = size / 800`` so a smaller image keeps its look.
"""

from __future__ import annotations

import cv2
import numpy as np

CHANNELS: tuple[str, ...] = ("nuclei", "cytoplasm", "stroma", "marker", "membrane")
_N, _C, _S, _M, _B = range(len(CHANNELS))


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth Gaussian noise, ``shape`` float32, zero mean, unit std, correlation length ~``scale`` px."""
    h, w = shape
    grid = rng.standard_normal((max(2, int(h / scale) + 3), max(2, int(w / scale) + 3)))
    grid = cv2.GaussianBlur(grid.astype(np.float32), (0, 0), 0.7)
    f = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 image (any number of channels)."""
    return cv2.GaussianBlur(np.asarray(img, np.float32), (0, 0), max(sigma, 0.3))


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _dots(rng: np.random.Generator, density: np.ndarray, count: int, radius: float) -> np.ndarray:
    """Soft round blobs (nuclei), ``density.shape`` float32 in [0, 1].

    ``count`` points are drawn uniformly and each is kept with probability ``density`` at its pixel.
    """
    h, w = density.shape
    xs = rng.integers(0, w, count)
    ys = rng.integers(0, h, count)
    keep = rng.random(count) < density[ys, xs]
    img = np.zeros((h, w), np.float32)
    np.add.at(img, (ys[keep], xs[keep]), rng.uniform(0.65, 1.0, int(keep.sum())).astype(np.float32))
    s = max(radius / 1.3, 0.6)
    img = cv2.GaussianBlur(img, (0, 0), s) * (2 * np.pi * s * s)
    return np.clip(1.6 * img, 0.0, 1.0)


def _spindles(rng: np.random.Generator, density: np.ndarray, count: int, length: float) -> np.ndarray:
    """Elongated nuclei (fibroblasts) at random angles, ``density.shape`` float32 in [0, 1]."""
    h, w = density.shape
    img = np.zeros((h, w), np.uint8)
    xs, ys = rng.integers(0, w, count), rng.integers(0, h, count)
    for x, y in zip(xs, ys, strict=True):
        if rng.random() < density[y, x]:
            axes = (max(1, int(length * rng.uniform(0.6, 1.2))), max(1, int(length / 4)))
            cv2.ellipse(img, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return _blur(img.astype(np.float32) / 255.0, 0.6)


def _cells(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells of jittered hexagonal seeds: ``labels`` (float32 cell id) and ``dist`` to the seed."""
    h, w = shape
    rows = np.arange(-spacing, h + spacing, spacing * 0.866)
    pts = []
    for i, y in enumerate(rows):
        xs = np.arange(-spacing, w + spacing, spacing) + (i % 2) * spacing / 2
        pts.append(np.stack([xs, np.full_like(xs, y)], axis=1))
    pts = np.concatenate(pts)
    pts = np.round(pts + rng.uniform(-0.38, 0.38, pts.shape) * spacing).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
    seeds = np.ones(shape, np.uint8)
    seeds[pts[:, 1], pts[:, 0]] = 0
    dist, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    return labels.astype(np.float32), dist


def _warp_cells(labels: np.ndarray, dist: np.ndarray, mx: np.ndarray, my: np.ndarray,
                border: int = cv2.BORDER_REFLECT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample cells at ``(mx, my)``; return int32 labels, float32 dist and bool one-pixel walls."""
    lab = cv2.remap(labels, mx, my, cv2.INTER_NEAREST, borderMode=border).astype(np.int32)
    dist = cv2.remap(dist, mx, my, cv2.INTER_LINEAR, borderMode=border)
    walls = np.zeros(lab.shape, bool)
    walls[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    walls[1:, :] |= lab[1:, :] != lab[:-1, :]
    return lab, dist, walls


def _voronoi(rng: np.random.Generator, shape: tuple[int, int], spacing: float, wobble: float):
    """Jittered hexagonal Voronoi cells with wavy borders.

    Returns ``labels`` (int32 cell id), ``dist`` (float32 distance to the cell's seed) and ``walls``
    (bool, one-pixel cell borders), all of ``shape``.
    """
    labels, dist = _cells(rng, shape, spacing)
    yy, xx = np.indices(shape, dtype=np.float32)
    mx = xx + wobble * _noise(rng, shape, spacing * 1.5)
    my = yy + wobble * _noise(rng, shape, spacing * 1.5)
    return _warp_cells(labels, dist, mx, my)
