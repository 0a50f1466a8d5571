"""The stage's parameters (:class:`PreprocessParams`, ``--set preprocess.X=...``) and its version."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STAGE_VERSION = "1.3"  # 1.1: the moving view carries its field of view (ImageView.valid); 1.2: flip test
# on by default, decided by NCC and, when the NCC is close, by the band-passed texture MI; 1.3: a close call
# carries the other mirror state too (PreparedPair.alternative)


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


def params_dict(params: PreprocessParams) -> dict[str, Any]:
    """The parameters as a plain dict (for run.json and cache keys)."""
    return dataclasses.asdict(params)
