"""Synthetic pairs of differently stained tissue sections with exact ground truth.

Every pair starts from one canonical *base* section, described by five stain-independent structure
channels (:data:`CHANNELS`: nuclei, cytoplasm, stroma, an immunohistochemical marker, basement membranes)
and a tissue outline. A *stain* is a colour model that turns those channels into optical density
(Beer-Lambert), so two stains of one base share the structure but differ in colour and intensity, as
consecutive sections of one block do.

* The **target** is stain A of the base, in the base frame.
* The **source** is stain B of the base moved by a random affine ``A`` (rotation up to
  ``max_rotation_deg`` about the centre, log-uniform scale, shear, a translation inside the margins)
  and a small smooth elastic displacement ``d``. Source pixel ``x`` shows base point ``E(A^-1 x)`` with
  ``E(q) = q + d(q)``; a base landmark ``p`` therefore lies at ``A E^-1(p)`` in the source, found by
  fixed-point iteration to better than 1e-6 px.
* ``true_matrix = A^-1`` (source -> target) is exact up to the elastic part, whose components are
  bounded by ``elastic_px`` (in base pixels).

Tissues: ``colon-ihc`` is skimage's real IHC image (colonic glands, DAB + hematoxylin) unmixed by colour
deconvolution and re-stained; ``kidney-like``, ``lung-like`` and ``breast-like`` are procedural (Voronoi
tubules, alveoli and fat cells, glomeruli, bronchioles, lobules, nuclei as small blobs).
"""

from __future__ import annotations

import csv
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.anhir import write_landmarks
from scipy import ndimage

from bench.geometry import apply, random_affine, translation

GENERATOR_VERSION = "2"  # 1: first draft (commit 4b1f2f3); 2: PAS paler, kidney pelvis, elongated outlines
TISSUES: tuple[str, ...] = ("colon-ihc", "kidney-like", "lung-like", "breast-like")
STAINS: tuple[str, ...] = ("HE", "DAB", "PAS", "MT")
CHANNELS: tuple[str, ...] = ("nuclei", "cytoplasm", "stroma", "marker", "membrane")


@dataclass(frozen=True)
class GeneratorConfig:
    """Parameters of :func:`generate_pair` (all lengths in pixels of the target image)."""

    size: int = 800  # longer side of the target image; the source canvas fits the moved tissue
    n_landmarks: int = 40
    max_rotation_deg: float = 180.0
    scale_range: tuple[float, float] = (0.8, 1.25)
    max_shear: float = 0.1
    max_translation_frac: float = 0.05  # extra free margin on each side of the source, x size
    elastic_px: float = 3.0  # bound on each component of the smooth elastic displacement
    aspect_range: tuple[float, float] = (0.68, 0.85)  # height / width of the target
    jpeg_quality: int = 90
    hole_probability: float = 0.5  # chance of tears / holes in a section
    dust_probability: float = 0.35  # chance of dust and fibres on an image's glass
    stain_jitter: float = 0.12  # log-normal spread of each stain's channel weights, per image

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        problems = [
            (self.size >= 64, f"size must be at least 64 px, got {self.size}"),
            (self.n_landmarks >= 0, f"n_landmarks must be >= 0, got {self.n_landmarks}"),
            (0 < lo <= hi, f"scale_range must be 0 < low <= high, got {self.scale_range}"),
            (0 < self.aspect_range[0] <= self.aspect_range[1] <= 1, f"bad aspect_range {self.aspect_range}"),
            (self.max_shear >= 0 and self.max_translation_frac >= 0, "shear and translation must be >= 0"),
            # the elastic map q -> q + d(q) must stay a contraction-invertible, fold-free warp
            (0 <= self.elastic_px <= 0.03 * self.size, f"elastic_px must be in [0, {0.03 * self.size:g}] "
                                                      f"for size {self.size}, got {self.elastic_px}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Variation:
    """Harder pairs, on top of a :class:`GeneratorConfig` (the defaults change nothing).

    Kept apart from the config so the embedded sample (keyed by its config) stays what it is.
    """

    mirror_probability: float = 0.0  # chance the source is mirrored (left-right or top-bottom) before it moves
    texture_swap_sigma: float = 0.0  # > 0: the source's structure finer than this Gaussian sigma (px at size 800)
    #                                  comes from another section of the same tissue (cells of another cut)

    def __post_init__(self) -> None:
        if not 0 <= self.mirror_probability <= 1:
            raise ValueError(f"mirror_probability must be in [0, 1], got {self.mirror_probability}")
        if self.texture_swap_sigma < 0:
            raise ValueError(f"texture_swap_sigma must be >= 0, got {self.texture_swap_sigma}")


@dataclass
class SyntheticPair:
    """One generated pair; images are RGB uint8, landmarks ``(N, 2)`` float64 ``(x, y)``."""

    source_rgb: np.ndarray  # (H, W, 3) uint8, the moved image
    target_rgb: np.ndarray  # (H2, W2, 3) uint8
    source_landmarks: np.ndarray  # (N, 2) in source pixels
    target_landmarks: np.ndarray  # (N, 2) the same points in target pixels
    true_matrix: np.ndarray  # (3, 3) affine part, source pixels -> target pixels
    tissue: str
    source_stain: str
    target_stain: str
    seed: int
    source_mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool tissue
    target_mask: np.ndarray | None = field(default=None, repr=False)  # (H2, W2) bool tissue
    mirrored: str = ""  # "lr" or "tb" when the source was mirrored before it was moved (Variation)


# ---------------------------------------------------------------------------------------------
# Stain colour models: optical density (natural log) per unit of each structure channel.

_HEMATOXYLIN = (0.65, 0.70, 0.29)
_EOSIN = (0.07, 0.99, 0.11)
_DAB = (0.27, 0.57, 0.78)
_SCHIFF = (0.20, 0.95, 0.24)  # PAS magenta
_ANILINE_BLUE = (0.85, 0.50, 0.14)
_FUCHSIN = (0.10, 0.80, 0.59)  # Biebrich scarlet / acid fuchsin red
_IRON_HEMATOXYLIN = (0.58, 0.62, 0.52)

# rows follow CHANNELS: (weight, colour) terms summed per channel
_STAIN_TERMS: dict[str, tuple[tuple[tuple[float, tuple[float, float, float]], ...], ...]] = {
    "HE": (
        ((1.5, _HEMATOXYLIN), (0.15, _EOSIN)),
        ((0.95, _EOSIN), (0.06, _HEMATOXYLIN)),
        ((0.6, _EOSIN),),
        ((0.15, _EOSIN),),
        ((0.3, _EOSIN),),
    ),
    "DAB": (
        ((0.8, _HEMATOXYLIN),),
        ((0.16, _HEMATOXYLIN),),
        ((0.13, _HEMATOXYLIN),),
        ((1.5, _DAB),),
        ((0.05, _HEMATOXYLIN),),
    ),
    "PAS": (
        ((0.95, _HEMATOXYLIN),),
        ((0.2, _SCHIFF),),
        ((0.14, _SCHIFF),),
        ((0.1, _SCHIFF),),
        ((1.3, _SCHIFF),),
    ),
    "MT": (
        ((1.2, _IRON_HEMATOXYLIN),),
        ((0.6, _FUCHSIN),),
        ((0.6, _ANILINE_BLUE),),
        ((0.15, _FUCHSIN),),
        ((0.35, _ANILINE_BLUE),),
    ),
}


def stain_matrix(stain: str) -> np.ndarray:
    """The ``(len(CHANNELS), 3)`` optical-density matrix of a stain (rows: channels, columns: R, G, B).

    >>> stain_matrix("HE").shape
    (5, 3)
    """
    if stain not in _STAIN_TERMS:
        raise ValueError(f"unknown stain {stain!r}; known: {', '.join(STAINS)}")
    rows = []
    for terms in _STAIN_TERMS[stain]:
        od = np.zeros(3)
        for weight, colour in terms:
            c = np.asarray(colour, dtype=np.float64)
            od += weight * c / np.linalg.norm(c)
        rows.append(od)
    return np.asarray(rows, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Small field helpers. Lengths scale with ``u = size / 800`` so a smaller image keeps its look.

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
# Rendering: stain, glass, dust, noise.


def _glass(rng: np.random.Generator, shape: tuple[int, int], u: float) -> np.ndarray:
    """Light, slightly uneven and tinted glass background, ``shape + (3,)`` float32 (RGB 0-255)."""
    h, w = shape
    tint = rng.uniform(237.0, 245.0) + rng.uniform(-3.0, 3.0, 3)
    yy, xx = np.indices(shape, dtype=np.float32)
    vignette = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.25 * (h * h + w * w))
    light = 1 + 0.012 * _noise(rng, shape, 150 * u) - rng.uniform(0.0, 0.03) * vignette
    return light[..., None] * tint.astype(np.float32)


def _dust(rng: np.random.Generator, shape: tuple[int, int], u: float) -> np.ndarray:
    """Optical density (H, W) of a few specks and fibres lying on the glass."""
    img = np.zeros(shape, np.float32)
    h, w = shape
    for _ in range(int(rng.integers(2, 10))):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        if rng.random() < 0.6:
            cv2.circle(img, (x, y), max(1, int(rng.uniform(0.7, 2.5) * u)), float(rng.uniform(0.3, 1.2)), -1)
        else:
            steps = np.cumsum(rng.normal(0, 4 * u, (int(rng.integers(4, 12)), 2)), axis=0) + (x, y)
            cv2.polylines(img, [steps.astype(np.int32)], False, float(rng.uniform(0.2, 0.7)), 1)
    return _blur(img, 0.6)


def render(rng: np.random.Generator, channels: np.ndarray, stain: str, *, u: float = 1.0,
           jitter: float = 0.12, dust: bool = False) -> np.ndarray:
    """Stain structure channels ``(H, W, 5)`` and photograph them on glass: ``(H, W, 3)`` uint8 RGB.

    Each call draws its own stain strength (log-normal ``jitter`` per channel), uneven staining,
    a little cell-level grain (so two sections never match pixel for pixel), glass and sensor noise.
    """
    h, w = channels.shape[:2]
    od_matrix = stain_matrix(stain) * np.exp(rng.normal(0, jitter, (len(CHANNELS), 1))).astype(np.float32)
    grain = 1 + 0.12 * _noise(rng, (h, w), 1.5 * u)
    uneven = 1 + 0.1 * _noise(rng, (h, w), 120 * u)
    od = (channels.reshape(-1, len(CHANNELS)) @ od_matrix).reshape(h, w, 3)
    od *= (grain * uneven)[..., None]
    if dust:
        od += _dust(rng, (h, w), u)[..., None] * np.array([0.9, 1.0, 1.1], np.float32)
    img = _glass(rng, (h, w), u) * np.exp(-od)
    img += rng.normal(0, 1.8, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry: the elastic displacement, the source canvas and the landmarks.


@dataclass(frozen=True)
class _Elastic:
    """Smooth displacement ``d(q) = sum_k a_k sin(w_k . q + phi_k)`` per component, ``|d_x|, |d_y| <= bound``."""

    amp: np.ndarray  # (2, K)
    freq: np.ndarray  # (2, K, 2)
    phase: np.ndarray  # (2, K)

    @classmethod
    def random(cls, rng: np.random.Generator, bound: float, size: float, modes: int = 4) -> _Elastic:
        amp = rng.dirichlet(np.ones(modes), size=2) * bound
        wavelength = rng.uniform(0.35, 0.9, (2, modes)) * size
        direction = rng.uniform(0, 2 * np.pi, (2, modes))
        freq = np.stack([np.cos(direction), np.sin(direction)], -1) * (2 * np.pi / wavelength)[..., None]
        return cls(amp, freq, rng.uniform(0, 2 * np.pi, (2, modes)))

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Displacement ``(dx, dy)`` at points ``(x, y)`` (arrays of one shape, float32 or float64)."""
        out = []
        for c in range(2):
            d = np.zeros_like(x)
            for a, (fx, fy), p in zip(self.amp[c], self.freq[c], self.phase[c], strict=True):
                d += (a * np.sin(fx * x + fy * y + p)).astype(x.dtype)
            out.append(d)
        return out[0], out[1]

    def invert(self, points: np.ndarray, tol: float = 1e-9, max_iter: int = 500) -> np.ndarray:
        """Solve ``q + d(q) = p`` for ``(N, 2)`` points ``p`` by fixed-point iteration (contraction)."""
        p = np.asarray(points, np.float64)
        q = p.copy()
        for _ in range(max_iter):
            dx, dy = self(q[:, 0], q[:, 1])
            q_new = p - np.stack([dx, dy], 1)
            if np.max(np.abs(q_new - q), initial=0.0) < tol:
                return q_new
            q = q_new
        raise RuntimeError("elastic displacement is not invertible by fixed-point iteration (too strong)")


def _source_frame(rng: np.random.Generator, cfg: GeneratorConfig, mask: np.ndarray,
                  u: float, pre: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Random affine ``A`` (base -> source pixels) and a source canvas ``(h, w)`` holding all the tissue.

    ``pre`` (3x3, base -> base, e.g. a mirror) is applied before the random affine.
    """
    h, w = mask.shape
    a0 = random_affine(rng, ((w - 1) / 2, (h - 1) / 2), max_rotation_deg=cfg.max_rotation_deg,
                       scale_range=cfg.scale_range, max_shear=cfg.max_shear)
    if pre is not None:
        a0 = a0 @ pre
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    moved = apply(a0, pts)
    reach = 2.0 * cfg.elastic_px * max(cfg.scale_range) * (1 + cfg.max_shear) + 2.0 * u + 2.0
    lo, hi = moved.min(0) - reach, moved.max(0) + reach
    margins = rng.uniform(0.02, 0.02 + 2 * cfg.max_translation_frac, 4) * cfg.size
    a = translation(margins[0] - lo[0], margins[1] - lo[1]) @ a0
    size = hi - lo + margins[:2] + margins[2:]
    return a, (int(np.ceil(size[1])), int(np.ceil(size[0])))


def _sampling_maps(a: np.ndarray, elastic: _Elastic, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each source pixel ``x`` the base position ``E(A^-1 x)`` as cv2.remap maps (float32)."""
    inv = np.linalg.inv(a)
    yy, xx = np.indices(shape, dtype=np.float32)
    ux = (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]).astype(np.float32)
    uy = (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]).astype(np.float32)
    dx, dy = elastic(ux, uy)
    return ux + dx, uy + dy


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


# ---------------------------------------------------------------------------------------------
# Public API.


def _choose(rng: np.random.Generator, tissue: str | None, source_stain: str | None,
            target_stain: str | None) -> tuple[str, str, str]:
    """Fill in the tissue and two *different* stains left as ``None``; validate the given ones."""
    for name, value, known in (("tissue", tissue, TISSUES), ("source_stain", source_stain, STAINS),
                               ("target_stain", target_stain, STAINS)):
        if value is not None and value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    tissue = tissue or TISSUES[int(rng.integers(len(TISSUES)))]
    if target_stain is None:
        target_stain = str(rng.choice([s for s in STAINS if s != source_stain]))
    if source_stain is None:
        source_stain = str(rng.choice([s for s in STAINS if s != target_stain]))
    return tissue, source_stain, target_stain


def generate_pair(seed: int, *, tissue: str | None = None, source_stain: str | None = None,
                  target_stain: str | None = None, config: GeneratorConfig = GeneratorConfig(),
                  variation: Variation = Variation()) -> SyntheticPair:
    """Generate one pair of differently stained sections with exact ground truth.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.SeedSequence(seed)``: same seed and config, same arrays.
    tissue, source_stain, target_stain : str, optional
        One of :data:`TISSUES` / :data:`STAINS`; drawn at random when ``None`` (two different stains).
    config : GeneratorConfig
    variation : Variation
        Mirrored sources and swapped fine texture; its own random streams, so with its defaults the pair
        is exactly the one generated without it.

    Returns
    -------
    SyntheticPair
        Target ``(H, W, 3)`` with ``max(H, W) == config.size``; source ``(H2, W2, 3)`` sized to hold the
        moved tissue; ``(N, 2)`` landmarks; ``true_matrix`` (3x3) maps source to target pixels, exact
        up to the elastic part (each component at most ``elastic_px`` in target pixels; its determinant is
        negative for a mirrored source).
    """
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
    pick, struct, geom, paint_t, paint_s, mirror_rng, swap_rng = streams
    tissue, source_stain, target_stain = _choose(pick, tissue, source_stain, target_stain)
    u = config.size / 800.0
    shape = (int(round(config.size * pick.uniform(*config.aspect_range))), config.size)
    if pick.random() < 0.25:
        shape = shape[::-1]
    channels, mask = base_section(struct, tissue, shape, u, config.hole_probability)
    target_landmarks = _landmarks(struct, channels, mask, config.n_landmarks, u)
    elastic = _Elastic.random(geom, config.elastic_px, config.size)
    mirrored, pre = "", None
    if mirror_rng.random() < variation.mirror_probability:
        mirrored = "lr" if mirror_rng.random() < 0.5 else "tb"
        c = ((shape[1] - 1) / 2, (shape[0] - 1) / 2)
        flip = np.diag([-1.0, 1.0, 1.0]) if mirrored == "lr" else np.diag([1.0, -1.0, 1.0])
        pre = translation(*c) @ flip @ translation(-c[0], -c[1])
    a, source_shape = _source_frame(geom, config, mask, u, pre)
    source_landmarks = apply(a, elastic.invert(target_landmarks))
    mx, my = _sampling_maps(a, elastic, source_shape)
    source_channels = channels
    if variation.texture_swap_sigma > 0:  # consecutive cuts: same coarse structure, other cells
        sigma = variation.texture_swap_sigma * u
        other, _ = base_section(swap_rng, tissue, shape, u, 0.0)
        soft = _blur(mask.astype(np.float32), 0.6 * u)[..., None]
        fine = (other - _blur(other, sigma)) * soft
        source_channels = np.clip(_blur(channels, sigma) + fine, 0, 1.5).astype(np.float32)
    moved = cv2.remap(source_channels, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    source_mask = cv2.remap(mask.astype(np.float32), mx, my, cv2.INTER_LINEAR) > 0.5
    target_rgb = render(paint_t, channels, target_stain, u=u, jitter=config.stain_jitter,
                        dust=bool(paint_t.random() < config.dust_probability))
    source_rgb = render(paint_s, moved, source_stain, u=u, jitter=config.stain_jitter,
                        dust=bool(paint_s.random() < config.dust_probability))
    return SyntheticPair(
        source_rgb=source_rgb, target_rgb=target_rgb,
        source_landmarks=source_landmarks, target_landmarks=target_landmarks,
        true_matrix=np.linalg.inv(a), tissue=tissue, source_stain=source_stain,
        target_stain=target_stain, seed=int(seed), source_mask=source_mask, target_mask=mask, mirrored=mirrored,
    )


TABLE_HEADER = ("", "Source image", "Source landmarks", "Target image", "Target landmarks",
                "Image diagonal [pixels]", "Image size [pixels]", "status")


def dataset_plan(n_pairs: int, seed: int) -> list[tuple[str, str, str, int]]:
    """``(tissue, source_stain, target_stain, pair_seed)`` of each pair of :func:`write_dataset`.

    Tissues take turns; each tissue walks through a shuffled list of all ordered pairs of two different
    stains, so a dataset of ``len(TISSUES) * k`` pairs is balanced over tissues and varied in stains.

    >>> [p[0] for p in dataset_plan(5, 0)]
    ['colon-ihc', 'kidney-like', 'lung-like', 'breast-like', 'colon-ihc']
    """
    ordered = [(s, t) for s in STAINS for t in STAINS if s != t]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    orders = {t: rng.permutation(len(ordered)) for t in TISSUES}
    plan = []
    for i in range(n_pairs):
        tissue = TISSUES[i % len(TISSUES)]
        j = orders[tissue][(i // len(TISSUES)) % len(ordered)]
        pair_seed = int(np.random.SeedSequence([seed, 2, i]).generate_state(1)[0])
        plan.append((tissue, *ordered[j], pair_seed))
    return plan


def write_pair(folder: Path, set_name: str, pair: SyntheticPair, quality: int = 90) -> dict[str, str]:
    """Write one pair as ``<set_name>/scale-100pc/<stain>.jpg`` + ``.csv``; return the table's paths."""
    rel = Path(set_name) / "scale-100pc"
    (folder / rel).mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, rgb, pts, stain in (("Source", pair.source_rgb, pair.source_landmarks, pair.source_stain),
                                  ("Target", pair.target_rgb, pair.target_landmarks, pair.target_stain)):
        image = rel / f"{stain}.jpg"
        if not cv2.imwrite(str(folder / image), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"cannot write {folder / image}")
        write_landmarks(folder / rel / f"{stain}.csv", pts)
        paths[f"{role} image"] = image.as_posix()
        paths[f"{role} landmarks"] = (rel / f"{stain}.csv").as_posix()
    return paths


def write_dataset(folder: Path, n_pairs: int, seed: int, config: GeneratorConfig = GeneratorConfig(),
                  prefix: str = "", *, workers: int | None = None, variation: Variation = Variation(),
                  unrelated: bool = False) -> Path:
    """Generate ``n_pairs`` pairs into ``folder`` in the ANHIR layout and return ``folder/dataset.csv``.

    Each pair is its own image set ``<prefix><tissue>_<k>/scale-100pc/<stain>.jpg`` (JPEG at
    ``config.jpeg_quality``) with ``<stain>.csv`` landmarks beside it; ``prefix`` is prepended to the set
    names (and so to the tissue names the ANHIR reader derives from the paths). The table has ANHIR's
    columns; all pairs are ``training`` (every landmark is known). Pairs are generated by ``workers``
    threads (default: up to 4, one per CPU); the output is deterministic for a given
    ``(n_pairs, seed, config)`` whatever the number of workers.

    ``variation`` makes the pairs harder (:class:`Variation`). ``unrelated=True`` writes a table of pairs that
    must be refused: row ``k`` pairs the source of pair ``k`` with the target of pair ``k + 1`` (another tissue,
    since tissues take turns; needs at least 2 pairs), so its landmarks do not correspond.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = dataset_plan(n_pairs, seed)
    counters: dict[str, int] = {}
    set_names = []
    for tissue, *_ in plan:
        counters[tissue] = counters.get(tissue, 0) + 1
        set_names.append(f"{prefix}{tissue}_{counters[tissue]}")

    def make(index: int) -> list:
        tissue, src, tgt, pair_seed = plan[index]
        pair = generate_pair(pair_seed, tissue=tissue, source_stain=src, target_stain=tgt, config=config,
                             variation=variation)
        paths = write_pair(folder, set_names[index], pair, config.jpeg_quality)
        h, w = pair.target_rgb.shape[:2]
        return [index, paths["Source image"], paths["Source landmarks"], paths["Target image"],
                paths["Target landmarks"], f"{math.hypot(h, w):.2f}", f"({h}, {w})", "training"]

    if unrelated and n_pairs < 2:
        raise ValueError("unrelated pairs need at least 2 generated pairs")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(make, range(n_pairs)))
    if unrelated:  # source of pair k, target (image, landmarks, diagonal, size) of pair k + 1
        rows = [row[:3] + rows[(k + 1) % n_pairs][3:] for k, row in enumerate(rows)]
    table = folder / "dataset.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_HEADER)
        writer.writerows(rows)
    return table
