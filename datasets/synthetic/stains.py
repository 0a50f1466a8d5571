"""Stains and the photograph: colour models that turn structure channels into an RGB image on glass.

A stain is a colour model (Beer-Lambert): optical density per unit of each structure channel
(:data:`bench.datasets.synthetic.fields.CHANNELS`), so two stains of one section share the structure but
differ in colour and intensity. :func:`render` stains the channels and photographs them on glass, with
per-image stain strength, uneven staining, grain, dust and sensor noise.
"""

from __future__ import annotations

import cv2
import numpy as np
from bench.datasets.synthetic.fields import CHANNELS, _blur, _noise

STAINS: tuple[str, ...] = ("HE", "DAB", "PAS", "MT")


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
