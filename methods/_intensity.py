"""Shared machinery of the intensity-based methods (``iterative``, ``elastix``): tissue centre and masks,
NumPy <-> SimpleITK images, the full-resolution metric both use to compare start and result, and their common
ending (:func:`finish`: keep the better of start and result, then the shared acceptance checks of
:func:`bench.quality.accept`).

A private module of the methods package: its functions are public within it, so neither method imports the
other's private helpers.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np

from bench import Estimate, ImageView, RegistrationFailed
from bench.quality import AcceptanceParams, accept


def tissue_centre(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre of mass (x, y) of the tissue of a (H, W) image (its centre if none).

    >>> img = np.zeros((5, 9), np.float32); img[1, 6] = 1.0
    >>> tissue_centre(img, img > 0)
    (6.0, 1.0)
    """
    m = cv2.moments(np.where(mask, image, 0).astype(np.float32))
    if m["m00"] <= 0:
        h, w = image.shape
        return (w - 1) / 2.0, (h - 1) / 2.0
    return m["m10"] / m["m00"], m["m01"] / m["m00"]


def dilated(mask: np.ndarray, dilation: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask dilated by ``dilation`` pixels (an ellipse)."""
    m = np.asarray(mask).astype(np.uint8)
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        m = cv2.dilate(m, kernel)
    return m


def to_sitk(image: np.ndarray) -> Any:
    """A (H, W) array as a float32 SimpleITK image, spacing 1 and origin 0 (physical = pixel (x, y))."""
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))


def metric_mask(fixed: ImageView, use: bool, dilation: int) -> Any:
    """The SimpleITK metric mask of the fixed tissue dilated by ``dilation`` px, or None (unused, or the
    mask covers everything)."""
    import SimpleITK as sitk

    if not use or fixed.mask.all():
        return None
    return sitk.GetImageFromArray(dilated(fixed.mask, dilation))


def set_metric(reg: Any, metric: Literal["mattes", "correlation"], bins: int, mask: Any) -> None:
    """Set the metric (Mattes MI with ``bins`` histogram bins, or correlation) and the fixed mask of a
    SimpleITK ``ImageRegistrationMethod``."""
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    else:
        reg.SetMetricAsCorrelation()
    if mask is not None:
        reg.SetMetricFixedMask(mask)


def full_metric(fixed: Any, moving: Any, transform: Any, mask: Any,
                metric: Literal["mattes", "correlation"] = "mattes", bins: int = 32) -> float:
    """The metric of ``transform`` (fixed -> moving) on the full-resolution SimpleITK images, every (masked)
    pixel sampled (lower is better: SimpleITK minimises)."""
    import SimpleITK as sitk

    ev = sitk.ImageRegistrationMethod()
    set_metric(ev, metric, bins, mask)
    ev.SetMetricSamplingStrategy(ev.NONE)
    ev.SetInterpolator(sitk.sitkLinear)
    ev.SetInitialTransform(transform, inPlace=False)
    return float(ev.MetricEvaluate(fixed, moving))


def keep_better_start(matrix: np.ndarray, diag: dict) -> np.ndarray:
    """``matrix``, or the identity (the start) when the full-resolution metric there is better.

    The optimiser samples the metric randomly, so from a start that is already optimal (identical
    images, or a preprocessing result that cannot be improved) it can drift to a slightly worse point;
    the start is then the better estimate by the method's own criterion. ``diag['kept_start']`` records
    it (SimpleITK and elastix minimise, so lower metric values are better).

    >>> d = {"metric_start": -0.5, "metric_end": -0.4}
    >>> keep_better_start(2 * np.eye(3), d).tolist()[0], d["kept_start"]
    ([1.0, 0.0, 0.0], True)
    """
    worse = diag["metric_end"] > diag["metric_start"]
    diag["kept_start"] = bool(worse)
    return np.eye(3) if worse else matrix


def finish(fixed: ImageView, moving: ImageView, matrix: np.ndarray, diag: dict, p: AcceptanceParams,
           info: str) -> Estimate:
    """The intensity-based methods' ending: keep the better of start and result (:func:`keep_better_start`),
    then the shared checks (:func:`bench.quality.accept`: degenerate matrix, no shared structure after
    alignment), raising :class:`bench.RegistrationFailed` with ``info`` at the end of the reason."""
    matrix = keep_better_start(matrix, diag)
    try:
        diag.update(accept(fixed, moving, matrix, p))
    except RegistrationFailed as exc:
        raise RegistrationFailed(f"{exc} {info}") from None
    return Estimate(matrix, diag)
