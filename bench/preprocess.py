"""The shared preprocessing stage (Algorithm 1, steps 1-6): runs once per pair, before every method.

``prepare_pair(source, target, params, full=True)`` returns a :class:`PreparedPair`: both images in a
common *working frame* (one constant resampling factor per pair), tissue masks, and the transform the
stage already applied to the source (initial rotation, optional flip). ``full=False`` is the light stage
for methods that do not use the shared preprocessing: load, resample, grayscale, invert only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import geometry
from bench.method import ImageView

STAGE_VERSION = "0.1"


class ImageLoadError(ValueError):
    """An image could not be read or holds nothing usable (one-line message naming the file)."""


@dataclass(frozen=True)
class PreprocessParams:
    """Typed, defaulted parameters of the shared preprocessing (``--set preprocess.X=...``)."""

    working_size: int = 1024  # longer side of the larger image after resampling, pixels


@dataclass
class PreparedPair:
    """Output of the stage for one pair (all arrays in the working frame)."""

    fixed: ImageView
    moving: ImageView  # already transformed by ``source_pre``
    source_scale: tuple[float, float]  # (sx, sy): original source pixels -> working pixels
    target_scale: tuple[float, float]
    source_pre: np.ndarray = field(default_factory=lambda: np.eye(3))  # applied to resampled source
    source_shape: tuple[int, int] = (0, 0)  # original (h, w)
    target_shape: tuple[int, int] = (0, 0)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_original(self, estimate: np.ndarray) -> np.ndarray:
        """Matrix in original pixel coordinates (source -> target) for a working-frame estimate."""
        return geometry.to_original(
            estimate,
            source_scale=self.source_scale,
            target_scale=self.target_scale,
            source_pre=self.source_pre,
        )


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: image file not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageLoadError(f"{path}: cannot decode image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_gray_inverted(rgb: np.ndarray) -> np.ndarray:
    """Grayscale, inverted to [0, 1] float32 (tissue bright, glass dark)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return 1.0 - gray


def prepare_pair(
    source: str | Path,
    target: str | Path,
    params: PreprocessParams | None = None,
    *,
    full: bool = True,
) -> PreparedPair:
    params = params or PreprocessParams()
    src, tgt = read_rgb(source), read_rgb(target)
    for p, img in ((source, src), (target, tgt)):
        if img.size == 0 or int(img.max()) == int(img.min()):
            raise ImageLoadError(f"{p}: image is empty or of one flat colour")
    factor = params.working_size / max(*src.shape[:2], *tgt.shape[:2])
    views, scales = [], []
    for img in (src, tgt):
        h, w = img.shape[:2]
        nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
        small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        gray = to_gray_inverted(small)
        views.append(ImageView(image=gray, mask=np.ones(gray.shape, bool), rgb=small))
        scales.append((nw / w, nh / h))
    return PreparedPair(
        fixed=views[1],
        moving=views[0],
        source_scale=scales[0],
        target_scale=scales[1],
        source_shape=src.shape[:2],
        target_shape=tgt.shape[:2],
        diagnostics={"factor": factor, "stage_version": STAGE_VERSION},
    )


def params_dict(params: PreprocessParams) -> dict[str, Any]:
    return dataclasses.asdict(params)
