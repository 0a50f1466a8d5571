"""``iterative``: multi-resolution intensity-based affine registration with SimpleITK.

The paper's "Iterative" row (elastix there; ``elastix`` is the same with real elastix). Runs on the shared
preprocessing's output, so the initial transform is the identity in the working frame: the moving image
already carries the preprocessing's initial rotation (and centre-of-mass alignment, when the stage does it).

Metric: Mattes mutual information by default. The two images are differently stained: after grayscale
inversion one stain's bright structures can be another's faint ones, so their intensities are related by an
unknown, non-linear (not even monotonic) mapping, which mutual information tolerates and normalised
correlation does not. ``metric=correlation`` is available for comparison (docs/classical.md).

SimpleITK's ``AffineTransform`` maps *fixed* points to *moving* points (physical coordinates; here spacing
1 and origin 0, so physical = pixel (x, y)); the estimate is its inverse, moving -> fixed.

Failure is reported (:class:`bench.RegistrationFailed`) when the masks are empty, the result is degenerate (scale, shear, reflection) or, after alignment,
the two images share no structure (band-pass mutual information inside the common tissue no higher than
when shifted: what an
unrelated pair or a collapse onto the tissue outline gives). When the optimiser ends at a worse
full-resolution metric than its start, the start (the preprocessing's alignment) is returned instead,
recorded as ``kept_start`` in the diagnostics (:func:`bench.methods._intensity.keep_better_start`). The
failure checks and their parameters are the ones every method shares (:func:`bench.quality.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from bench.methods._intensity import (
    finish,
    full_metric,
    metric_mask,
    set_metric,
    tissue_centre,
    to_sitk,
)

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register
from bench.quality import AcceptanceParams


@dataclass(frozen=True)
class IterativeParams(AcceptanceParams):
    """Typed, defaulted parameters of ``iterative`` (the failure checks' from
    :class:`bench.quality.AcceptanceParams`)."""

    metric: Literal["mattes", "correlation"] = "mattes"
    histogram_bins: int = 32  # Mattes MI
    stages: Literal["affine", "similarity+affine"] = "similarity+affine"  # a similarity stage first
    init: Literal["identity", "moments"] = "identity"  # moments: mask centroids aligned first
    shrink_factors: tuple[int, ...] = (8, 4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (4.0, 2.0, 1.0, 0.0)  # pixels of the full-resolution image
    sampling: tuple[float, ...] = (1.0, 0.5, 0.2, 0.05)  # fraction of pixels sampled per level (seeded)
    optimizer: Literal["regular_step", "gradient_descent"] = "regular_step"
    learning_rate: float = 1.0  # initial step, pixel-shift units (physical-shift scales); see estimate_learning_rate
    estimate_learning_rate: Literal["once", "each", "never"] = "once"  # once: first step ~1 pixel of each level
    min_step: float = 1e-4
    iterations: int = 200  # per level and stage
    relaxation: float = 0.5  # regular_step: step shrink factor when the gradient turns back
    convergence_window: int = 10  # gradient_descent: stop when the metric's trend over this many
    convergence_value: float = 1e-6  # iterations flattens below this
    gradient_tolerance: float = 1e-10
    threads: int = 1  # 1: bit-for-bit deterministic; 0: SimpleITK's global default (multi-threaded sums vary)
    use_fixed_mask: bool = True  # sample the metric only inside the (dilated) fixed tissue mask
    mask_dilation: int = 15  # pixels


def sitk_affine_to_matrix(transform: Any) -> np.ndarray:
    """The 3x3 matrix of a 2-D SimpleITK affine-like transform (fixed -> moving, pixel (x, y)).

    SimpleITK maps ``p -> A (p - c) + c + t``; with spacing 1 and origin 0, physical = pixel (x, y).
    """
    import SimpleITK as sitk

    tx = _unwrap(transform)
    aff = sitk.AffineTransform(2)
    aff.SetMatrix(tx.GetMatrix())
    aff.SetCenter(tx.GetCenter())
    aff.SetTranslation(tx.GetTranslation())
    a = np.array(aff.GetMatrix(), dtype=np.float64).reshape(2, 2)
    c = np.array(aff.GetCenter(), dtype=np.float64)
    t = np.array(aff.GetTranslation(), dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = t + c - a @ c
    return m


def _unwrap(transform: Any) -> Any:
    """The single concrete transform inside what ``ImageRegistrationMethod.Execute`` returns."""
    import SimpleITK as sitk

    tx = transform
    while isinstance(tx, sitk.CompositeTransform) or type(tx) is sitk.Transform:
        if isinstance(tx, sitk.CompositeTransform):
            if tx.GetNumberOfTransforms() != 1:
                raise ValueError("expected a single transform")
            tx = tx.GetNthTransform(0)
        tx = tx.Downcast()
    return tx


def _configure(p: IterativeParams, seed: int, mask: Any) -> Any:
    """A SimpleITK ImageRegistrationMethod with the metric, sampling, optimiser and pyramid of ``p``."""
    import SimpleITK as sitk

    levels = len(p.shrink_factors)
    if not len(p.smoothing_sigmas) == len(p.sampling) == levels:
        raise ValueError("iterative: shrink_factors, smoothing_sigmas and sampling need the same length")
    reg = sitk.ImageRegistrationMethod()
    set_metric(reg, p.metric, p.histogram_bins, mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, float(v)) for v in p.sampling], int(seed) % 2**31 + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    estimate = {"once": reg.Once, "each": reg.EachIteration, "never": reg.Never}[p.estimate_learning_rate]
    if p.optimizer == "regular_step":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=p.learning_rate,
            minStep=p.min_step,
            numberOfIterations=p.iterations,
            relaxationFactor=p.relaxation,
            gradientMagnitudeTolerance=p.gradient_tolerance,
            estimateLearningRate=estimate,
        )
    else:
        reg.SetOptimizerAsGradientDescent(
            learningRate=p.learning_rate,
            numberOfIterations=p.iterations,
            convergenceMinimumValue=p.convergence_value,
            convergenceWindowSize=p.convergence_window,
            estimateLearningRate=estimate,
        )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(v) for v in p.shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(v) for v in p.smoothing_sigmas])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _run_stage(p: IterativeParams, seed: int, fixed: Any, moving: Any, mask: Any, init: Any) -> tuple[Any, dict]:
    """One multi-resolution optimisation from ``init``; returns the transform and its record."""
    import SimpleITK as sitk

    reg = _configure(p, seed, mask)
    reg.SetInitialTransform(init, inPlace=False)
    per_level: list[int] = []
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: per_level.append(0))
    reg.AddCommand(sitk.sitkIterationEvent, lambda: per_level.__setitem__(-1, per_level[-1] + 1))
    out = reg.Execute(fixed, moving)
    record = {
        "stop_condition": reg.GetOptimizerStopConditionDescription(),
        "iterations": int(sum(per_level)),
        "iterations_per_level": per_level,
        "final_metric": float(reg.GetMetricValue()),
    }
    return out, record


def _initial(p: IterativeParams, fixed: ImageView, moving: ImageView, kind: str) -> Any:
    """The initial transform (fixed -> moving), centred on the fixed tissue's centre of mass."""
    import SimpleITK as sitk

    cf = tissue_centre(fixed.image, fixed.mask)
    tx = sitk.Similarity2DTransform() if kind == "similarity" else sitk.AffineTransform(2)
    tx.SetCenter(cf)
    if p.init == "moments":  # the masks' centroids (intensity-weighted ones differ between stains)
        (ym, xm), (yf, xf) = np.argwhere(moving.mask).mean(0), np.argwhere(fixed.mask).mean(0)
        tx.SetTranslation((float(xm - xf), float(ym - yf)))
    return tx


def _promote(similarity: Any) -> Any:
    """An AffineTransform equal to a Similarity2DTransform (same centre)."""
    import SimpleITK as sitk

    similarity = _unwrap(similarity)
    aff = sitk.AffineTransform(2)
    aff.SetMatrix(similarity.GetMatrix())
    aff.SetCenter(similarity.GetCenter())
    aff.SetTranslation(similarity.GetTranslation())
    return aff


@register
class Iterative(Method):
    name = "iterative"
    version = "2"
    description = "SimpleITK multi-resolution affine (Mattes MI, regular-step gradient descent), failure checks."
    uses_preprocessing = True
    devices = ("cpu",)
    requires = ("SimpleITK",)
    Params = IterativeParams

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        import SimpleITK as sitk

        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        if self.params.threads > 0:  # ITK's threaded metric sums are only reproducible single-threaded
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(self.params.threads))
        try:
            return self._estimate(fixed, moving, context)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)

    def _estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:

        p: IterativeParams = self.params
        if not fixed.mask.any() or not moving.mask.any():
            raise RegistrationFailed("empty tissue mask: nothing to register")
        f_img, m_img = to_sitk(fixed.image), to_sitk(moving.image)
        mask = metric_mask(fixed, p.use_fixed_mask, p.mask_dilation)
        staged = p.stages == "similarity+affine"
        tx = _initial(p, fixed, moving, "similarity" if staged else "affine")
        start = full_metric(f_img, m_img, tx, mask, p.metric, p.histogram_bins)
        records = []
        if staged:
            tx, rec = _run_stage(p, context.seed, f_img, m_img, mask, tx)
            records.append(rec)
            tx = _promote(tx)
        tx, rec = _run_stage(p, context.seed, f_img, m_img, mask, tx)
        records.append(rec)
        end = full_metric(f_img, m_img, tx, mask, p.metric, p.histogram_bins)
        diag = {
            "stop_condition": " | ".join(r["stop_condition"] for r in records),
            "iterations": sum(r["iterations"] for r in records),
            "iterations_per_level": [r["iterations_per_level"] for r in records],
            "final_metric": records[-1]["final_metric"],
            "metric_start": start,
            "metric_end": end,
            "metric": p.metric,
        }
        return self._checked(fixed, moving, np.linalg.inv(sitk_affine_to_matrix(tx)), diag)

    def _checked(self, fixed: ImageView, moving: ImageView, matrix: np.ndarray, diag: dict) -> Estimate:
        info = f"(stop: {diag['stop_condition']}; metric {diag['metric_start']:.4f} -> {diag['metric_end']:.4f})"
        return finish(fixed, moving, matrix, diag, self.params, info)

