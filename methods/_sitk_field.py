"""Shared machinery of the SimpleITK nonrigid methods (``bspline``, ``demons``): reduced images whose physical
coordinates are working-frame pixels, and their displacement fields as :class:`bench.deformation.Deformation`.

A working image of shape ``(H, W)`` resized by ``cv2.resize`` to ``(h, w)`` becomes a SimpleITK image with
spacing ``(W / w, H / h)`` and origin ``((W / w - 1) / 2, (H / h - 1) / 2)``: its pixel ``(j, i)`` then sits at
the physical point ``((j + 0.5) W / w - 0.5, ...)``, which is exactly the working-frame pixel coordinate of the
``cv2.resize`` pixel-centre convention. A SimpleITK transform found between two such images maps fixed working
points to moving working points, ``T(x) = x + d(x)``; with the identity matrix that is the Deformation's
``x + u(x)``, so the displacement field sampled on the fixed reduced grid (``TransformToDisplacementField``, or
the demons' own field) is the Deformation's ``field`` as it is.

A private module of the methods package; SimpleITK is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np

from bench.deformation import Deformation


def reduced(image: np.ndarray, shape: tuple[int, int]) -> Any:
    """A working-frame ``(H, W)`` array resized to ``shape = (h, w)`` as a SimpleITK float32 image whose
    physical coordinates are working pixels (see the module docstring)."""
    import SimpleITK as sitk

    big_h, big_w = image.shape[:2]
    h, w = shape
    small = cv2.resize(np.asarray(image, np.float32), (int(w), int(h)), interpolation=cv2.INTER_AREA)
    img = sitk.GetImageFromArray(np.ascontiguousarray(small, np.float32))
    sx, sy = big_w / w, big_h / h
    img.SetSpacing((float(sx), float(sy)))
    img.SetOrigin((float((sx - 1) / 2), float((sy - 1) / 2)))
    return img


def reduced_mask(mask: np.ndarray, shape: tuple[int, int], dilation: int) -> Any:
    """The tissue mask at ``shape``, dilated by ``dilation`` reduced pixels, as a SimpleITK uint8 image in the same
    physical frame as :func:`reduced` (None when it is empty or covers everything)."""
    import SimpleITK as sitk

    h, w = shape
    m = cv2.resize(np.asarray(mask, np.float32), (int(w), int(h)), interpolation=cv2.INTER_AREA) > 0
    if not m.any() or m.all():
        return None
    if dilation > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        m = cv2.dilate(m.astype(np.uint8), k) > 0
    img = sitk.GetImageFromArray(m.astype(np.uint8))
    ref = reduced(np.zeros(mask.shape, np.float32), shape)
    img.CopyInformation(ref)
    return img


def field_of(displacement: Any, working_shape: tuple[int, int]) -> Deformation:
    """A SimpleITK displacement-field image on a :func:`reduced` grid -> :class:`Deformation` (values already in
    working pixels, ``(x, y)`` order)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(displacement).astype(np.float32)  # (h, w, 2), components (x, y)
    return Deformation(arr, working_shape)


@contextmanager
def sitk_threads(threads: int) -> Iterator[None]:
    """SimpleITK's global thread count set to ``threads`` (> 0) for the block, restored after."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if threads > 0:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
