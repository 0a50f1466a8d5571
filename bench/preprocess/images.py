"""Steps 1-2 of the stage, per image: the pair's one resampling factor, load and resample, grayscale and
inversion, the tissue mask (:mod:`bench.preprocess.masks`), and the :class:`~bench.method.ImageView` made from
them (:func:`view_from`, the one place the float image is made)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.imageio import ImageLoadError, LoadedImage, load_image, read_size, target_size
from bench.method import ImageView
from bench.preprocess.masks import tissue_mask
from bench.preprocess.params import PreprocessParams


def pair_factor(source_shape: tuple[int, int], target_shape: tuple[int, int], params: PreprocessParams) -> float:
    """The one resampling factor of a pair: working_size over the longer side of the larger image.

    >>> pair_factor((9000, 12000), (8000, 11000), PreprocessParams(working_size=1200))
    0.1
    >>> pair_factor((600, 800), (500, 700), PreprocessParams(working_size=1200))  # never upsampled
    1.0
    """
    factor = params.working_size / max(*source_shape, *target_shape)
    return factor if params.upsample else min(1.0, factor)


def inversion_lut(glass: float = 0.0) -> np.ndarray:
    """(256,) float32 table: gray level -> inverted intensity with the glass level ``glass`` moved to 0.

    ``lut[v] = clip(((1 - v / 255) - glass) / (1 - glass), 0, 1)``.

    >>> inversion_lut()[[0, 255]].tolist(), inversion_lut(0.2)[[0, 204, 255]].tolist()
    ([1.0, 0.0], [1.0, 0.0, 0.0])
    """
    inv = 1.0 - np.arange(256, dtype=np.float64) / 255.0
    glass = float(np.clip(glass, 0.0, 0.9))
    return np.clip((inv - glass) / (1.0 - glass), 0.0, 1.0).astype(np.float32)


def gray_inverted(rgb: np.ndarray, sigma: float = 0.0, mask: np.ndarray | None = None,
                  glass: float = 0.0) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` float32 in [0, 1], inverted (tissue bright, glass dark).

    With ``mask`` ((H, W) bool) the pixels outside it are 0; ``glass`` (an inverted gray level) is
    subtracted and the rest stretched back to [0, 1] (:func:`inversion_lut`).
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if mask is not None:
        outside = cv2.threshold(mask.view(np.uint8), 0, 255, cv2.THRESH_BINARY_INV)[1]
        gray = cv2.bitwise_or(gray, outside)  # outside -> white -> 0
    out = cv2.LUT(gray, inversion_lut(glass))
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
        if mask is not None:
            out[~mask] = 0.0
    return out


_ALLOCATOR_PRIMED = False


def prime_allocator() -> None:
    """Once per process: let glibc keep freed large blocks instead of unmapping them after every use.

    glibc serves blocks above its mmap threshold (128 KiB at start) by mmap and returns them on free, so
    every large temporary of the rotation search page-faults afresh; on this project's virtual machines
    that cost about as much as the arithmetic. Freeing one mmapped block just under 32 MiB raises the
    dynamic threshold to that size (glibc's documented behaviour, M_MMAP_THRESHOLD), after which such
    temporaries are recycled from the heap. Memory is never touched; elsewhere this is a no-op.
    """
    global _ALLOCATOR_PRIMED
    if not _ALLOCATOR_PRIMED:
        _ALLOCATOR_PRIMED = True
        block = np.empty((32 << 20) - (64 << 10), np.uint8)
        del block


@dataclass
class StagedImage:
    """One image through the per-image steps (load, resample, mask, view) and their timings."""

    loaded: LoadedImage
    view: ImageView
    info: dict[str, Any]
    load_s: float
    mask_s: float


def _one_image(path: Path, shape: tuple[int, int], factor: float, params: PreprocessParams,
               full: bool) -> StagedImage:
    t0 = time.perf_counter()
    img = load_image(path, target_size(shape, factor))
    if int(img.rgb.max()) == int(img.rgb.min()):
        raise ImageLoadError(f"{path}: image is of one flat colour (nothing to register)")
    t1 = time.perf_counter()
    h, w = img.rgb.shape[:2]
    if full and params.mask:
        mask, info = tissue_mask(img.rgb, params)
    else:
        mask = np.ones((h, w), bool)
        info = {"coverage": 1.0, "fallback": "masking off" if full else "", "glass": [255.0] * 3,
                "centre": ((w - 1) / 2, (h - 1) / 2)}
    glass = inverted_glass(info["glass"], params) if full else 0.0
    view = view_from(img.rgb, mask, glass, params)
    return StagedImage(img, view, info, t1 - t0, time.perf_counter() - t1)


def load_both(source: Path, target: Path, params: PreprocessParams,
              full: bool) -> tuple[StagedImage, StagedImage, float]:
    """The per-image steps of both images at the pair's one factor: ``(source, target, factor)``.

    (Run one after the other: two threads were slower on the shared two-core machines this was
    measured on, and the runner already runs pairs in parallel processes.)
    """
    shapes = read_size(source), read_size(target)
    factor = pair_factor(shapes[0], shapes[1], params)
    src, tgt = (_one_image(p, sh, factor, params, full) for p, sh in zip((source, target), shapes, strict=True))
    return src, tgt, factor


def view_from(rgb: np.ndarray, mask: np.ndarray, glass_level: float, params: PreprocessParams,
              valid: np.ndarray | None = None) -> ImageView:
    """An :class:`ImageView` from its colour image and mask: the one place the float image is made.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    mask : (H, W) bool (all True: nothing is masked)
    glass_level : inverted gray level of the background, subtracted (0: none)
    valid : (H, W) bool field of view, or None (everywhere; also when it is all True)
    """
    masked = None if mask.all() else mask
    valid = None if valid is None or valid.all() else valid
    return ImageView(image=gray_inverted(rgb, params.smoothing_sigma, masked, glass_level), mask=mask, rgb=rgb,
                     valid=valid)


def inverted_glass(glass, params: PreprocessParams) -> float:
    """Inverted gray level of a background colour (cv2's luma weights); 0 without background_subtract."""
    if not params.background_subtract:
        return 0.0
    r, g, b = glass
    return 1.0 - (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
