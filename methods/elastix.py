"""``elastix``: the paper's iterative baseline with real elastix (``itk-elastix``), affine, multi-resolution.

Installed with the ``elastix`` extra (``pip install histreg-bench[elastix]``); listed as unavailable when
``itk`` is absent. Same starting point as ``iterative``: the shared preprocessing already applied the
initial rotation, so elastix starts from the identity (optionally with its centre-of-gravity
initialisation of the translation), with the rotation centre at the fixed tissue's centre of mass.

Metric: AdvancedMattesMutualInformation (as ``iterative``, and for the same reason: two stains are related
by an unknown non-linear intensity mapping); optimiser: elastix's AdaptiveStochasticGradientDescent with
new random samples every iteration; a smoothing pyramid. Like ``iterative``, it reports failure when the
result is degenerate or the aligned images share no structure
(the shared checks of :func:`bench.quality.accept`), and keeps the start when the Mattes MI at the result
is worse than there (:mod:`bench.methods._intensity`, shared with ``iterative``).

elastix maps *fixed* points to *moving* points: ``T(x) = A (x - c) + c + t`` with the parameters
``(a11, a12, a21, a22, tx, ty)`` and ``CenterOfRotationPoint`` ``c`` (physical = pixel (x, y) here); the
estimate is its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from bench.methods._intensity import dilated, finish, full_metric, metric_mask, tissue_centre, to_sitk

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register
from bench.quality import AcceptanceParams


@dataclass(frozen=True)
class ElastixParams(AcceptanceParams):
    """Typed, defaulted parameters of ``elastix`` (elastix parameter-map entries in brackets; the failure
    checks' from :class:`bench.quality.AcceptanceParams`)."""

    resolutions: int = 4  # [NumberOfResolutions]
    iterations: int = 500  # [MaximumNumberOfIterations] per resolution
    spatial_samples: int = 4096  # [NumberOfSpatialSamples], new ones every iteration
    histogram_bins: int = 32  # [NumberOfHistogramBins]
    init: Literal["identity", "center_of_gravity"] = "center_of_gravity"  # [AutomaticTransformInitialization]
    use_fixed_mask: bool = True  # sample only inside the (dilated) fixed tissue mask
    mask_dilation: int = 15  # pixels
    threads: int = 1  # elastix threads (1: reproducible)


def parameter_map(p: ElastixParams, seed: int) -> dict[str, Any]:
    """The elastix affine parameter map of ``p`` (values as strings, lists for per-level entries)."""
    return {
        "Registration": "MultiResolutionRegistration",
        "Transform": "AffineTransform",
        "Metric": "AdvancedMattesMutualInformation",
        "NumberOfHistogramBins": str(p.histogram_bins),
        "Optimizer": "AdaptiveStochasticGradientDescent",
        "AutomaticParameterEstimation": "true",
        "AutomaticScalesEstimation": "true",
        "MaximumNumberOfIterations": str(p.iterations),
        "NumberOfResolutions": str(p.resolutions),
        "FixedImagePyramid": "FixedSmoothingImagePyramid",
        "MovingImagePyramid": "MovingSmoothingImagePyramid",
        "ImageSampler": "RandomCoordinate",
        "NumberOfSpatialSamples": str(p.spatial_samples),
        "NewSamplesEveryIteration": "true",
        "CheckNumberOfSamples": "true",
        "MaximumNumberOfSamplingAttempts": "8",
        "Interpolator": "LinearInterpolator",
        "ResampleInterpolator": "FinalLinearInterpolator",
        "Resampler": "DefaultResampler",
        "DefaultPixelValue": "0",
        "AutomaticTransformInitialization": "true" if p.init == "center_of_gravity" else "false",
        "AutomaticTransformInitializationMethod": "CenterOfGravity",
        "HowToCombineTransforms": "Compose",
        "ErodeMask": "false",
        "WriteResultImage": "false",
        "RandomSeed": str(int(seed) % 2**31),
    }


def elastix_affine_to_matrix(parameters: Any, center: Any) -> np.ndarray:
    """3x3 fixed -> moving matrix of elastix's 2-D affine parameters ``(a11, a12, a21, a22, tx, ty)``.

    >>> elastix_affine_to_matrix([1, 0, 0, 1, 3, 4], [10, 10])[:2].tolist()
    [[1.0, 0.0, 3.0], [0.0, 1.0, 4.0]]
    """
    v = np.asarray([float(x) for x in parameters], dtype=np.float64)
    a = v[:4].reshape(2, 2)
    t = v[4:6]
    c = np.asarray([float(x) for x in center], dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = t + c - a @ c
    return m


@register
class Elastix(Method):
    name = "elastix"
    version = "2"
    description = "elastix (itk-elastix) multi-resolution affine, Mattes MI, adaptive stochastic gradient descent."
    uses_preprocessing = True
    devices = ("cpu",)
    requires = ("itk",)
    Params = ElastixParams

    def prepare(self, context: Context) -> None:
        import itk

        itk.elastix_registration_method  # noqa: B018 - loads the (slow, lazy) elastix module once, untimed

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        import itk

        p: ElastixParams = self.params
        if not fixed.mask.any() or not moving.mask.any():
            raise RegistrationFailed("empty tissue mask: nothing to register")
        f_img = itk.image_view_from_array(np.ascontiguousarray(fixed.image, dtype=np.float32))
        m_img = itk.image_view_from_array(np.ascontiguousarray(moving.image, dtype=np.float32))
        pmap = parameter_map(p, context.seed)
        cx, cy = tissue_centre(fixed.image, fixed.mask)
        if p.init == "identity":  # centre of rotation at the fixed tissue's centre of mass
            pmap["CenterOfRotationPoint"] = [f"{cx:.6f}", f"{cy:.6f}"]
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("affine"))
        params.SetParameterMap(0, {k: v if isinstance(v, list) else [v] for k, v in pmap.items()})
        kwargs: dict[str, Any] = {}
        if p.use_fixed_mask and not fixed.mask.all():
            kwargs["fixed_mask"] = itk.image_view_from_array(dilated(fixed.mask, p.mask_dilation).astype(np.uint8))
        try:
            _, result = itk.elastix_registration_method(
                f_img, m_img, parameter_object=params, log_to_console=False,
                number_of_threads=int(p.threads), **kwargs,
            )
        except RuntimeError as exc:  # elastix raises e.g. when too few samples fall inside the mask
            raise RegistrationFailed(f"elastix stopped: {str(exc).strip().splitlines()[-1][:300]}") from None
        rmap = result.GetParameterMap(0)
        f2m = elastix_affine_to_matrix(rmap["TransformParameters"], rmap["CenterOfRotationPoint"])
        matrix = np.linalg.inv(f2m)
        diag = {"center_of_rotation": [float(x) for x in rmap["CenterOfRotationPoint"]]}
        return self._checked(fixed, moving, matrix, f2m, diag)

    def _checked(self, fixed: ImageView, moving: ImageView, matrix: np.ndarray, f2m: np.ndarray,
                 diag: dict) -> Estimate:
        """Same failure checks as ``iterative`` (Mattes MI measured with SimpleITK at start and end)."""
        import SimpleITK as sitk

        p: ElastixParams = self.params
        f_img, m_img = to_sitk(fixed.image), to_sitk(moving.image)
        mask = metric_mask(fixed, p.use_fixed_mask, p.mask_dilation)
        result = sitk.AffineTransform(2)
        result.SetMatrix(f2m[:2, :2].ravel().tolist())
        result.SetTranslation(f2m[:2, 2].tolist())
        start = full_metric(f_img, m_img, sitk.AffineTransform(2), mask, "mattes", p.histogram_bins)
        end = full_metric(f_img, m_img, result, mask, "mattes", p.histogram_bins)
        diag.update(metric="mattes", metric_start=start, metric_end=end)
        return finish(fixed, moving, matrix, diag, p, f"(Mattes MI {start:.4f} -> {end:.4f})")
