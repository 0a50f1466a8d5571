"""What a generated pair is made from and what it is.

:data:`GENERATOR_VERSION` (part of the embedded sample's cache key), :class:`GeneratorConfig` (sizes, the
affine and elastic ranges, artefact rates), :class:`Variation` (harder pairs: mirrored sources, swapped fine
texture) and :class:`SyntheticPair`, the result of :func:`bench.datasets.synthetic.generate_pair`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GENERATOR_VERSION = "2"  # 1: first draft (commit 4b1f2f3); 2: PAS paler, kidney pelvis, elongated outlines


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
