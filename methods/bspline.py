"""``bspline``: SimpleITK B-spline free-form deformation at a reduced size: the paper's first example of a
"generic nonrigid registration algorithm".

A nonrigid stage after an initial alignment (``sift>bspline``): it returns the identity matrix and a
:class:`bench.deformation.Deformation`. The working images are resized so that the fixed image's longer side
is ``size`` pixels (:mod:`bench.methods._sitk_field` gives them physical coordinates in working pixels); a cubic
``BSplineTransform`` with a ``mesh`` x ``mesh`` control grid (refined by ``mesh_refinement`` per level,
SimpleITK's ``SetInitialTransformAsBSpline`` scale factors) is optimised by gradient descent with a line search (optimiser scales from physical shift, as
SimpleITK's multi-level B-spline example: L-BFGS-B refuses the refined meshes' scales) over a
``shrink_factors`` pyramid, with Mattes mutual information (the stains' intensities are related by an unknown
mapping) or correlation, sampled randomly (seeded by ``context.seed``) inside the dilated fixed tissue mask.

The transform maps fixed working points to moving ones, ``T(x) = x + d(x)``;
``TransformToDisplacementField`` samples ``d`` on the fixed reduced grid, which with the identity matrix is the
Deformation's ``u``. When the full-sample metric at the end is not better than at the start, the zero field is
returned (``kept_start``), also when the optimiser steps out of the images' overlap (SimpleITK's "All samples
map outside moving image buffer", seen from a poor start). A non-finite field, or one folding on more than ``max_folding`` of its grid, raises
:class:`bench.RegistrationFailed`.

Defaults chosen on generated pairs only (``studies/nonrigid_defaults.py``, ``docs/nonrigid.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register
from bench.deformation import LOCAL_REFINEMENT_LIMITS, Deformation, folding


@dataclass(frozen=True)
class BSplineParams:
    """Typed, defaulted parameters of ``bspline``."""

    size: int = 512  # longer side of the reduced images and of the field's grid, pixels
    mesh: int = 4  # control-point mesh size (per side) at the coarsest level
    mesh_refinement: tuple[int, ...] = (1, 2, 4)  # mesh scale factor per level
    shrink_factors: tuple[int, ...] = (4, 2, 1)  # pyramid shrink per level (reduced pixels)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)  # Gaussian per level, reduced pixels
    metric: Literal["mattes", "correlation"] = "mattes"
    histogram_bins: int = 32  # Mattes MI
    sampling: float = 0.2  # fraction of pixels sampled per metric evaluation (seeded)
    iterations: tuple[int, ...] = (50,)  # optimiser iterations per level (the largest value is used for every level)
    learning_rate: float = 5.0  # gradient descent (line search) initial step, physical-shift scales
    line_iterations: int = 20  # most metric evaluations of one line search (SimpleITK: lineSearchMaximumIterations)
    mask_dilation: int = 5  # dilation of the fixed tissue mask for the metric, reduced pixels
    max_folding: float = 0.005  # share of the field allowed a non-positive Jacobian before it fails
    keep_start: bool = True  # return the zero field when the full-sample metric did not improve
    threads: int = 1  # SimpleITK threads (1: reproducible)


@register
class BSpline(Method):
    name = "bspline"
    kind = "nonrigid"
    version = "1"
    description = "SimpleITK B-spline free-form deformation (Mattes MI, gradient descent, multi-level mesh), reduced size."
    uses_preprocessing = True
    devices = ("cpu",)
    Params = BSplineParams
    known_limits = LOCAL_REFINEMENT_LIMITS  # contract checks it fails by design (bench.conformance)

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        import SimpleITK as sitk
        from bench.methods._intensity import full_metric, set_metric
        from bench.methods._sitk_field import field_of, reduced, reduced_mask, sitk_threads

        p: BSplineParams = self.params
        levels = len(p.shrink_factors)
        if not len(p.smoothing_sigmas) == len(p.mesh_refinement) == levels:
            raise ValueError("bspline: shrink_factors, smoothing_sigmas and mesh_refinement need the same length")
        if not fixed.mask.any() or not moving.mask.any():
            raise RegistrationFailed("empty tissue mask: nothing to register")
        t0 = time.perf_counter()
        big_h, big_w = fixed.shape
        scale = min(1.0, p.size / max(big_h, big_w))
        shape = (max(1, round(big_h * scale)), max(1, round(big_w * scale)))
        mshape = (max(1, round(moving.shape[0] * scale)), max(1, round(moving.shape[1] * scale)))
        with sitk_threads(p.threads):
            f_img, m_img = reduced(fixed.image, shape), reduced(moving.image, mshape)
            mask = reduced_mask(fixed.mask, shape, p.mask_dilation)
            tx = sitk.BSplineTransformInitializer(f_img, [int(p.mesh)] * 2, 3)
            reg = sitk.ImageRegistrationMethod()
            set_metric(reg, p.metric, p.histogram_bins, mask)
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(min(1.0, float(p.sampling)), int(context.seed) % 2**31 + 1)
            reg.SetInterpolator(sitk.sitkLinear)
            reg.SetOptimizerAsGradientDescentLineSearch(learningRate=float(p.learning_rate),
                                                        numberOfIterations=int(max(p.iterations)),
                                                        convergenceMinimumValue=1e-4, convergenceWindowSize=5,
                                                        lineSearchMaximumIterations=int(p.line_iterations))
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetInitialTransformAsBSpline(tx, inPlace=True, scaleFactors=[int(v) for v in p.mesh_refinement])
            reg.SetShrinkFactorsPerLevel([int(v) for v in p.shrink_factors])
            reg.SetSmoothingSigmasPerLevel([float(v) for v in p.smoothing_sigmas])
            reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
            per_level: list[int] = []
            reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: per_level.append(0))
            reg.AddCommand(sitk.sitkIterationEvent, lambda: per_level.__setitem__(-1, per_level[-1] + 1))
            start = full_metric(f_img, m_img, sitk.Transform(2, sitk.sitkIdentity), mask, p.metric, p.histogram_bins)
            lost = ""
            try:
                out = reg.Execute(f_img, m_img)
                end = full_metric(f_img, m_img, out, mask, p.metric, p.histogram_bins)
            except RuntimeError as exc:
                if "outside" not in str(exc) or not p.keep_start:
                    raise RegistrationFailed(f"bspline: SimpleITK failed: {str(exc).strip().splitlines()[-1]}") from None
                # the optimiser stepped out of the images (a poor start): the start is the better answer
                lost = "the optimiser left the images' overlap; start kept"
                out, end = sitk.Transform(2, sitk.sitkIdentity), start
            disp = sitk.TransformToDisplacementField(out, sitk.sitkVectorFloat64, f_img.GetSize(), f_img.GetOrigin(),
                                                     f_img.GetSpacing(), f_img.GetDirection())
        d = field_of(disp, fixed.shape)
        if not np.all(np.isfinite(d.field)):
            raise RegistrationFailed("bspline field diverged: non-finite displacement")
        share = folding(d)
        if share > p.max_folding:
            raise RegistrationFailed(f"bspline field folds on {100 * share:.2f} % of its grid "
                                     f"(limit {100 * p.max_folding:.2f} %)")
        kept = bool(p.keep_start and (lost or not end < start))
        if kept:
            d = Deformation.zeros(fixed.shape, d.grid_shape)
        diag = {"stop_condition": lost or reg.GetOptimizerStopConditionDescription(), "iterations_per_level": per_level,
                "metric_start": round(float(start), 6), "metric_end": round(float(end), 6), "kept_start": kept,
                "folding": round(share, 6), "max_displacement_px": round(float(np.linalg.norm(d.field, axis=2).max()), 3),
                "seconds": round(time.perf_counter() - t0, 3)}
        return Estimate(np.eye(3), diag, deformation=d)
