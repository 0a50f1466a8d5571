"""The shared preprocessing stage (Algorithm 1, steps 1-6): runs once per pair, before every method.

``prepare_pair(source, target, params, full=True)`` returns a :class:`PreparedPair`: both images in a
common *working frame* (one constant resampling factor per pair), tissue masks, and the transform the
stage already applied to the source (centre-of-mass translation, initial rotation, optional flip).
``full=False`` is the light stage for methods that do not use the shared preprocessing: load, resample,
grayscale, invert only (no mask, no rotation, the moving image keeps its own shape).

Steps of the full stage (see ``docs/preprocessing.md``):

1. read both headers, pick ``factor = working_size / longer side of the larger image`` (never above 1
   unless ``upsample``), decode each image reduced as far as possible (:mod:`bench.imageio`) and resample
   it with ``cv2.INTER_AREA`` by that factor, keeping the exact per-axis scales;
2. grayscale and invert (tissue bright);
3. tissue mask: smoothed Laplacian magnitude, thresholded, cleaned by morphology (:func:`tissue_mask`);
   the background is set to 0;
4. initial rotation (:func:`rotation_search`): the source's tissue centre of mass onto the target's, then
   every angle of the full circle at once (one batch of warps by ``cv2.remap`` on stacked sampling maps,
   global NCC, each angle at its best shift by one batched FFT cross-correlation), refined around the
   best coarse angles; optionally the mirrored source too;
5. the source (colour, mask, image) is warped by the result ``source_pre`` into the target's frame.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import geometry
from bench.imageio import ImageLoadError, LoadedImage, load_image, read_size, target_size
from bench.method import ImageView

__all__ = [
    "STAGE_VERSION",
    "ImageLoadError",
    "PreparedPair",
    "PreprocessParams",
    "params_dict",
    "prepare_pair",
    "rotation_search",
    "texture_mi",
    "tissue_mask",
    "view_from",
]

STAGE_VERSION = "1.2"  # 1.1: the moving view carries its field of view (ImageView.valid); 1.2: flip test
# on by default, decided by NCC and, when the NCC is close, by the band-passed texture MI


@dataclass(frozen=True)
class PreprocessParams:
    """Typed, defaulted parameters of the shared preprocessing (``--set preprocess.X=...``).

    The mask step works on an image of ``mask_size`` pixels whatever the working size: its Gaussian
    widths and ``mask_shrink`` are in those pixels, its other lengths fractions of that image's longer
    side. Defaults were chosen on generated data only (``docs/preprocessing.md``).
    """

    # resampling
    working_size: int = 1024  # longer side of the larger image after resampling, pixels
    upsample: bool = False  # allow factor > 1 for images smaller than working_size
    smoothing_sigma: float = 0.0  # extra Gaussian on the working grayscale (INTER_AREA already anti-aliases)
    # tissue mask
    mask: bool = True  # False: every pixel is tissue
    mask_size: int = 256  # longer side of the mask before it is resized to the working size, pixels
    mask_sigma: float = 1.0  # Gaussian before the Laplacian (measured at 2 x mask_size), pixels
    mask_energy_sigma: float = 1.0  # Gaussian on |Laplacian| after halving to mask_size, pixels
    mask_min_energy: float = 0.003  # absolute floor of the threshold on the smoothed |Laplacian|
    mask_shrink: float = 2.0  # erosion after filling, mask pixels: undoes the smoothing halo
    mask_close: float = 0.02  # closing radius, fraction of the mask's longer side
    mask_open: float = 0.004  # opening radius, fraction
    mask_min_area: float = 0.002  # components smaller than this fraction of the image are dropped
    mask_border_thickness: float = 0.025  # border-touching components thinner than this are dropped
    mask_min_coverage: float = 0.01  # a mask covering less than this falls back to the whole image
    background_subtract: bool = True  # subtract the glass level so the background sits at 0
    # initial rotation
    rotation: bool = True  # False: centre-of-mass translation only
    rotation_size: int = 64  # longer side of the images for the coarse search, pixels
    angle_step_deg: float = 5.0  # coarse angle step over the full circle
    refine: bool = True  # refine around the best coarse angles
    refine_size: int = 96  # longer side of the images for the refinement, pixels
    refine_step_deg: float = 1.0  # fine angle step (then a parabola through the peak)
    refine_candidates: int = 2  # coarse local maxima refined, per mirror state
    translation_search: bool = True  # best shift of each candidate angle (FFT), not only the centres
    max_shift: float = 0.25  # largest shift searched, fraction of the longer side
    scale_hint: bool = True  # also search at the tissue areas' scale ratio (the result stays rigid)
    flip_test: bool = True  # also search the mirrored source (a slide scanned face down)
    flip_margin: float = 0.1  # NCC lead with which the mirrored source wins outright
    flip_mi_band: float = 0.03  # NCC leads in (-flip_mi_band, flip_margin]: the texture MI decides
    flip_mi_size: int = 256  # image size (longer side, px) of the texture MI of the flip test

    def __post_init__(self) -> None:
        positive = ("working_size", "mask_size", "rotation_size", "refine_size", "angle_step_deg",
                    "refine_step_deg", "refine_candidates", "flip_mi_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"preprocess.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("smoothing_sigma", "mask_sigma", "mask_energy_sigma", "mask_min_energy", "mask_close",
                     "mask_open", "mask_shrink", "mask_min_area", "mask_border_thickness", "mask_min_coverage",
                     "flip_margin", "flip_mi_band", "max_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"preprocess.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class PreparedPair:
    """Output of the stage for one pair (all arrays in the working frame).

    Attributes
    ----------
    fixed : the target, ``(h_t, w_t)`` arrays
    moving : the source already transformed by ``source_pre`` into the target's frame, so of shape
        ``(h_t, w_t)`` (light stage: the resampled source in its own ``(h_s, w_s)`` frame)
    source_scale, target_scale : ``(sx, sy)`` original pixels -> working pixels (pixel-centre convention)
    source_pre : (3, 3) resampled source -> working target frame, already applied to ``moving``
    source_shape, target_shape : original ``(H, W)``
    diagnostics : JSON-serialisable facts (angle_deg, flipped, ncc_before/after, factor, timings ...)
    """

    fixed: ImageView
    moving: ImageView
    source_scale: tuple[float, float]
    target_scale: tuple[float, float]
    source_pre: np.ndarray = field(default_factory=lambda: np.eye(3))
    source_shape: tuple[int, int] = (0, 0)
    target_shape: tuple[int, int] = (0, 0)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_original(self, estimate: np.ndarray) -> np.ndarray:
        """(3, 3) matrix in original pixel coordinates (source -> target) for a working-frame estimate."""
        return geometry.to_original(
            estimate,
            source_scale=self.source_scale,
            target_scale=self.target_scale,
            source_pre=self.source_pre,
        )

    def to_working(self, original: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_original`: an original-pixel matrix (source -> target) as a working-frame
        estimate (moving -> fixed), e.g. to judge an ``Estimate(frame="original")`` on the working images."""
        r_s = geometry.resample_matrix(*self.source_scale)
        r_t = geometry.resample_matrix(*self.target_scale)
        pre = np.eye(3) if self.source_pre is None else geometry.as_3x3(self.source_pre)
        return r_t @ geometry.as_3x3(original) @ np.linalg.inv(pre @ r_s)


def params_dict(params: PreprocessParams) -> dict[str, Any]:
    """The parameters as a plain dict (for run.json and cache keys)."""
    return dataclasses.asdict(params)


# ---------------------------------------------------------------------------------------------
# step 1-2: load, resample, grayscale


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


def _prime_allocator() -> None:
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
class _Image:
    """One image through the per-image steps (load, resample, mask, view) and their timings."""

    loaded: LoadedImage
    view: ImageView
    info: dict[str, Any]
    load_s: float
    mask_s: float


def _one_image(path: Path, shape: tuple[int, int], factor: float, params: PreprocessParams,
               full: bool) -> _Image:
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
    glass = _glass_level(info["glass"], params) if full else 0.0
    view = view_from(img.rgb, mask, glass, params)
    return _Image(img, view, info, t1 - t0, time.perf_counter() - t1)


def _both(source: Path, target: Path, params: PreprocessParams, full: bool) -> tuple[_Image, _Image, float]:
    """The per-image steps of both images at the pair's one factor: ``(source, target, factor)``.

    (Run one after the other: two threads were slower on the shared two-core machines this was
    measured on, and the runner already runs pairs in parallel processes.)
    """
    shapes = read_size(source), read_size(target)
    factor = pair_factor(shapes[0], shapes[1], params)
    src, tgt = (_one_image(p, sh, factor, params, full) for p, sh in zip((source, target), shapes, strict=True))
    return src, tgt, factor


# ---------------------------------------------------------------------------------------------
# step 3: tissue mask


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


# ---------------------------------------------------------------------------------------------
# step 4: initial rotation


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` centre of mass of a ``(H, W)`` weight image (bool or float); the centre if it is empty."""
    img = image.view(np.uint8) if image.dtype == bool else image
    mom = cv2.moments(img, binaryImage=image.dtype == bool)
    if mom["m00"] <= 0:
        h, w = image.shape[:2]
        return (w - 1) / 2, (h - 1) / 2
    return mom["m10"] / mom["m00"], mom["m01"] / mom["m00"]


def _linear(angle_deg: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """``(N, 3, 3)`` rotations (geometry.rotation convention) after an optional mirror ``x -> -x``."""
    a = np.deg2rad(np.asarray(angle_deg, np.float64))
    c, s = np.cos(a), np.sin(a)
    f = np.where(np.asarray(flipped, bool), -1.0, 1.0)
    m = np.zeros((a.size, 3, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = c * f, s, -s * f, c, 1.0
    return m


def candidate_matrices(angle_deg, flipped, c_src, c_tgt, scale: float = 1.0) -> np.ndarray:
    """``(N, 3, 3)`` source -> target maps: move ``c_src`` onto ``c_tgt``, mirror, rotate (and scale) about it.

    ``T = translation(c_tgt) . scaling(scale) . rotation(angle) . mirror . translation(-c_src)``.
    """
    lin = _linear(np.atleast_1d(angle_deg), np.broadcast_to(flipped, np.atleast_1d(angle_deg).shape))
    return geometry.translation(*c_tgt) @ geometry.scaling(scale) @ lin @ geometry.translation(-c_src[0], -c_src[1])


def warp_batch(source: np.ndarray, shape: tuple[int, int], matrices: np.ndarray) -> np.ndarray:
    """``source`` warped by each of ``matrices`` into a frame of ``shape``, in a few remap calls.

    Parameters
    ----------
    source : (Hs, Ws) float32
    shape : (Ht, Wt) of the output frame
    matrices : (N, 3, 3) source pixel -> output pixel maps

    Returns
    -------
    (N, Ht, Wt) float32, bilinear, 0 outside the source.

    The sampling maps of the whole batch are built by broadcasting and stacked into one tall image, so
    ``cv2.remap`` warps many candidates per call (chunks of at most 32000 rows, OpenCV's limit).
    """
    ht, wt = shape
    inv = np.linalg.inv(np.asarray(matrices, np.float64))[:, :2].astype(np.float32)  # out px -> source px
    xs = np.arange(wt, dtype=np.float32)
    ys = np.arange(ht, dtype=np.float32)[:, None]
    mx = inv[:, 0, 0, None, None] * xs + (inv[:, 0, 1, None, None] * ys + inv[:, 0, 2, None, None])
    my = inv[:, 1, 0, None, None] * xs + (inv[:, 1, 1, None, None] * ys + inv[:, 1, 2, None, None])
    n = len(inv)
    out = np.empty((n, ht, wt), np.float32)
    per = max(1, 32000 // ht)
    src = np.ascontiguousarray(source, np.float32)
    for i in range(0, n, per):
        k = min(per, n - i)
        cv2.remap(src, mx[i: i + k].reshape(k * ht, wt), my[i: i + k].reshape(k * ht, wt), cv2.INTER_LINEAR,
                  dst=out[i: i + k].reshape(k * ht, wt), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def _stats_ncc(warped: np.ndarray, target: np.ndarray) -> np.ndarray:
    """NCC of each ``(N, P)`` warped image with the ``(P,)`` target (no BLAS: einsum, single thread)."""
    t = target.astype(np.float32) - np.float32(target.mean())
    n = t.size
    cov = np.einsum("np,p->n", warped, t).astype(np.float64)
    total = np.einsum("np->n", warped).astype(np.float64)
    var_s = np.einsum("np,np->n", warped, warped).astype(np.float64) - total**2 / n
    var_t = float(np.einsum("p,p->", t, t))
    return cov / np.sqrt(np.maximum(var_s, 1e-12) * max(var_t, 1e-12))


def ncc_batch(source: np.ndarray, target: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Global NCC between ``target`` and ``source`` warped by each of ``matrices``, all in one batch.

    Parameters
    ----------
    source : (Hs, Ws) float32
    target : (Ht, Wt) float32
    matrices : (N, 3, 3) source pixel -> target pixel maps

    Returns
    -------
    (N,) float64 NCC over the target frame (the source is 0 outside its frame).
    """
    warped = warp_batch(source, target.shape, matrices).reshape(len(matrices), -1)
    return _stats_ncc(warped, target.reshape(-1))


def shift_batch(warped: np.ndarray, target: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """For each warped image, the translation that best moves it onto ``target`` and the NCC there.

    Cross-correlation of the zero-mean images by one batched FFT (zero padding: no wrap-around within
    the allowed range), searched within ``|dx|, |dy| <= max_shift`` pixels, a parabola through the peak
    along each axis for sub-pixel precision. The NCC is normalised by the whole images' energies.

    Parameters
    ----------
    warped : (N, H, W) float32
    target : (H, W) float32
    max_shift : largest shift searched, pixels

    Returns
    -------
    shifts : (N, 2) ``(dx, dy)`` pixels
    ncc : (N,) float64
    """
    from scipy import fft

    n, h, w = warped.shape
    m = int(max(1, min(max_shift, max(h, w) - 1)))
    size = (fft.next_fast_len(h + m, real=True), fft.next_fast_len(w + m, real=True))
    a = warped - warped.mean(axis=(1, 2), keepdims=True)
    b = target - target.mean()
    norm = np.sqrt(np.einsum("nhw,nhw->n", a, a).astype(np.float64) * float((b * b).sum()))
    spec = fft.rfft2(a, size, axes=(1, 2))
    del a
    np.conjugate(spec, out=spec)  # in place: fewer large temporaries (page faults are costly here)
    spec *= fft.rfft2(b, size)
    corr = fft.irfft2(spec, size, axes=(1, 2))
    del spec
    d = np.r_[-m: m + 1]
    win = corr[:, d % size[0]][:, :, d % size[1]] / np.maximum(norm, 1e-12)[:, None, None]  # (N, dy, dx)
    flat = win.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, win.shape[1:])
    k = np.arange(n)
    peak = win[k, iy, ix]

    def offset(lo, hi):  # vectorised parabola through (lo, peak, hi)
        den = lo - 2 * peak + hi
        ok = den < 0
        return np.where(ok, np.clip(0.5 * (lo - hi) / np.where(ok, den, -1.0), -0.5, 0.5), 0.0)

    last = 2 * m
    oy = offset(win[k, np.maximum(iy - 1, 0), ix], win[k, np.minimum(iy + 1, last), ix])
    ox = offset(win[k, iy, np.maximum(ix - 1, 0)], win[k, iy, np.minimum(ix + 1, last)])
    oy[(iy == 0) | (iy == last)] = 0.0
    ox[(ix == 0) | (ix == last)] = 0.0
    return np.stack([d[ix] + ox, d[iy] + oy], axis=1), peak.astype(np.float64)


def _local_maxima(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest circular local maxima of a 1-D array (highest first)."""
    is_max = (values >= np.roll(values, 1)) & (values >= np.roll(values, -1))
    idx = np.flatnonzero(is_max)
    return idx[np.argsort(values[idx])[::-1][:k]]


def _parabola_peak(values: np.ndarray, i: int) -> float:
    """Sub-sample offset (in [-0.5, 0.5]) of the peak of a parabola through ``values[i-1:i+2]``."""
    if i <= 0 or i >= len(values) - 1:
        return 0.0
    y0, y1, y2 = values[i - 1], values[i], values[i + 1]
    den = y0 - 2 * y1 + y2
    return float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) if den < 0 else 0.0


def _reduce(image: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Image resized by about ``r`` and its exact (3, 3) resample matrix (original px -> reduced px).

    Halvings by ``cv2.pyrDown`` (Gaussian, fast; pixel ``i`` sits at ``2 i``) while more than 2x too
    large, then ``cv2.INTER_AREA`` the rest of the way (pixel-centre convention).
    """
    if r >= 1:
        return image, np.eye(3)
    h, w = image.shape[:2]
    nw, nh = target_size((h, w), r)
    matrix = np.eye(3)
    while image.shape[1] >= 2 * nw and image.shape[0] >= 2 * nh:
        image = cv2.pyrDown(image)
        matrix = geometry.scaling(0.5) @ matrix
    ih, iw = image.shape[:2]
    if (iw, ih) != (nw, nh):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        matrix = geometry.resample_matrix(nw / iw, nh / ih) @ matrix
    return image, matrix


class _Level:
    """Source and target reduced by one factor; scores candidate working-frame matrices there."""

    def __init__(self, source: np.ndarray, target: np.ndarray, size: int, params: PreprocessParams,
                 finer: _Level | None = None) -> None:
        side = max(*source.shape, *target.shape)
        if finer is not None and size < max(*finer.s.shape, *finer.t.shape):  # reduce the finer level
            sub = size / max(*finer.s.shape, *finer.t.shape)
            (self.s, rs), (self.t, rt) = _reduce(finer.s, sub), _reduce(finer.t, sub)
            self.rs, self.rt = rs @ finer.rs, rt @ finer.rt
        else:
            self.s, self.rs = _reduce(source, size / side)
            self.t, self.rt = _reduce(target, size / side)
        self.max_shift = params.max_shift * max(self.t.shape)

    def warp(self, matrices: np.ndarray) -> np.ndarray:
        return warp_batch(self.s, self.t.shape, self.rt @ matrices @ np.linalg.inv(self.rs))

    def ncc(self, matrices: np.ndarray) -> np.ndarray:
        """(N,) NCC of the source warped by each working-frame matrix."""
        return _stats_ncc(self.warp(matrices).reshape(len(matrices), -1), self.t.reshape(-1))

    def shifted(self, matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) best NCC over shifts and (N, 2) the working-frame shift giving it."""
        shifts, ncc = shift_batch(self.warp(matrices), self.t, self.max_shift)
        return ncc, shifts / [self.rt[0, 0], self.rt[1, 1]]


def rotation_search(
    source: np.ndarray,
    target: np.ndarray,
    c_src: tuple[float, float],
    c_tgt: tuple[float, float],
    params: PreprocessParams | None = None,
    scale_hint: float | None = None,
    source_mask: np.ndarray | None = None,
    target_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Initial rotation: ``c_src`` onto ``c_tgt``, then the full circle of angles by global NCC.

    1. coarse: every ``angle_step_deg`` about the centres (and, with ``flip_test``, the mirrored source
       too) at ``rotation_size``, all in one batch. With ``translation_search`` each angle is scored at
       the shift that maximises its NCC (one batched FFT cross-correlation, shifts up to ``max_shift`` of
       the side): a centre of mass is only as good as the masks, and tissue that fills the frame has none;
    2. refine: around the ``refine_candidates`` best local maxima of each mirror state, every
       ``refine_step_deg`` within half a coarse step (plus one fine step) at ``refine_size`` (shift
       kept), one batch; a parabola through the peak gives the angle;
    3. with ``translation_search``, each candidate's shift again at ``refine_size``; the best candidate
       of each mirror state wins.

    ``scale_hint`` (target / source size of the tissue, e.g. from the masks' areas): when it differs from
    1 by more than 5 %, every step also runs with the source scaled by it, and the better NCC wins. The
    scale only steadies the search: the returned matrix is rigid (mirror aside), as in the paper.
    With ``flip_test`` the best candidate of each mirror state is kept and the mirrored one wins when its
    NCC leads by more than ``flip_margin``; when the lead is in ``(-flip_mi_band, flip_margin]`` (a close
    call: a global NCC of masked images is dominated by the tissue outline, which a mirror barely changes)
    the band-passed texture MI of the two candidates decides (:func:`texture_mi`); below, the unmirrored
    source stays.

    Parameters
    ----------
    source, target : (Hs, Ws), (Ht, Wt) float32 working-frame images (masked, tissue bright)
    c_src, c_tgt : (x, y) tissue centres in each image
    scale_hint : optional relative scale to search at besides 1
    source_mask, target_mask : optional bool tissue masks for the flip test's texture MI (default
        ``image > 0``)

    Returns
    -------
    matrix : (3, 3) source -> target in the working frame
    info : angle_deg, flipped, shift (working px, after the centre move), search_scale, ncc_before
        (identity), ncc_com (centres only), ncc_after, ncc_flipped / ncc_unflipped (best of each
        mirror state), branches (each mirror state's best candidate: angle_deg, shift, search_scale, ncc),
        flip_lead (ncc_flipped - ncc_unflipped), flip_decision ("off", "ncc" or "texture"),
        mi_flipped / mi_unflipped (the texture MI, when it decided), rotation_coarse_s / rotation_refine_s
    """
    params = params or PreprocessParams()
    rotate, shifts = params.rotation, params.translation_search
    step, fine = params.angle_step_deg, min(params.refine_step_deg, params.angle_step_deg)
    scales = [1.0]
    if scale_hint is not None and rotate and abs(np.log(scale_hint)) > np.log(1.05):
        scales.append(float(scale_hint))
    states = [(f, sc) for f in ((False, True) if params.flip_test and rotate else (False,)) for sc in scales]
    coarse = np.arange(0.0, 360.0, step) if rotate else np.zeros(1)
    t0 = time.perf_counter()
    # 1. coarse, every (mirror, scale) state in one batch
    fine_level = _Level(source, target, params.refine_size, params)
    level = _Level(source, target, params.rotation_size, params, finer=fine_level)
    mats = np.concatenate([candidate_matrices(coarse, f, c_src, c_tgt, sc) for f, sc in states])
    ncc, shift = level.shifted(mats) if shifts else (level.ncc(mats), np.zeros((len(mats), 2)))
    ncc, shift = ncc.reshape(len(states), -1), shift.reshape(len(states), len(coarse), 2)
    t1 = time.perf_counter()
    k = params.refine_candidates if rotate and params.refine else 1
    cands = [(float(coarse[j]), f, sc, shift[i, j]) for i, (f, sc) in enumerate(states)
             for j in _local_maxima(ncc[i], k)]
    # 2. refine every candidate's angle (its coarse shift applied), one batch
    reach = fine * np.ceil((step / 2 + fine) / fine)  # the peak lies within half a coarse step
    offsets = np.arange(-reach, reach + fine / 2, fine) if rotate and params.refine else np.zeros(1)
    record = [np.eye(3), candidate_matrices(0.0, False, c_src, c_tgt)[0]]  # identity, centres only
    mats = np.concatenate([geometry.translation(*d) @ candidate_matrices(a + offsets, f, c_src, c_tgt, sc)
                           for a, f, sc, d in cands] + [np.stack(record)])
    ncc2 = fine_level.ncc(mats)
    n_off = len(offsets)
    refined = []  # (angle, flipped, scale, shift, ncc) of each candidate
    for i, (a, f, sc, d) in enumerate(cands):
        vals = ncc2[i * n_off: (i + 1) * n_off]
        j = int(np.argmax(vals))
        angle = a + offsets[j] + (_parabola_peak(vals, j) * fine if n_off > 1 else 0.0)
        refined.append(((angle + 180.0) % 360.0 - 180.0, f, sc, d, float(vals[j])))
    # 3. every candidate's shift again at the finer size, so candidates compare at their best
    if shifts:
        mats = np.stack([geometry.translation(*d) @ candidate_matrices(a, f, c_src, c_tgt, sc)[0]
                         for a, f, sc, d, _ in refined])
        ncc3, shift3 = fine_level.shifted(mats)
        refined = [(a, f, sc, d + shift3[i], float(ncc3[i])) for i, (a, f, sc, d, _) in enumerate(refined)]
    best: dict[bool, tuple[float, float, np.ndarray, float]] = {}
    for a, f, sc, d, v in refined:
        if f not in best or v > best[f][3]:
            best[f] = (a, sc, d, v)
    flipped, decision, lead, mi = False, "off", None, {}
    if True in best:
        lead = best[True][3] - best[False][3]
        decision = "ncc"
        if lead > params.flip_margin:
            flipped = True
        elif lead > -params.flip_mi_band:  # a close call: the texture inside the tissue decides
            decision = "texture"
            mats = np.stack([geometry.translation(*best[f][2]) @ candidate_matrices(best[f][0], f, c_src, c_tgt)[0]
                             for f in (False, True)])
            values = texture_mi(source, target, mats, params.flip_mi_size, source_mask=source_mask,
                                target_mask=target_mask)
            mi = {"mi_unflipped": float(values[0]), "mi_flipped": float(values[1])}
            flipped = bool(values[1] > values[0])
    angle, scale, shift_w, ncc_after = best[flipped]
    # rigid result: the search scale is dropped about the matched point, which stays where it was put
    matrix = geometry.translation(*shift_w) @ candidate_matrices(angle, flipped, c_src, c_tgt)[0]
    info = {
        "angle_deg": float(angle),
        "flipped": bool(flipped),
        "shift": [float(v) for v in shift_w],
        "search_scale": float(scale),
        "ncc_before": float(ncc2[-2]),
        "ncc_com": float(ncc2[-1]),
        "ncc_after": float(ncc_after),
        "ncc_flipped": float(best[True][3]) if True in best else None,
        "ncc_unflipped": float(best[False][3]),
        "flip_lead": None if lead is None else float(lead),
        "flip_decision": decision,
        "mi_flipped": mi.get("mi_flipped"),
        "mi_unflipped": mi.get("mi_unflipped"),
        "branches": {("flipped" if f else "unflipped"): {"angle_deg": float(a), "shift": [float(v) for v in d],
                                                          "search_scale": float(sc), "ncc": float(v)}
                     for f, (a, sc, d, v) in best.items()},
        "rotation_coarse_s": t1 - t0,
        "rotation_refine_s": time.perf_counter() - t1,
    }
    return matrix, info


def _rank_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin index (0 .. bins-1) of each value (edges from one ``np.partition``): a rank
    transform, so any monotonic or non-monotonic relation between two stains' intensities can show up in
    their joint histogram."""
    kth = (np.arange(1, bins) * values.size) // bins
    edges = np.partition(values, kth)[kth]
    return np.searchsorted(edges, values, side="right")


def texture_mi(source: np.ndarray, target: np.ndarray, matrices: np.ndarray, size: int = 256,
               sigma: float = 2.0, bins: int = 16, source_mask: np.ndarray | None = None,
               target_mask: np.ndarray | None = None, max_samples: int = 20000) -> np.ndarray:
    """Mutual information (nats) of the band-passed texture of ``target`` and of ``source`` warped by each
    working-frame matrix, inside the common tissue away from its outline: the flip test's tie-breaker.

    Both images are reduced to ``size`` px (longer side of the larger), band-passed by a difference of
    Gaussians (``sigma`` minus ``4 sigma``, pixels of that size), so the tissue outline and slow stain
    gradients (what a global NCC of masked images mostly measures) drop out and the structure inside the
    tissue remains; the masks (default: the images' non-zero pixels) are eroded by ``3 sigma`` so the
    outline's own band-pass response does not count. Rank-binned MI (``bins`` equal-frequency bins per
    image) allows any relation between the two stains. 0 when the common tissue has under 200 pixels.

    Parameters
    ----------
    source, target : (Hs, Ws), (Ht, Wt) float32 working-frame images (masked, tissue bright)
    matrices : (N, 3, 3) source -> target working-frame maps
    source_mask, target_mask : bool masks of the two images, or None (``image > 0``)

    Returns
    -------
    (N,) float64
    """
    r = size / max(*source.shape, *target.shape)
    out = []
    reduced = []
    for img, mask in ((source, source_mask), (target, target_mask)):
        small, rm = _reduce(np.ascontiguousarray(img, np.float32), r)
        m = np.ascontiguousarray((img > 0) if mask is None else mask, bool)
        m = cv2.resize(m.view(np.uint8), small.shape[::-1], interpolation=cv2.INTER_NEAREST)
        k = 2 * int(round(3 * sigma)) + 1
        core = cv2.erode(m, np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        bp = cv2.GaussianBlur(small, (0, 0), sigma) - cv2.GaussianBlur(small, (0, 0), 4 * sigma)
        reduced.append((bp, core, rm))
    (bs, cs, rs), (bt, ct, rt) = reduced
    h, w = bt.shape
    for matrix in np.asarray(matrices, np.float64).reshape(-1, 3, 3):
        m2 = (rt @ matrix @ np.linalg.inv(rs))[:2]
        warped = cv2.warpAffine(bs, m2, (w, h), flags=cv2.INTER_LINEAR)
        common = cv2.warpAffine(cs, m2, (w, h), flags=cv2.INTER_NEAREST) & ct
        ys, xs = np.nonzero(common)
        if ys.size < 200:
            out.append(0.0)
            continue
        step = max(1, ys.size // max_samples)
        ys, xs = ys[::step], xs[::step]
        qa, qb = _rank_bins(bt[ys, xs], bins), _rank_bins(warped[ys, xs], bins)
        joint = np.bincount(qa * bins + qb, minlength=bins * bins).reshape(bins, bins) / qa.size
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        out.append(float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum()))
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# the stage


def _warp_moving(rgb: np.ndarray, mask: np.ndarray, matrix: np.ndarray, shape: tuple[int, int],
                 glass: tuple[float, float, float], params: PreprocessParams) -> ImageView:
    """The moving view in the target's frame: colour (bilinear, glass outside), mask and field of view (nearest)."""
    h, w = shape
    border = tuple(int(round(v)) for v in glass)
    moved_rgb = cv2.warpAffine(rgb, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderValue=border)
    moved_mask = cv2.warpAffine(mask.view(np.uint8), matrix[:2], (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    valid = cv2.warpAffine(np.ones(rgb.shape[:2], np.uint8), matrix[:2], (w, h), flags=cv2.INTER_NEAREST,
                           borderValue=0)
    return view_from(moved_rgb, moved_mask.view(bool), _glass_level(glass, params), params, valid.view(bool))


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


def _glass_level(glass, params: PreprocessParams) -> float:
    """Inverted gray level of a background colour (cv2's luma weights); 0 without background_subtract."""
    if not params.background_subtract:
        return 0.0
    r, g, b = glass
    return 1.0 - (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def prepare_pair(
    source: str | Path,
    target: str | Path,
    params: PreprocessParams | None = None,
    *,
    full: bool = True,
) -> PreparedPair:
    """Run the shared preprocessing on one pair of image files.

    Parameters
    ----------
    source, target : image paths (the source is registered onto the target)
    params : stage parameters (defaults when None)
    full : True: the paper's stage (mask, initial rotation); False: load, resample, gray, invert only

    Returns
    -------
    PreparedPair; ``moving`` is in the target's working frame when ``full`` (shape ``(h_t, w_t)``).

    Raises
    ------
    ImageLoadError : a file is missing, unreadable, empty or of one flat colour
    """
    params = params or PreprocessParams()
    source, target = Path(source), Path(target)
    _prime_allocator()
    t0 = time.perf_counter()
    a, b, factor = _both(source, target, params, full)
    src, tgt = a.loaded, b.loaded
    t_images = time.perf_counter()
    diag: dict[str, Any] = {
        "stage_version": STAGE_VERSION,
        "full": bool(full),
        "factor": float(factor),
        "decode_source": src.how,
        "decode_target": tgt.how,
        "working_shape_source": list(src.rgb.shape[:2]),
        "working_shape_target": list(tgt.rgb.shape[:2]),
        "load_s": a.load_s + b.load_s,
        "mask_s": a.mask_s + b.mask_s,
        "images_s": t_images - t0,  # wall time of the per-image steps
    }
    common = {
        "source_scale": src.scale,
        "target_scale": tgt.scale,
        "source_shape": src.original_shape,
        "target_shape": tgt.original_shape,
    }
    if not full:
        diag["time_s"] = time.perf_counter() - t0
        return PreparedPair(fixed=b.view, moving=a.view, source_pre=np.eye(3), diagnostics=diag, **common)

    c_src, c_tgt = a.info["centre"], b.info["centre"]
    hint = None
    if params.scale_hint and params.mask and not (a.info["fallback"] or b.info["fallback"]):
        areas = [x.view.mask.size * x.info["coverage"] for x in (a, b)]
        hint = float(np.clip(np.sqrt(areas[1] / max(areas[0], 1.0)), 0.8, 1.25))
    pre, rot = rotation_search(a.view.image, b.view.image, c_src, c_tgt, params, scale_hint=hint,
                               source_mask=a.view.mask, target_mask=b.view.mask)
    t_rot = time.perf_counter()
    moving = _warp_moving(src.rgb, a.view.mask, pre, tgt.rgb.shape[:2], a.info["glass"], params)
    fixed = b.view
    t_end = time.perf_counter()
    infos = [a.info, b.info]
    diag.update(
        rot,
        mask_coverage_source=infos[0]["coverage"],
        mask_coverage_target=infos[1]["coverage"],
        mask_fallback_source=infos[0]["fallback"],
        mask_fallback_target=infos[1]["fallback"],
        centre_source=[float(c) for c in c_src],
        centre_target=[float(c) for c in c_tgt],
        glass_level_moving=_glass_level(infos[0]["glass"], params),
        glass_level_fixed=_glass_level(infos[1]["glass"], params),
        rotation_s=t_rot - t_images,
        warp_s=t_end - t_rot,
        time_s=t_end - t0,
    )
    return PreparedPair(fixed=fixed, moving=moving, source_pre=pre, diagnostics=diag, **common)
