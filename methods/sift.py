"""``sift``: OpenCV SIFT keypoints on the preprocessed images, ratio-test matching, robust affine (MAGSAC++).

The paper's "SIFT" row. Detection is restricted to the (dilated) tissue masks; matching, robust estimation
and the failure checks are shared with ``surf`` (:mod:`bench.methods._features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from bench.methods._features import (
    MatchParams,
    detection_factor,
    prepare_image,
    register_features,
    to_view,
)

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register


@dataclass(frozen=True)
class SiftParams(MatchParams):
    """SIFT detector settings plus the shared matching parameters (:class:`MatchParams`)."""

    n_features: int = 5000  # keep the strongest N keypoints per image; 0 = all
    n_octave_layers: int = 3
    contrast_threshold: float = 0.02  # OpenCV default 0.04; lower finds more keypoints in pale stains
    edge_threshold: float = 10.0
    sigma: float = 1.6


def detect_sift(image: np.ndarray, mask: np.ndarray | None, p: SiftParams) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints and descriptors of a uint8 image.

    Parameters
    ----------
    image : (H, W) uint8 array
    mask : (H, W) uint8 array (0 / 255) or None
    p : SiftParams

    Returns
    -------
    points : (N, 2) float array of (x, y)
    descriptors : (N, 128) float32 array
    """
    sift = cv2.SIFT_create(
        nfeatures=p.n_features,
        nOctaveLayers=p.n_octave_layers,
        contrastThreshold=p.contrast_threshold,
        edgeThreshold=p.edge_threshold,
        sigma=p.sigma,
    )
    if p.upright:  # one keypoint per location, orientation 0 (OpenCV duplicates multi-orientation points)
        kps = sift.detect(image, mask)
        seen, upright = set(), []
        for k in kps:
            key = (round(k.pt[0], 2), round(k.pt[1], 2), round(k.size, 2))
            if key not in seen:
                seen.add(key)
                k.angle = 0.0
                upright.append(k)
        kps, desc = sift.compute(image, upright) if upright else ((), None)
    else:
        kps, desc = sift.detectAndCompute(image, mask)
    if desc is None or not kps:
        return np.empty((0, 2)), np.empty((0, 128), np.float32)
    return np.array([k.pt for k in kps], dtype=np.float64), desc


@register
class Sift(Method):
    name = "sift"
    version = "2"
    description = "SIFT keypoints (OpenCV), ratio-test matching, MAGSAC++ affine, with failure detection."
    uses_preprocessing = True
    devices = ("cpu",)
    Params = SiftParams

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        p: SiftParams = self.params
        cv2.setRNGSeed(int(context.seed))
        factor = detection_factor((*fixed.shape, *moving.shape), p.detect_size)  # one factor for both
        img_f, mask_f = prepare_image(fixed.image, fixed.mask, p, factor)
        img_m, mask_m = prepare_image(moving.image, moving.mask, p, factor)
        kp_f, desc_f = detect_sift(img_f, mask_f, p)
        kp_m, desc_m = detect_sift(img_m, mask_m, p)
        kp_f, kp_m = to_view(kp_f, factor), to_view(kp_m, factor)
        if len(kp_f) < 3 or len(kp_m) < 3:
            raise RegistrationFailed(f"too few SIFT keypoints (fixed {len(kp_f)}, moving {len(kp_m)})")
        diagonal = float(np.hypot(*fixed.shape))
        return register_features(kp_m, desc_m, kp_f, desc_f, p, context.seed, diagonal, extra={"backend": "opencv-sift"},
                                 fixed_shape=fixed.shape, views=(fixed, moving))
