"""``demons``: SimpleITK demons (fast symmetric forces), multi-resolution, at a reduced size: the paper's second
example of a "generic nonrigid registration algorithm".

A nonrigid stage after an initial alignment (``sift>demons``): it returns the identity matrix and a
:class:`bench.deformation.Deformation`. The working images are resized so that the fixed image's longer side is
``size`` pixels at the finest level (halved per coarser level; :mod:`bench.methods._sitk_field` gives them
physical coordinates in working pixels); the moving image is resampled onto the fixed grid. Demons assumes
equal intensities, which two stains do not have: ``intensity="gradient"`` (the default) registers the two
images' gradient magnitudes, each normalised by its 99th percentile; ``"histogram"`` matches the moving
image's histogram to the fixed one's (tissue is bright in both inverted grayscales, so the mapping is roughly
monotonic), which on generated pairs recovered little and moved perfectly aligned pairs by 1.7 px. At each level the filter
starts from the previous level's field (resampled) and smooths its field by a Gaussian of ``sigma`` level
pixels (diffusion-like regularisation).

The final field is the demons' own displacement field on the finest grid (fixed working point ``x`` ->
moving ``x + d(x)``, which is the Deformation's meaning with the identity matrix). A non-finite field, or one
folding on more than ``max_folding`` of its grid, raises :class:`bench.RegistrationFailed`.

Defaults chosen on generated pairs only (``studies/nonrigid_defaults.py``, ``docs/nonrigid.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register
from bench.deformation import LOCAL_REFINEMENT_LIMITS, folding


@dataclass(frozen=True)
class DemonsParams:
    """Typed, defaulted parameters of ``demons``."""

    size: int = 512  # longer side of the finest level (the field's grid), pixels
    levels: int = 3  # pyramid levels, each half the size of the next
    iterations: tuple[int, ...] = (50, 50, 30)  # demons iterations per level, coarsest first
    sigma: float = 6.0  # Gaussian smoothing of the displacement field each iteration, level pixels
    max_step: float = 1.0  # largest update per iteration, level pixels
    intensity: Literal["histogram", "gradient"] = "gradient"  # how the two stains are made comparable
    image_sigma: float = 1.0  # Gaussian smoothing of the images before registering, level pixels
    max_folding: float = 0.005  # share of the field allowed a non-positive Jacobian before it fails
    threads: int = 1  # SimpleITK threads (1: reproducible)


def _comparable(fixed: np.ndarray, moving: np.ndarray, p: DemonsParams) -> tuple[np.ndarray, np.ndarray]:
    """The two level images made comparable (numpy, same grid)."""
    import SimpleITK as sitk

    if p.image_sigma > 0:
        fixed = cv2.GaussianBlur(fixed, (0, 0), p.image_sigma)
        moving = cv2.GaussianBlur(moving, (0, 0), p.image_sigma)
    if p.intensity == "gradient":
        def grad(a: np.ndarray) -> np.ndarray:
            g = np.hypot(cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3))
            top = float(np.percentile(g, 99)) or 1.0
            return np.clip(g / top, 0, 1).astype(np.float32)

        return grad(fixed), grad(moving)
    f = sitk.GetImageFromArray(np.ascontiguousarray(fixed, np.float32))
    m = sitk.GetImageFromArray(np.ascontiguousarray(moving, np.float32))
    matched = sitk.HistogramMatching(m, f, numberOfHistogramLevels=128, numberOfMatchPoints=15,
                                     thresholdAtMeanIntensity=True)
    return fixed, sitk.GetArrayFromImage(matched).astype(np.float32)


@register
class Demons(Method):
    name = "demons"
    kind = "nonrigid"
    version = "1"
    description = "SimpleITK fast symmetric forces demons on gradient magnitudes, multi-resolution, reduced size."
    uses_preprocessing = True
    devices = ("cpu",)
    Params = DemonsParams
    known_limits = LOCAL_REFINEMENT_LIMITS  # contract checks it fails by design (bench.conformance)

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        import SimpleITK as sitk
        from bench.methods._instance import level_shapes
        from bench.methods._sitk_field import field_of, reduced, sitk_threads

        p: DemonsParams = self.params
        if not fixed.mask.any() or not moving.mask.any():
            raise RegistrationFailed("empty tissue mask: nothing to register")
        t0 = time.perf_counter()
        shapes = level_shapes(fixed.shape, p.size, p.levels)
        its = list(p.iterations)[-len(shapes):]
        its = [its[0]] * (len(shapes) - len(its)) + its
        field = None
        records = []
        with sitk_threads(p.threads):
            for (_, shape), n in zip(shapes, its, strict=True):
                t1 = time.perf_counter()
                f_img = reduced(fixed.image, shape)
                m_big = reduced(moving.image, (max(1, round(moving.shape[0] * shape[0] / fixed.shape[0])),
                                               max(1, round(moving.shape[1] * shape[1] / fixed.shape[1]))))
                m_img = sitk.Resample(m_big, f_img, sitk.Transform(), sitk.sitkLinear, 0.0)
                fa, ma = _comparable(sitk.GetArrayFromImage(f_img), sitk.GetArrayFromImage(m_img), p)
                fs, ms = sitk.GetImageFromArray(fa), sitk.GetImageFromArray(ma)
                fs.CopyInformation(f_img)
                ms.CopyInformation(f_img)
                demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
                demons.SetNumberOfIterations(int(n))
                demons.SetSmoothDisplacementField(True)
                demons.SetStandardDeviations(float(p.sigma))
                demons.SetMaximumUpdateStepLength(float(p.max_step))
                if field is None:
                    out = demons.Execute(fs, ms)
                else:
                    init = sitk.Resample(field, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
                    out = demons.Execute(fs, ms, init)
                field = out
                records.append({"shape": [int(shape[0]), int(shape[1])], "iterations": int(demons.GetElapsedIterations()),
                                "rms_change": round(float(demons.GetRMSChange()), 6),
                                "metric": round(float(demons.GetMetric()), 6),
                                "seconds": round(time.perf_counter() - t1, 3)})
        d = field_of(field, fixed.shape)
        if not np.all(np.isfinite(d.field)):
            raise RegistrationFailed("demons field diverged: non-finite displacement")
        share = folding(d)
        if share > p.max_folding:
            raise RegistrationFailed(f"demons field folds on {100 * share:.2f} % of its grid "
                                     f"(limit {100 * p.max_folding:.2f} %)")
        diag = {"levels": records, "folding": round(share, 6),
                "max_displacement_px": round(float(np.linalg.norm(d.field, axis=2).max()), 3),
                "seconds": round(time.perf_counter() - t0, 3)}
        return Estimate(np.eye(3), diag, deformation=d)
