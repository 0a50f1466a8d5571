"""Tissues: the canonical base section of each tissue, and the landmarks sampled on it.

A builder draws a tissue's structure channels ``(H, W, 5)`` and its outline; :func:`base_section` adds tears
and holes and softens the edge. ``colon-ihc`` is skimage's real IHC image (colonic glands, DAB +
hematoxylin) unmixed by colour deconvolution; ``kidney-like``, ``lung-like`` and ``breast-like`` are
procedural (Voronoi tubules, alveoli and fat cells, glomeruli, bronchioles, lobules, nuclei as small blobs).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from bench.datasets.synthetic.fields import (
    _B,
    _C,
    _M,
    _N,
    _S,
    CHANNELS,
    _blur,
    _cells,
    _disk,
    _dots,
    _noise,
    _spindles,
    _voronoi,
    _warp_cells,
)
from scipy import ndimage

TISSUES: tuple[str, ...] = ("colon-ihc", "kidney-like", "lung-like", "breast-like")


# ---------------------------------------------------------------------------------------------
# Outline and tears of a section.


def _outline(rng: np.random.Generator, shape: tuple[int, int], u: float, fill: float,
             notch: bool = False) -> np.ndarray:
    """An irregular, smooth tissue outline (bool mask of ``shape``) filling about ``fill`` of the canvas."""
    h, w = shape
    k = np.arange(2, 7)
    amp = rng.uniform(0.0, 0.1, k.size) / np.sqrt(k - 1)
    amp[0] = rng.uniform(0.0, 0.2)  # elongation
    phase = rng.uniform(0, 2 * np.pi, k.size)
    theta = np.linspace(0, 2 * np.pi, 720)
    rmax = float((1 + (amp * np.cos(np.outer(theta, k) + phase)).sum(1)).max())
    rx, ry = 0.5 * w * fill / rmax, 0.5 * h * fill / rmax
    yy, xx = np.indices(shape, dtype=np.float32)
    dx, dy = (xx - (w - 1) / 2) / rx, (yy - (h - 1) / 2) / ry
    ang, rho = np.arctan2(dy, dx), np.hypot(dx, dy)
    radius = 1 + sum(a * np.cos(kk * ang + p) for a, kk, p in zip(amp, k, phase, strict=True))
    field = 1 - rho / radius + 0.03 * _noise(rng, shape, 30 * u) + 0.012 * _noise(rng, shape, 7 * u)
    if notch:
        beta = rng.uniform(0, 2 * np.pi)
        nx, ny = (w - 1) / 2 + 1.05 * rx * np.cos(beta), (h - 1) / 2 + 1.05 * ry * np.sin(beta)
        field = np.minimum(field, np.hypot(xx - nx, yy - ny) / (0.45 * min(rx, ry)) - 1)
    mask = field > 0
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    mask = ndimage.binary_fill_holes(mask)
    m = max(2, int(4 * u))
    mask[:m], mask[-m:], mask[:, :m], mask[:, -m:] = False, False, False, False
    return mask


def _tears(rng: np.random.Generator, mask: np.ndarray, u: float) -> np.ndarray:
    """Irregular holes and tears inside a tissue mask (bool, True where tissue was torn away)."""
    inner = cv2.erode(mask.astype(np.uint8), _disk(12 * u)).astype(bool)
    holes = _noise(rng, mask.shape, 16 * u) > rng.uniform(1.9, 2.4)
    crack = np.abs(_noise(rng, mask.shape, 70 * u)) < 0.03
    crack &= _noise(rng, mask.shape, 60 * u) > 1.0
    return inner & (holes | crack)


# ---------------------------------------------------------------------------------------------
# Tissues: each builder returns the structure channels (H, W, 5) float32 and the outline (H, W) bool.


@functools.lru_cache(maxsize=1)
def _ihc_structure() -> np.ndarray:
    """Structure channels (512, 512, 5) of skimage's IHC image, unmixed by colour deconvolution."""
    from skimage import color, data

    rgb = data.immunohistochemistry()
    hed = color.rgb2hed(rgb).astype(np.float32)
    hema = np.clip(hed[..., 0] / np.percentile(hed[..., 0], 99.5), 0, 1.2)
    dab = np.clip(hed[..., 2] / np.percentile(hed[..., 2], 99.5), 0, 1.2)
    density = np.clip((235.0 - rgb.mean(-1).astype(np.float32)) / 60.0, 0, 1)
    epithelium = np.clip((_blur(dab, 6.0) - 0.25) / 0.35, 0, 1)
    glands = cv2.morphologyEx((_blur(dab, 12.0) > 0.4).astype(np.uint8), cv2.MORPH_OPEN, _disk(8))
    edge = cv2.morphologyEx(glands, cv2.MORPH_GRADIENT, _disk(1))
    out = np.zeros(rgb.shape[:2] + (len(CHANNELS),), np.float32)
    out[..., _N] = np.clip((hema - 0.25) / 0.6, 0, 1) * density
    out[..., _C] = 0.75 * epithelium * density
    out[..., _S] = np.clip(0.1 + 0.6 * density, 0, 1) * (1 - epithelium) * (density > 0.05)
    out[..., _M] = dab * density
    out[..., _B] = 0.7 * _blur(edge.astype(np.float32), 1.2) * (density > 0.05)
    return out


def _colon_ihc(rng: np.random.Generator, shape: tuple[int, int], u: float) -> tuple[np.ndarray, np.ndarray]:
    """The real IHC image, scaled down, mirror-tiled and smoothly warped to hide the tiling."""
    h, w = shape
    base = np.rot90(_ihc_structure(), int(rng.integers(4)))
    if rng.random() < 0.5:
        base = base[:, ::-1]
    f = 0.62 * u * rng.uniform(0.85, 1.15)
    small = np.stack([cv2.resize(np.ascontiguousarray(base[..., c]), None, fx=f, fy=f,
                                 interpolation=cv2.INTER_AREA) for c in range(base.shape[-1])], -1)
    pad = int(40 * u)
    reps_y, reps_x = (h + 2 * pad) // small.shape[0] + 2, (w + 2 * pad) // small.shape[1] + 2
    tiled = np.pad(small, ((0, small.shape[0] * (reps_y - 1)), (0, small.shape[1] * (reps_x - 1)), (0, 0)),
                   mode="symmetric")
    oy = int(rng.integers(0, tiled.shape[0] - h - 2 * pad + 1))
    ox = int(rng.integers(0, tiled.shape[1] - w - 2 * pad + 1))
    yy, xx = np.indices(shape, dtype=np.float32)
    mx = xx + ox + pad + 35 * u * _noise(rng, shape, 150 * u)
    my = yy + oy + pad + 35 * u * _noise(rng, shape, 150 * u)
    channels = cv2.remap(tiled, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = _outline(rng, shape, u, fill=rng.uniform(0.8, 0.9))
    return channels, mask


def _kidney_like(rng: np.random.Generator, shape: tuple[int, int], u: float) -> tuple[np.ndarray, np.ndarray]:
    """Bean-shaped section: cortex of tubules and glomeruli around a medulla of radial tubules, capsule."""
    h, w = shape
    mask = _outline(rng, shape, u, fill=rng.uniform(0.82, 0.92), notch=True)
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    depth_n = depth / max(depth.max(), 1.0)
    medulla = _blur(((depth_n + 0.12 * _noise(rng, shape, 40 * u)) > 0.55).astype(np.float32), 3 * u) > 0.5
    sp = 11 * u
    labels, dist, walls = _voronoi(rng, shape, sp, 1.5 * u)
    ys, xs = np.nonzero(mask)
    centre = (float(xs.mean()), float(ys.mean()))
    m_labels, m_dist, m_walls = _radial_cells(rng, shape, centre, sp, u)
    labels = np.where(medulla, m_labels + labels.max() + 1, labels)
    dist, walls = np.where(medulla, m_dist, dist), np.where(medulla, m_walls, walls)
    lumen = dist < 0.22 * sp * (1 + 0.35 * _noise(rng, shape, 5 * u))
    tissue = (~walls & ~lumen).astype(np.float32)
    ring = ((dist > 0.25 * sp) & (dist < 0.45 * sp)).astype(np.float32)
    med = medulla.astype(np.float32)
    ch = np.zeros(shape + (len(CHANNELS),), np.float32)
    ch[..., _N] = _dots(rng, tissue * (0.06 + 0.6 * ring) * (1 - 0.4 * med), int(h * w / (6 * u) ** 2), 1.5 * u)
    ch[..., _C] = tissue * (0.65 - 0.2 * med + 0.1 * _noise(rng, shape, 3 * u))
    wall_f = _blur(walls.astype(np.float32), 0.6 * u)
    ch[..., _S] = 0.35 * wall_f + 0.12 * med
    marked = (rng.random(labels.max() + 1) < 0.12 + 0.3 * rng.random())[labels]
    ch[..., _M] = 0.9 * tissue * marked
    ch[..., _B] = 0.9 * wall_f
    _add_glomeruli(rng, ch, depth_n * (1 - med), u)
    capsule = (depth > 0) & (depth < 3 * u)
    ch[..., _S] = np.maximum(ch[..., _S], 0.8 * capsule)
    mask &= ~_add_pelvis(rng, ch, centre, u)
    return ch, mask


def _add_pelvis(rng: np.random.Generator, ch: np.ndarray, centre: tuple[float, float], u: float) -> np.ndarray:
    """Cut the renal pelvis (an elongated, lined slit) at the centre of the medulla; return its mask."""
    shape = ch.shape[:2]
    yy, xx = np.indices(shape, dtype=np.float32)
    a = np.deg2rad(rng.uniform(0, 180))
    along = (xx - centre[0]) * np.cos(a) + (yy - centre[1]) * np.sin(a)
    across = -(xx - centre[0]) * np.sin(a) + (yy - centre[1]) * np.cos(a)
    length, width = rng.uniform(50, 110) * u, rng.uniform(10, 22) * u
    field = (along / length) ** 2 + (across / width) ** 2 + 0.25 * _noise(rng, shape, 15 * u)
    hole = (field < 1).astype(np.uint8)
    lining = cv2.dilate(hole, _disk(2.5 * u)).astype(np.float32) - hole
    ch[...] *= 1 - hole[..., None].astype(np.float32)
    ch[..., _C] += 0.5 * lining
    ch[..., _N] += _dots(rng, 0.9 * lining, int(lining.sum() / (1.2 * u) ** 2) + 1, 1.3 * u)
    ch[..., _S] += 0.4 * cv2.dilate(lining, _disk(3 * u))
    return hole.astype(bool)


def _radial_cells(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
                  spacing: float, u: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voronoi cells stretched along rays from ``centre`` (x, y): tubules running radially."""
    cx, cy = centre
    yy, xx = np.indices(shape, dtype=np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot(yy - cy, xx - cx)
    r0 = 0.16 * max(shape)
    canvas = (int(rad.max() / 3) + 4, int(2 * np.pi * r0) + 1)
    labels, dist = _cells(rng, canvas, spacing)
    mx = (ang + np.pi) * r0 + 1.5 * u * _noise(rng, shape, 12 * u)
    my = rad / 3 + 1.5 * u * _noise(rng, shape, 12 * u)
    return _warp_cells(labels, dist, mx.astype(np.float32), my.astype(np.float32), border=cv2.BORDER_WRAP)


def _add_glomeruli(rng: np.random.Generator, ch: np.ndarray, where: np.ndarray, u: float) -> None:
    """Round tufts of nuclei in a Bowman's space, placed where ``where`` is in (0.12, 0.45)."""
    h, w = where.shape
    ys, xs = np.nonzero((where > 0.12) & (where < 0.45))
    if ys.size == 0:
        return
    n = max(3, int(h * w / (95 * u) ** 2))
    tuft = np.zeros((h, w), np.uint8)
    space = np.zeros((h, w), np.uint8)
    for i in rng.choice(ys.size, size=min(n, ys.size), replace=False):
        r = max(2, int(7 * u * rng.uniform(0.8, 1.2)))
        cv2.circle(space, (int(xs[i]), int(ys[i])), int(r * 1.3), 1, -1)
        cv2.circle(tuft, (int(xs[i]), int(ys[i])), r, 1, -1)
    space_f, tuft_f = space.astype(np.float32), tuft.astype(np.float32)
    bowman = space_f * (1 - tuft_f)
    ch[...] *= (1 - space_f)[..., None]
    ch[..., _C] += 0.45 * tuft_f
    ch[..., _N] += _dots(rng, 0.9 * tuft_f, int(h * w / (2.5 * u) ** 2), 1.3 * u)
    outline = cv2.morphologyEx(space, cv2.MORPH_GRADIENT, _disk(1)).astype(np.float32)
    ch[..., _B] += 0.9 * outline + 0.3 * tuft_f
    ch[..., _S] += 0.2 * outline * (1 - bowman)


def _lung_like(rng: np.random.Generator, shape: tuple[int, int], u: float) -> tuple[np.ndarray, np.ndarray]:
    """Alveolar network of thin septa with dense lesion patches, bronchioles and vessels, pleura."""
    h, w = shape
    mask = _outline(rng, shape, u, fill=rng.uniform(0.85, 0.95))
    _, _, walls = _voronoi(rng, shape, 17 * u, 3.5 * u)
    walls &= _noise(rng, shape, 14 * u) > -1.1  # a few septa missing: larger, irregular spaces
    free = cv2.distanceTransform((~walls).astype(np.uint8), cv2.DIST_L2, 3)
    air = (free > u * (1.0 + 0.5 * _noise(rng, shape, 10 * u))).astype(np.uint8)
    air = cv2.morphologyEx(air, cv2.MORPH_OPEN, _disk(4 * u))  # rounded alveoli, thick junctions
    wall = _blur(1.0 - air.astype(np.float32), 0.5 * u)
    lesion = _blur(((_noise(rng, shape, 70 * u) + 0.3 * _noise(rng, shape, 12 * u)) > 1.3).astype(np.float32),
                   2 * u)
    ch = np.zeros(shape + (len(CHANNELS),), np.float32)
    tissue = np.maximum(wall, lesion * (0.75 + 0.25 * (_noise(rng, shape, 4 * u) > -1.2)))
    ch[..., _C] = 0.55 * tissue
    ch[..., _N] = _dots(rng, np.clip(0.35 * wall + 0.75 * lesion, 0, 1), int(h * w / (4 * u) ** 2), 1.4 * u)
    ch[..., _S] = 0.12 * wall
    ch[..., _M] = 0.9 * _dots(rng, 0.25 * wall + 0.15 * lesion, int(h * w / (9 * u) ** 2), 1.8 * u)
    ch[..., _B] = 0.7 * wall * (1 - lesion)
    inner = cv2.erode(mask.astype(np.uint8), _disk(40 * u))
    for _ in range(int(rng.integers(3, 7))):
        _add_airway(rng, ch, inner, u)
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    pleura = ((depth > 0) & (depth < 3 * u) & (_noise(rng, shape, 80 * u) > -0.3)).astype(np.float32)
    ch[..., _S] = np.maximum(ch[..., _S], 0.7 * pleura)
    ch[..., _C] = np.maximum(ch[..., _C], 0.3 * pleura)
    return ch, mask


def _add_airway(rng: np.random.Generator, ch: np.ndarray, inner: np.ndarray, u: float) -> None:
    """A bronchiole (thick nucleated epithelium) or a vessel (muscular wall) cut across, centred in ``inner``."""
    ys, xs = np.nonzero(inner)
    if ys.size == 0:
        return
    i = int(rng.integers(ys.size))
    centre = (int(xs[i]), int(ys[i]))
    a = max(4, int(rng.uniform(12, 32) * u))
    axes = (a, max(3, int(a * rng.uniform(0.5, 0.95))))
    angle = float(rng.uniform(0, 180))
    thick = max(2, int(a * rng.uniform(0.2, 0.35)))
    outer, lumen = np.zeros(inner.shape, np.uint8), np.zeros(inner.shape, np.uint8)
    cv2.ellipse(outer, centre, (axes[0] + thick, axes[1] + thick), angle, 0, 360, 1, -1)
    cv2.ellipse(lumen, centre, axes, angle, 0, 360, 1, -1)
    wall = _blur((outer - lumen).astype(np.float32), 0.7 * u)
    ch[...] *= 1 - _blur(outer.astype(np.float32), 0.7 * u)[..., None]
    if rng.random() < 0.5:  # bronchiole
        ch[..., _C] += 0.7 * wall
        ch[..., _N] += _dots(rng, 0.9 * wall, int(outer.sum() / (1.5 * u) ** 2) + 1, 1.3 * u)
        ch[..., _M] += 0.5 * wall
    else:  # vessel
        ch[..., _S] += 0.8 * wall
        ch[..., _N] += _spindles(rng, 0.5 * wall, int(outer.sum() / (4 * u) ** 2) + 1, 2.5 * u)
    edge = cv2.morphologyEx(outer, cv2.MORPH_GRADIENT, _disk(1)).astype(np.float32)
    ch[..., _B] += 0.8 * edge


def _breast_like(rng: np.random.Generator, shape: tuple[int, int], u: float) -> tuple[np.ndarray, np.ndarray]:
    """Fat (large empty cells) crossed by collagen bands holding lobules of small acini and ducts."""
    h, w = shape
    mask = _outline(rng, shape, u, fill=rng.uniform(0.82, 0.92))
    _, _, fat_walls = _voronoi(rng, shape, 26 * u, 6 * u)
    fibrous = _blur(((_noise(rng, shape, 60 * u) + 0.3 * _noise(rng, shape, 12 * u)) > 0.1).astype(np.float32),
                    1.5 * u)
    fat = np.clip(_blur(fat_walls.astype(np.float32), 0.6 * u) * 2, 0, 1)
    fibres = np.clip(0.75 + 0.35 * _noise(rng, shape, 2.5 * u) + 0.15 * _noise(rng, shape, 15 * u), 0.2, 1.2)
    ch = np.zeros(shape + (len(CHANNELS),), np.float32)
    ch[..., _S] = 0.7 * fat * (1 - fibrous) + 0.8 * fibrous * fibres
    ch[..., _C] = 0.1 * fat * (1 - fibrous) + 0.1 * fibrous
    ch[..., _N] = np.maximum(_dots(rng, 0.08 * fat, int(h * w / (8 * u) ** 2), 1.3 * u),
                             _spindles(rng, 0.5 * fibrous, int(h * w / (10 * u) ** 2), 2.5 * u))
    ys, xs = np.nonzero((fibrous > 0.5) & mask)
    for i in rng.choice(ys.size, size=min(ys.size, int(rng.integers(6, 12))), replace=False):
        _add_lobule(rng, ch, (int(xs[i]), int(ys[i])), u)
    return ch, mask


def _add_lobule(rng: np.random.Generator, ch: np.ndarray, centre: tuple[int, int], u: float) -> None:
    """A terminal duct lobular unit: loose stroma around 8-25 acini (rings of epithelium)."""
    shape = ch.shape[:2]
    loose, epi, lumen = (np.zeros(shape, np.uint8) for _ in range(3))
    big = rng.random() < 0.3  # a duct rather than a lobule
    n = 1 if big else int(rng.integers(15, 40))
    spread = 0 if big else 30 * u
    cv2.circle(loose, centre, int((spread + 14 * u) * 1.2), 1, -1)
    for _ in range(n):
        c = (int(centre[0] + rng.normal(0, spread / 2)), int(centre[1] + rng.normal(0, spread / 2)))
        r = rng.uniform(12, 18) * u if big else rng.uniform(5.5, 8.5) * u
        axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.7, 1.0))))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(epi, c, axes, angle, 0, 360, 1, -1)
        inner = (max(1, int(axes[0] * 0.35)), max(1, int(axes[1] * 0.3)))
        cv2.ellipse(lumen, c, inner, angle, 0, 360, 1, -1)
    loose_f = _blur(loose.astype(np.float32), 3 * u)
    ring = _blur((epi & (1 - lumen)).astype(np.float32), 0.5 * u)
    hole = lumen.astype(np.float32)
    ch[...] *= (1 - np.maximum(loose_f, hole))[..., None]
    ch[..., _S] += 0.3 * loose_f * (1 - ring)
    ch[..., _N] += _spindles(rng, 0.25 * loose_f * (1 - ring), int(loose.sum() / (5 * u) ** 2) + 1, 2 * u)
    ch[..., _C] += 0.6 * ring
    ch[..., _N] += _dots(rng, 0.85 * ring, int(epi.sum() / (1.6 * u) ** 2) + 1, 1.4 * u)
    ch[..., _M] += 0.8 * cv2.morphologyEx(epi & (1 - lumen), cv2.MORPH_GRADIENT, _disk(1)).astype(np.float32)
    ch[..., _B] += 0.9 * cv2.morphologyEx(epi, cv2.MORPH_GRADIENT, _disk(1)).astype(np.float32)


_BUILDERS = {
    "colon-ihc": _colon_ihc,
    "kidney-like": _kidney_like,
    "lung-like": _lung_like,
    "breast-like": _breast_like,
}


def base_section(rng: np.random.Generator, tissue: str, shape: tuple[int, int],
                 u: float, hole_probability: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A canonical section: structure channels ``(H, W, 5)`` float32 (zero off tissue), mask ``(H, W)`` bool.

    The mask is the tissue outline minus tears; it is what the landmarks are sampled from.
    """
    if tissue not in _BUILDERS:
        raise ValueError(f"unknown tissue {tissue!r}; known: {', '.join(TISSUES)}")
    channels, mask = _BUILDERS[tissue](rng, shape, u)
    if rng.random() < hole_probability:
        mask = mask & ~_tears(rng, mask, u)
    soft = _blur(mask.astype(np.float32), 0.6 * u)
    channels = np.clip(channels, 0, 1.5) * soft[..., None]
    return channels.astype(np.float32), mask


# ---------------------------------------------------------------------------------------------
# Landmarks: well spread points on visible tissue of the base section.


def _landmarks(rng: np.random.Generator, channels: np.ndarray, mask: np.ndarray, n: int,
               u: float) -> np.ndarray:
    """``(n, 2)`` well spread points ``(x, y)`` on visible tissue, a few pixels inside the outline."""
    if n <= 0:
        return np.zeros((0, 2))
    inner = cv2.erode(mask.astype(np.uint8), _disk(4 * u + 1)).astype(bool)
    stuff = _blur(channels.sum(-1), 1.5 * u) > 0.25
    ys, xs = np.nonzero(inner & stuff)
    if ys.size < n:
        ys, xs = np.nonzero(inner if inner.sum() >= n else mask)
    if ys.size < n:
        raise ValueError(f"tissue too small for {n} landmarks ({ys.size} pixels)")
    cand = np.stack([xs, ys], 1).astype(np.float64)[rng.permutation(ys.size)[:20000]]
    d_min = 0.8 * np.sqrt(mask.sum() / max(n, 1))
    while True:
        chosen = [cand[0]]
        for c in cand[1:]:
            if np.min(np.sum((np.asarray(chosen) - c) ** 2, 1)) >= d_min**2:
                chosen.append(c)
                if len(chosen) == n:
                    pts = np.asarray(chosen)
                    return pts + rng.uniform(-0.45, 0.45, pts.shape)
        d_min *= 0.75
