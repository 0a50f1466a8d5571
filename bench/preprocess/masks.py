"""Step 3 of the stage: the tissue mask (:func:`tissue_mask`) and its centre of mass."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from bench.imageio import target_size
from bench.preprocess.params import PreprocessParams


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def tissue_signal(rgb: np.ndarray) -> np.ndarray:
    """``1 - min(R, G, B) / 255`` as ``(H, W)`` uint8 (``255 - min``): any stain absorbs in at least one
    channel, so pale stains show more contrast there than in luminance."""
    r, g, b = cv2.split(rgb)
    return cv2.bitwise_not(cv2.min(cv2.min(r, g), b))


def texture_energy(signal: np.ndarray, sigma: float, energy_sigma: float) -> np.ndarray:
    """Smoothed Laplacian magnitude of a uint8 signal, returned at half its size, float32 in [0, 1] units.

    ``|Laplacian(Gaussian(signal, sigma))|`` is measured at the signal's size, then smoothed and halved
    by ``cv2.pyrDown`` and smoothed again by ``energy_sigma`` (pixels of the half-size image).
    """
    f = signal.astype(np.float32)
    f *= np.float32(1 / 255)
    if sigma > 0:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    lap = np.abs(cv2.Laplacian(f, cv2.CV_32F, ksize=3))
    energy = cv2.pyrDown(lap)
    return cv2.GaussianBlur(energy, (0, 0), energy_sigma) if energy_sigma > 0 else energy


def _otsu_log(energy: np.ndarray, flat: float = 1e-4) -> float:
    """Otsu threshold of ``log(energy)``, returned in energy units.

    Pixels below ``flat`` (exactly uniform areas: scanner padding, saturated white) are left out of the
    histogram: they are background anyway, and a spike of them would pull the threshold between
    "flat" and "glass with noise" instead of between glass and tissue.
    """
    values = energy[energy > flat]
    if values.size < 16:
        return float(flat)
    log = np.log(values)
    lo, hi = float(log.min()), float(log.max())
    if hi - lo < 1e-6:
        return float(np.exp(hi))
    u8 = ((log - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    t, _ = cv2.threshold(u8[None, :], 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return float(np.exp(lo + (t + 0.5) * (hi - lo) / 255.0))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a uint8 {0, 1} mask (regions of 0 not connected to the border)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (padded[1:-1, 1:-1] | (1 - flood[1:-1, 1:-1])).astype(np.uint8)


def _clean_components(mask: np.ndarray, params: PreprocessParams, side: int) -> np.ndarray:
    """Drop small components and thin border-touching ones (pen marks, slide edges). uint8 in/out.

    A border-touching component is thin when an erosion by ``mask_border_thickness * side`` leaves
    nothing of it: no point of it lies deeper inside than a stroke.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    keep = area >= params.mask_min_area * h * w
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    radius = params.mask_border_thickness * side
    if radius >= 0.5 and np.any(keep[1:] & touches[1:]):
        core = cv2.erode(mask, _disk(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        survivors = np.bincount(labels[core > 0], minlength=n)
        keep &= ~touches | (survivors > 0)
    keep[0] = False
    return keep[labels].astype(np.uint8)


def tissue_mask(rgb: np.ndarray, params: PreprocessParams | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue mask of an RGB image by smoothed-Laplacian thresholding and morphological clean-up.

    The texture is measured at ``2 * params.mask_size``, the mask cleaned at ``params.mask_size`` and
    resized back to the image's size.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    params : the stage's parameters (mask_* fields)

    Returns
    -------
    mask : (H, W) bool
    info : ``coverage`` (fraction of True), ``threshold``, ``fallback`` ("" or why the whole image was
        kept), ``glass`` (mean RGB of the background, for warping borders) and ``centre`` (x, y of the
        mask's centre of mass, from the small mask)
    """
    params = params or PreprocessParams()
    h, w = rgb.shape[:2]
    signal = tissue_signal(rgb)
    r = min(1.0, 2 * params.mask_size / max(h, w))  # texture at 2x the mask size, mask after pyrDown
    if r < 1:  # mild reductions: linear is enough before the Gaussian (and 10x faster than area)
        interp = cv2.INTER_LINEAR if r >= 0.5 else cv2.INTER_AREA
        signal = cv2.resize(signal, target_size((h, w), r), interpolation=interp)
    energy = texture_energy(signal, params.mask_sigma, params.mask_energy_sigma)
    side = max(energy.shape)
    threshold = max(_otsu_log(energy), params.mask_min_energy)
    m = (energy > threshold).astype(np.uint8)
    if params.mask_close > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(params.mask_close * side))
    m = _fill_holes(m)
    if params.mask_shrink > 0:
        m = cv2.erode(m, _disk(params.mask_shrink), borderType=cv2.BORDER_REPLICATE)
    if params.mask_open > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(params.mask_open * side))
    m = _clean_components(m, params, side)
    coverage = cv2.countNonZero(m) / m.size
    fallback = ""
    if coverage < params.mask_min_coverage:
        fallback = f"mask covered {coverage:.4f} < {params.mask_min_coverage}: whole image kept"
        m[:] = 1
    mh, mw = m.shape
    cx, cy = centre_of_mass(m.view(bool))
    big = cv2.resize(m * np.uint8(255), (w, h), interpolation=cv2.INTER_LINEAR)
    cv2.threshold(big, 127, 1, cv2.THRESH_BINARY, dst=big)
    small_rgb = cv2.resize(rgb, (mw, mh), interpolation=cv2.INTER_NEAREST)  # enough for a mean colour
    glass = cv2.mean(small_rgb, mask=1 - m)[:3] if cv2.countNonZero(m) < m.size else (255.0, 255.0, 255.0)
    info = {
        "coverage": cv2.countNonZero(big) / big.size,
        "threshold": float(threshold),
        "fallback": fallback,
        "glass": [float(v) for v in glass],
        "centre": ((cx + 0.5) * w / mw - 0.5, (cy + 0.5) * h / mh - 0.5),  # in the image's pixels
    }
    return big.view(bool), info


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` centre of mass of a ``(H, W)`` weight image (bool or float); the centre if it is empty."""
    img = image.view(np.uint8) if image.dtype == bool else image
    mom = cv2.moments(img, binaryImage=image.dtype == bool)
    if mom["m00"] <= 0:
        h, w = image.shape[:2]
        return (w - 1) / 2, (h - 1) / 2
    return mom["m10"] / mom["m00"], mom["m01"] / mom["m00"]
