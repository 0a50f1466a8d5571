"""The flip test of the rotation search: does the mirrored source (a slide scanned face down) fit better?

The best candidate of each mirror state comes from :func:`bench.preprocess.rotation.rotation_search`;
:func:`choose_mirror` decides by their NCC and, when that is a close call, by :func:`texture_mi`.
"""

from __future__ import annotations

import cv2
import numpy as np

from bench import imaging
from bench.preprocess.levels import reduce_image
from bench.preprocess.params import PreprocessParams


def texture_mi(source: np.ndarray, target: np.ndarray, matrices: np.ndarray, size: int = 256,
               sigma: float = 2.0, bins: int = 16, source_mask: np.ndarray | None = None,
               target_mask: np.ndarray | None = None, max_samples: int = 20000) -> np.ndarray:
    """Mutual information (nats) of the band-passed texture of ``target`` and of ``source`` warped by each
    working-frame matrix, inside the common tissue away from its outline: the flip test's tie-breaker.

    Both images are reduced to ``size`` px (longer side of the larger), band-passed by a difference of
    Gaussians (``sigma`` minus ``4 sigma``, pixels of that size), so the tissue outline and slow stain
    gradients (what a global NCC of masked images mostly measures) drop out and the structure inside the
    tissue remains; the masks (default: the images' non-zero pixels) are eroded by ``3 sigma`` so the
    outline's own band-pass response does not count. Rank-binned MI (``bins`` equal-frequency bins per
    image, :func:`bench.imaging.rank_mi` with edges at order statistics) allows any relation between the two
    stains. 0 when the common tissue has under 200 pixels.

    Parameters
    ----------
    source, target : (Hs, Ws), (Ht, Wt) float32 working-frame images (masked, tissue bright)
    matrices : (N, 3, 3) source -> target working-frame maps
    source_mask, target_mask : bool masks of the two images, or None (``image > 0``)

    Returns
    -------
    (N,) float64
    """
    r = size / max(*source.shape, *target.shape)
    out = []
    reduced = []
    for img, mask in ((source, source_mask), (target, target_mask)):
        small, rm = reduce_image(np.ascontiguousarray(img, np.float32), r)
        m = np.ascontiguousarray((img > 0) if mask is None else mask, bool)
        m = cv2.resize(m.view(np.uint8), small.shape[::-1], interpolation=cv2.INTER_NEAREST)
        k = 2 * int(round(3 * sigma)) + 1
        core = cv2.erode(m, np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        bp = cv2.GaussianBlur(small, (0, 0), sigma) - cv2.GaussianBlur(small, (0, 0), 4 * sigma)
        reduced.append((bp, core, rm))
    (bs, cs, rs), (bt, ct, rt) = reduced
    h, w = bt.shape
    for matrix in np.asarray(matrices, np.float64).reshape(-1, 3, 3):
        m2 = (rt @ matrix @ np.linalg.inv(rs))[:2]
        warped = imaging.warp(bs, m2, (h, w))
        common = imaging.warp(cs, m2, (h, w), nearest=True) & ct
        ys, xs = np.nonzero(common)
        if ys.size < 200:
            out.append(0.0)
            continue
        step = max(1, ys.size // max_samples)
        ys, xs = ys[::step], xs[::step]
        out.append(imaging.rank_mi(bt[ys, xs], warped[ys, xs], bins, interpolate=False))
    return np.asarray(out)


def choose_mirror(ncc: dict[bool, float], rigid: dict[bool, np.ndarray], source: np.ndarray,
                  target: np.ndarray, params: PreprocessParams, source_mask: np.ndarray | None = None,
                  target_mask: np.ndarray | None = None) -> tuple[bool, str, float | None, dict[str, float]]:
    """Whether the mirrored source wins, from the best candidate of each mirror state.

    The mirrored one wins when its NCC leads by more than ``params.flip_margin``; when the lead is in
    ``(-flip_mi_band, flip_margin]`` (a close call: a global NCC of masked images is dominated by the tissue
    outline, which a mirror barely changes) the band-passed texture MI of the two candidates decides
    (:func:`texture_mi` at ``flip_mi_size``); below, the unmirrored source stays.

    Parameters
    ----------
    ncc : mirrored (True) / not (False) -> the best NCC of that state; without True the test is off
    rigid : the same keys -> that candidate's (3, 3) working-frame matrix
    source, target, source_mask, target_mask : as for :func:`texture_mi`

    Returns
    -------
    flipped, decision ("off", "ncc" or "texture"), lead (ncc[True] - ncc[False], None when off), and the
    texture MI ``{"mi_unflipped", "mi_flipped"}`` when it decided (else empty)
    """
    flipped, decision, lead, mi = False, "off", None, {}
    if True in ncc:
        lead = ncc[True] - ncc[False]
        decision = "ncc"
        if lead > params.flip_margin:
            flipped = True
        elif lead > -params.flip_mi_band:  # a close call: the texture inside the tissue decides
            decision = "texture"
            mats = np.stack([rigid[False], rigid[True]])
            values = texture_mi(source, target, mats, params.flip_mi_size, source_mask=source_mask,
                                target_mask=target_mask)
            mi = {"mi_unflipped": float(values[0]), "mi_flipped": float(values[1])}
            flipped = bool(values[1] > values[0])
    return flipped, decision, lead, mi
