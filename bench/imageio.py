"""Image loading that scales: decode only as much as the wanted working size needs.

``load_image(path, size=(w, h))`` returns an RGB uint8 image of exactly ``(h, w)`` pixels and the exact
per-axis scales ``(sx, sy)`` that map original pixel coordinates to it with the pixel-centre convention
of ``cv2.resize`` (``x' = (x + 0.5) * sx - 0.5``, see :func:`bench.geometry.resample_matrix`).

How each format is reduced before the final anti-aliased ``cv2.INTER_AREA`` resize:

* **JPEG**: Pillow reads the size from the header, then libjpeg (``cv2.IMREAD_REDUCED_COLOR_*``) decodes
  at 1/2, 1/4 or 1/8 scale (DCT scaling). Decoded
  pixel ``i`` covers original pixels ``[d*i, d*i + d)``, the last one padded by the encoder, so the scale is
  ``w / (d * ceil(W / d))`` rather than ``w / W`` when ``W`` is not a multiple of ``d``.
* **TIFF** (tifffile): of a pyramid, the smallest level still at least as large as wanted; a tiled or
  stripped page far larger than wanted is decoded segment by segment, each band box-reduced by a power
  of two at once (bounded memory: one band of tiles, never the whole page).
* **PNG and the rest**: OpenCV decodes at full size (PNG has no reduced decoding).

Greyscale, RGB and RGBA (composited on white) inputs are accepted; 16-bit and float images are scaled to
8 bits by their maximum. Every failure is an :class:`ImageLoadError` whose one-line message names the
file and the fault.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf", ".ome.tif", ".ome.tiff")


class ImageLoadError(ValueError):
    """An image could not be read or holds nothing usable (one-line message naming the file)."""


@dataclass(frozen=True)
class LoadedImage:
    """One image at working size.

    Attributes
    ----------
    rgb : (h, w, 3) uint8 array
    original_shape : (H, W) of the file at full resolution
    scale : (sx, sy), original pixel coordinates -> ``rgb`` coordinates (pixel-centre convention)
    how : how it was decoded, e.g. ``"jpeg-dct/8"``, ``"tiff-level-2"``, ``"tiff-bands/16"``, ``"full"``
    """

    rgb: np.ndarray
    original_shape: tuple[int, int]
    scale: tuple[float, float]
    how: str


@contextlib.contextmanager
def _trusted_large_images() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the duration (slides are large and trusted)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(f"{path}: image file not found")
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: image file is empty (0 bytes)")


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"\x2a\x00", b"\x00\x2a", b"\x2b\x00", b"\x00\x2b")


def _is_jpeg(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(3) == b"\xff\xd8\xff"


def read_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only (nothing is decoded).

    Raises :class:`ImageLoadError` for a missing, empty or unreadable file.
    """
    path = Path(path)
    _check_file(path)
    try:
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape, axes = tif.series[0].shape, tif.series[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with _trusted_large_images(), Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder fault becomes one clear message
        raise ImageLoadError(f"{path}: cannot decode image header ({type(exc).__name__}: {exc})") from None


def target_size(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(w, h)`` of an image of ``shape = (H, W)`` resampled by ``factor`` (at least 1 px each).

    >>> target_size((9000, 12000), 0.085)
    (1020, 765)
    """
    h, w = shape
    return max(1, int(round(w * factor))), max(1, int(round(h * factor)))


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> LoadedImage:
    """Load an image as RGB uint8 resampled to ``size = (w, h)`` (None: full size).

    Parameters
    ----------
    path : image file (JPEG, PNG, TIFF including tiled / pyramidal, anything OpenCV reads)
    size : wanted ``(w, h)``; decoding is reduced as far as possible while staying at least that large,
        then ``cv2.INTER_AREA`` resamples the rest of the way.

    Returns
    -------
    LoadedImage with ``rgb`` of shape ``(h, w, 3)`` and the exact scales.
    """
    path = Path(path)
    _check_file(path)
    try:
        if _is_jpeg(path):
            raw, full, cover, how = _decode_jpeg(path, size)
        elif _is_tiff(path):
            raw, full, cover, how = _decode_tiff(path, size)
        else:
            raw, full, cover, how = _decode_cv2(path)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(f"{path}: not enough memory to decode image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder fault becomes one clear message
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageLoadError(f"{path}: cannot decode image ({type(exc).__name__}: {msg})") from None
    if raw.size == 0 or min(full) < 1:
        raise ImageLoadError(f"{path}: image is empty (shape {tuple(raw.shape)})")
    rgb = to_rgb8(raw)
    w, h = size if size is not None else (full[1], full[0])
    if (rgb.shape[1], rgb.shape[0]) != (w, h):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    # ``cover`` = original pixels spanned by the decoded raster per axis (x, y), padding included
    scale = (w / cover[0], h / cover[1])
    return LoadedImage(rgb=rgb, original_shape=full, scale=scale, how=how)


# ---------------------------------------------------------------------------------------------
# decoders: each returns (raw array, full (H, W), covered original extent (x, y), how)


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def _decode_jpeg(path: Path, size: tuple[int, int] | None):
    """libjpeg (through OpenCV) decodes at 1/d with d the largest of 8, 4, 2 keeping >= ``size``."""
    from PIL import Image

    with _trusted_large_images(), Image.open(path) as im:  # header only
        full_w, full_h = im.size
    with path.open("rb") as fh:  # libjpeg only warns about a truncated file and returns grey rows
        fh.seek(max(0, path.stat().st_size - 4096))
        if b"\xff\xd9" not in fh.read():
            raise ImageLoadError(f"{path}: truncated JPEG (no end-of-image marker)")
    d = 1
    if size is not None:
        d = _pow2_at_most(min(full_w / size[0], full_h / size[1]), cap=8)
    bgr = cv2.imread(str(path), _REDUCED[d] | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ImageLoadError(f"{path}: cannot decode image (corrupt or unsupported JPEG)")
    dh, dw = bgr.shape[:2]
    if (dw, dh) != (-(-full_w // d), -(-full_h // d)):
        raise ImageLoadError(f"{path}: decoded size {dw}x{dh} does not match the header's {full_w}x{full_h}")
    how = f"jpeg-dct/{d}" if d > 1 else "full"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (full_h, full_w), (d * dw, d * dh), how


def _decode_cv2(path: Path):
    data = np.fromfile(str(path), dtype=np.uint8)
    raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if raw is None:
        raise ImageLoadError(f"{path}: cannot decode image (corrupt or unsupported format)")
    if raw.ndim == 3 and raw.shape[2] >= 3:  # OpenCV gives BGR(A)
        raw = raw[..., [2, 1, 0, *range(3, raw.shape[2])]]
    h, w = raw.shape[:2]
    return raw, (h, w), (w, h), "full"


def _decode_tiff(path: Path, size: tuple[int, int] | None):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = list(series.levels) if len(series.levels) > 0 else [series]
        full_h, full_w = (int(series.shape[series.axes.index(a)]) for a in "YX")
        level, lvl_i = levels[0], 0
        if size is not None:
            for i, lv in enumerate(levels):  # smallest level still >= the wanted size
                lh, lw = (int(lv.shape[lv.axes.index(a)]) for a in "YX")
                if lw >= size[0] and lh >= size[1]:
                    level, lvl_i = lv, i
        lh, lw = (int(level.shape[level.axes.index(a)]) for a in "YX")
        k = 1
        if size is not None:
            k = _pow2_at_most(min(lw / size[0], lh / size[1]), cap=64)
        page = level.pages[0] if len(level.pages) else None
        page = page.aspage() if page is not None and hasattr(page, "aspage") else page
        if k > 1 and page is not None and _can_band_reduce(page, level):
            raw = _band_reduce(page, k)
            how = f"tiff-level-{lvl_i}-bands/{k}" if lvl_i else f"tiff-bands/{k}"
        else:
            k = 1
            raw = _as_yxs(level.asarray(), level.axes)
            how = f"tiff-level-{lvl_i}" if lvl_i else "full"
        if page is not None and page.photometric == 0:  # MINISWHITE: 0 is white
            raw = (np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else raw.max()) - raw
    dh, dw = raw.shape[:2]
    # level pixels span the whole image: its k-reduced raster covers k * dw level pixels
    cover = (k * dw * full_w / lw, k * dh * full_h / lh)
    return raw, (full_h, full_w), cover, how


def _pow2_at_most(ratio: float, cap: int) -> int:
    """Largest power of two <= ``ratio`` (at least 1, at most ``cap``).

    >>> _pow2_at_most(11.7, 64), _pow2_at_most(0.8, 64), _pow2_at_most(300, 16)
    (8, 1, 16)
    """
    if ratio < 2:
        return 1
    return int(min(cap, 2 ** math.floor(math.log2(ratio))))


def _as_yxs(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a tifffile array to (Y, X) or (Y, X, S), dropping singleton extra axes."""
    keep = [a for a in axes if a in "YXS"]
    for i in reversed(range(len(axes))):
        if axes[i] not in "YXS":
            arr = arr.take(0, axis=i)
    order = [keep.index(a) for a in "YXS" if a in keep]
    return np.transpose(arr, order)


def _can_band_reduce(page, level) -> bool:
    """Segments can be streamed: one image plane, samples contiguous (tiles or strips)."""
    extra = [a for a in level.axes if a not in "YXS"]
    shape = dict(zip(level.axes, level.shape, strict=True))
    return (
        all(shape[a] == 1 for a in extra)
        and page.planarconfig == 1  # CONTIG
        and page.imagedepth == 1
        and page.photometric in (0, 1, 2, 6)  # MINISWHITE, MINISBLACK, RGB, YCBCR (decoded to RGB)
    )


def _band_reduce(page, k: int) -> np.ndarray:
    """Decode ``page`` segment by segment, box-reducing each full band of rows by ``k`` at once.

    Returns the ``(ceil(H/k), ceil(W/k)[, S])`` raster; edges are padded by replication, so output pixel
    ``i`` covers original pixels ``[k*i, k*i + k)``.
    """
    h, w = int(page.imagelength), int(page.imagewidth)
    reducer = _RowReducer(w, k)
    band, band_y, band_h = None, -1, 0
    for segment, index, shape in page.segments():
        y, x = int(index[2]), int(index[3])
        sh, sw = int(shape[1]), int(shape[2])
        if y != band_y:
            if band is not None:
                reducer.push(band[:band_h])
            band_y, band_h = y, min(sh, h - y)
            samples = int(shape[3])
            band = np.empty((band_h, w, samples) if samples > 1 else (band_h, w), dtype=page.dtype)
        if segment is None:  # an empty (sparse) tile
            band[:, x: x + sw] = page.nodata
            continue
        seg = np.asarray(segment).reshape(shape)[0][:band_h, : min(sw, w - x)]
        band[:, x: x + seg.shape[1]] = seg[..., 0] if band.ndim == 2 else seg
    if band is not None:
        reducer.push(band[:band_h])
    return reducer.finish()


class _RowReducer:
    """Accumulate full-width rows and box-reduce them by ``k`` x ``k`` as soon as ``k`` rows are there."""

    def __init__(self, width: int, k: int) -> None:
        self.k, self.width = k, width
        self.pad_w = -(-width // k) * k - width
        self.carry: np.ndarray | None = None
        self.parts: list[np.ndarray] = []

    def _reduce(self, rows: np.ndarray) -> np.ndarray:
        if rows.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
            rows = rows.astype(np.float32)  # dtypes cv2.resize cannot average
        if self.pad_w:
            widths = ((0, 0), (0, self.pad_w)) + ((0, 0),) * (rows.ndim - 2)
            rows = np.pad(rows, widths, mode="edge")
        m, n = rows.shape[0] // self.k, rows.shape[1] // self.k
        return cv2.resize(rows, (n, m), interpolation=cv2.INTER_AREA)  # exact box mean at integer ratio

    def push(self, rows: np.ndarray) -> None:
        if self.carry is not None:
            rows = np.concatenate([self.carry, rows], axis=0)
            self.carry = None
        full = rows.shape[0] // self.k * self.k
        if full:
            self.parts.append(self._reduce(rows[:full]))
        if full < rows.shape[0]:
            self.carry = rows[full:].copy()

    def finish(self) -> np.ndarray:
        if self.carry is not None:
            widths = ((0, self.k - self.carry.shape[0]), (0, 0)) + ((0, 0),) * (self.carry.ndim - 2)
            self.parts.append(self._reduce(np.pad(self.carry, widths, mode="edge")))
        return np.concatenate(self.parts, axis=0)


# ---------------------------------------------------------------------------------------------


def to_rgb8(raw: np.ndarray) -> np.ndarray:
    """Any decoded raster (grey, grey+alpha, RGB, RGBA; 8/16-bit, float) as (H, W, 3) uint8 RGB.

    Alpha is composited on white (glass); deeper than 8 bits is scaled by the image's maximum.

    >>> to_rgb8(np.array([[0, 1000], [2000, 4000]], np.uint16))[..., 0].tolist()
    [[0, 64], [128, 255]]
    >>> to_rgb8(np.zeros((1, 1, 4), np.uint8)).tolist()  # fully transparent -> white
    [[[255, 255, 255]]]
    """
    a = np.asarray(raw)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] > 4:
        raise ValueError(f"unsupported pixel layout {a.shape}")
    colour = a[..., :3] if a.shape[2] >= 3 else a[..., :1]
    alpha = a[..., 3] if a.shape[2] == 4 else (a[..., 1] if a.shape[2] == 2 else None)
    colour = _to_uint8(colour)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    if alpha is not None:
        al = _to_uint8(alpha[..., None]).astype(np.float32) / 255.0
        colour = (colour.astype(np.float32) * al + 255.0 * (1.0 - al) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(colour)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float32)
    hi = float(f.max()) if f.size else 0.0
    if a.dtype.kind == "f" and hi <= 1.0:
        hi = 1.0
    if hi <= 0:
        return np.zeros(a.shape, np.uint8)
    return np.clip(f * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)
