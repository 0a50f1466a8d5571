"""A full-resolution, ANHIR-size pair (about 16000 x 12000 px) for the scale test.

``python -m bench make-large DIR`` writes, with bounded memory, a generated stain pair upscaled to full
resolution as (a) baseline JPEGs and (b) tiled, pyramidal BigTIFFs, each with landmarks and an ANHIR pair
table (``DIR/dataset-jpeg.csv``, ``DIR/dataset-tiff.csv``). Upscaling happens strip by strip and the TIFF is
written tile by tile, so neither the generator nor the pipeline ever needs the whole image in memory
as floating point.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from bench import geometry
from bench.pairs import TABLE_HEADER, write_landmarks

STRIP = 512


def _upscaled_strips(img: np.ndarray, factor: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Rows of ``img`` upscaled by ``factor`` (bicubic) plus fine grain, ``STRIP`` output rows at a time."""
    h, w = img.shape[:2]
    out_w = w * factor
    for y0 in range(0, h * factor, STRIP):
        y1 = min(y0 + STRIP, h * factor)
        # source rows needed for output rows [y0, y1): pixel-centre mapping y = (Y + 0.5) / f - 0.5
        ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) / factor - 0.5
        xs = (np.arange(out_w, dtype=np.float32) + 0.5) / factor - 0.5
        mx, my = np.meshgrid(xs, ys)
        strip = cv2.remap(img, mx, my, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        grain = rng.normal(0, 4, strip.shape[:2]).astype(np.float32)[..., None]
        yield np.clip(strip.astype(np.float32) + grain, 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, img: np.ndarray, factor: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    full = np.empty((img.shape[0] * factor, img.shape[1] * factor, 3), np.uint8)  # uint8 only: ~0.6 GB
    y = 0
    for strip in _upscaled_strips(img, factor, rng):
        full[y : y + len(strip)] = strip
        y += len(strip)
    cv2.imwrite(str(path), cv2.cvtColor(full, cv2.COLOR_RGB2BGR, dst=full), [cv2.IMWRITE_JPEG_QUALITY, 85])


def _write_tiff(path: Path, img: np.ndarray, factor: int, seed: int, tile: int = 512) -> None:
    """Tiled BigTIFF with a 4x-step pyramid in SubIFDs, written tile by tile."""
    import tifffile

    h, w = img.shape[0] * factor, img.shape[1] * factor
    levels = []
    f = factor
    while f >= 1 and max(img.shape[:2]) * f >= 1024:
        levels.append(f)
        f //= 4
    rng = np.random.default_rng(seed)

    def tiles(level_factor: int) -> Iterator[np.ndarray]:
        buf = None
        for strip in _upscaled_strips(img, level_factor, rng):
            buf = strip if buf is None else np.vstack([buf, strip])
            while len(buf) >= tile:
                yield from _row_tiles(buf[:tile], tile)
                buf = buf[tile:]
        if buf is not None and len(buf):
            pad = np.zeros((tile - len(buf), *buf.shape[1:]), np.uint8)
            yield from _row_tiles(np.vstack([buf, pad]), tile)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 85})
        tw.write(tiles(levels[0]), shape=(h, w, 3), dtype=np.uint8, subifds=len(levels) - 1, **opts)
        for lf in levels[1:]:
            lh, lw = img.shape[0] * lf, img.shape[1] * lf
            tw.write(tiles(lf), shape=(lh, lw, 3), dtype=np.uint8, subfiletype=1, **opts)


def _row_tiles(rows: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    w = rows.shape[1]
    for x0 in range(0, w, tile):
        t = rows[:, x0 : x0 + tile]
        if t.shape[1] < tile:
            t = np.concatenate([t, np.zeros((tile, tile - t.shape[1], 3), np.uint8)], axis=1)
        yield np.ascontiguousarray(t)


def write_large_pair(folder: str | Path, *, long_side: int = 16000, factor: int = 8, seed: int = 5,
                     formats: tuple[str, ...] = ("jpeg", "tiff")) -> dict[str, Path]:
    """Write the pair; returns ``{format: pair table path}``."""
    from bench.datasets.synthetic import GeneratorConfig, generate_pair

    folder = Path(folder)
    base = long_side // factor
    pair = generate_pair(seed, tissue="kidney-like", source_stain="HE", target_stain="DAB",
                         config=GeneratorConfig(size=base, max_rotation_deg=180, elastic_px=0.0,
                                                aspect_range=(0.75, 0.75)))
    up = geometry.resample_matrix(factor, factor)  # small-image pixels -> full-resolution pixels
    tables = {}
    for fmt in formats:
        sub = folder / f"large_1/scale-100pc-{fmt}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if fmt == "jpeg" else "tif"
        rows = []
        for role, img, pts in (("source", pair.source_rgb, pair.source_landmarks),
                               ("target", pair.target_rgb, pair.target_landmarks)):
            path = sub / f"{role}.{ext}"
            if not path.exists():
                (_write_jpeg if fmt == "jpeg" else _write_tiff)(path, img, factor, seed + (role == "target"))
            write_landmarks(sub / f"{role}.csv", geometry.apply(up, pts))
            rows.append((path.relative_to(folder), (sub / f"{role}.csv").relative_to(folder)))
        th, tw = pair.target_rgb.shape[0] * factor, pair.target_rgb.shape[1] * factor
        table = folder / f"dataset-{fmt}.csv"
        with table.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(TABLE_HEADER)
            w.writerow([0, rows[0][0], rows[0][1], rows[1][0], rows[1][1], f"{np.hypot(th, tw):.1f}",
                        f"({th}, {tw})", "training"])
        tables[fmt] = table
    return tables
