"""The embedded sample dataset: generated pairs with exact landmarks, no download.

:func:`sample_table` generates :data:`SAMPLE_PAIRS` pairs with :func:`bench.datasets.synthetic.write_dataset`
(all tissues x all stains, balanced) on first use into a cache folder, in the ANHIR layout, and returns
the path of its ``dataset.csv``. Later calls reuse it. The folder name carries the generator version and a
digest of the seed, pair count and configuration, so a change to any of them makes a new folder instead
of reusing stale images. Generation writes into a temporary folder beside the final one and renames it
into place only when complete, so an interrupted run never leaves a half dataset (a concurrent run that
finishes first wins; the other discards its copy).

The cache folder is the project's one (:func:`bench.cachedir.cache_root`), first match wins: the
``cache_dir`` argument, ``$HISTREG_BENCH_CACHE``, ``$XDG_CACHE_HOME/histreg-bench``, ``~/.cache/histreg-bench``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.synthetic import (
    GENERATOR_VERSION,
    STAINS,
    TISSUES,
    GeneratorConfig,
    generate_pair,
    write_dataset,
)

from bench.cachedir import cache_root
from bench.pairs import load_table, read_landmarks

SAMPLE_SEED = 2019
SAMPLE_PAIRS = 24
SAMPLE_CONFIG = GeneratorConfig()
MANIFEST = "sample.json"


def sample_manifest() -> dict:
    """What defines the sample: generator version, seed, pair count, configuration (JSON-ready)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": SAMPLE_SEED,
        "n_pairs": SAMPLE_PAIRS,
        "config": dataclasses.asdict(SAMPLE_CONFIG),
    }


def sample_key() -> str:
    """Name of the sample's folder in the cache, e.g. ``sample-v1-0123456789ab``."""
    text = json.dumps(sample_manifest(), sort_keys=True)
    return f"sample-v{GENERATOR_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def sample_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the sample lives (whether or not it has been generated yet)."""
    return cache_root(cache_dir) / sample_key()


def sample_table(cache_dir: str | Path | None = None, *, refresh: bool = False) -> Path:
    """Return the embedded sample's ``dataset.csv``, generating it first if needed.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Cache folder (see :func:`bench.cachedir.cache_root`); the sample goes into a subfolder named by
        :func:`sample_key`.
    refresh : bool
        Regenerate even if a complete sample is already there.

    Returns
    -------
    Path
        The pair table, readable by :func:`bench.pairs.load_table`.
    """
    final = sample_dir(cache_dir)
    table = final / "dataset.csv"
    if table.is_file() and not refresh:
        return table
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the sample is ordinary shared data
    try:
        write_dataset(tmp, SAMPLE_PAIRS, SAMPLE_SEED, SAMPLE_CONFIG)
        (tmp / MANIFEST).write_text(json.dumps(sample_manifest(), indent=2) + "\n")
        if refresh and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / "sample")
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not table.is_file():  # not a concurrent run that finished first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return table


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (0, 0, 0), (0, 128, 128)]


def _tile(rgb: np.ndarray, side: int, points: np.ndarray | None = None, caption: str = "") -> np.ndarray:
    """``rgb`` fitted into a white ``side x side`` square, with numbered landmark dots and a caption."""
    scale = side / max(rgb.shape[:2])
    img = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    out = np.full((side, side, 3), 255, np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    for i, (x, y) in enumerate(np.rint([] if points is None else points * scale).astype(int)):
        cv2.circle(out, (int(x), int(y)), 4, _PALETTE[i % len(_PALETTE)], -1, cv2.LINE_AA)
        cv2.circle(out, (int(x), int(y)), 4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(out, str(i + 1), (int(x) + 5, int(y) - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(out, caption, (4, side - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    """Save a gallery picture as a 256-colour PNG (keeps it small)."""
    from PIL import Image

    Image.fromarray(rgb).quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    return path


def _gap(side: int, width: int) -> np.ndarray:
    return np.full((side, width, 3), 255, np.uint8)


def _pairs_picture(table: Path, side: int) -> np.ndarray:
    """The first pair of each tissue in the sample: source | target, first 10 landmarks numbered."""
    first: dict[str, object] = {}
    for pair in load_table(table):
        first.setdefault(pair.tissue, pair)
    rows = []
    for pair in first.values():
        tiles = []
        for role, image, landmarks in (("source", pair.source_image, pair.source_landmarks),
                                       ("target", pair.target_image, pair.target_landmarks)):
            rgb = cv2.imread(str(image))[..., ::-1]
            caption = f"{pair.tissue} {role} {image.stem}"
            tiles.append(_tile(rgb, side, read_landmarks(landmarks)[:10], caption))
        rows.append(np.hstack([tiles[0], _gap(side, 6), tiles[1]]))
    if len(rows) % 2:
        rows.append(np.full_like(rows[0], 255))
    return np.vstack([np.hstack([a, _gap(side, 16), b]) for a, b in zip(rows[::2], rows[1::2], strict=True)])


def _detail_crop(rgb: np.ndarray, mask: np.ndarray, side: int) -> np.ndarray:
    """A 1:1 ``side x side`` crop around the median tissue pixel."""
    ys, xs = np.nonzero(mask)
    y0 = int(np.clip(np.median(ys) - side // 2, 0, max(rgb.shape[0] - side, 0)))
    x0 = int(np.clip(np.median(xs) - side // 2, 0, max(rgb.shape[1] - side, 0)))
    crop = np.full((side, side, 3), 255, np.uint8)
    part = rgb[y0: y0 + side, x0: x0 + side]
    crop[: part.shape[0], : part.shape[1]] = part
    return crop


def gallery(out_dir: str | Path, cache_dir: str | Path | None = None, side: int = 230) -> list[Path]:
    """Draw the documentation's pictures (``sample-pairs``, ``-stains``, ``-detail`` PNGs) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_save_png(out_dir / "sample-pairs.png", _pairs_picture(sample_table(cache_dir), side))]
    stains = [generate_pair(SAMPLE_SEED, tissue="kidney-like", target_stain=s, config=SAMPLE_CONFIG).target_rgb
              for s in STAINS]
    tiles = [_tile(rgb, side, caption=s) for rgb, s in zip(stains, STAINS, strict=True)]
    written.append(_save_png(out_dir / "sample-stains.png", np.hstack(tiles)))
    crops = []
    for tissue in TISSUES:
        p = generate_pair(SAMPLE_SEED + 1, tissue=tissue, config=SAMPLE_CONFIG)
        crops += [_detail_crop(p.target_rgb, p.target_mask, 200), _detail_crop(p.source_rgb, p.source_mask, 200)]
    written.append(_save_png(out_dir / "sample-detail.png", np.vstack([np.hstack(crops[:4]), np.hstack(crops[4:])])))
    return written


if __name__ == "__main__":
    print(sample_table())
