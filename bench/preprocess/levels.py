"""The rotation search's working levels: both images reduced by one factor (:class:`Level`,
:func:`reduce_image`) and the batched scoring of candidate matrices there (:func:`warp_batch`, global NCC,
:func:`shift_batch`)."""

from __future__ import annotations

import cv2
import numpy as np

from bench import geometry
from bench.imageio import target_size
from bench.preprocess.params import PreprocessParams


def warp_batch(source: np.ndarray, shape: tuple[int, int], matrices: np.ndarray) -> np.ndarray:
    """``source`` warped by each of ``matrices`` into a frame of ``shape``, in a few remap calls.

    Parameters
    ----------
    source : (Hs, Ws) float32
    shape : (Ht, Wt) of the output frame
    matrices : (N, 3, 3) source pixel -> output pixel maps

    Returns
    -------
    (N, Ht, Wt) float32, bilinear, 0 outside the source.

    The sampling maps of the whole batch are built by broadcasting and stacked into one tall image, so
    ``cv2.remap`` warps many candidates per call (chunks of at most 32000 rows, OpenCV's limit).
    """
    ht, wt = shape
    inv = np.linalg.inv(np.asarray(matrices, np.float64))[:, :2].astype(np.float32)  # out px -> source px
    xs = np.arange(wt, dtype=np.float32)
    ys = np.arange(ht, dtype=np.float32)[:, None]
    mx = inv[:, 0, 0, None, None] * xs + (inv[:, 0, 1, None, None] * ys + inv[:, 0, 2, None, None])
    my = inv[:, 1, 0, None, None] * xs + (inv[:, 1, 1, None, None] * ys + inv[:, 1, 2, None, None])
    n = len(inv)
    out = np.empty((n, ht, wt), np.float32)
    per = max(1, 32000 // ht)
    src = np.ascontiguousarray(source, np.float32)
    for i in range(0, n, per):
        k = min(per, n - i)
        cv2.remap(src, mx[i: i + k].reshape(k * ht, wt), my[i: i + k].reshape(k * ht, wt), cv2.INTER_LINEAR,
                  dst=out[i: i + k].reshape(k * ht, wt), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def _stats_ncc(warped: np.ndarray, target: np.ndarray) -> np.ndarray:
    """NCC of each ``(N, P)`` warped image with the ``(P,)`` target (no BLAS: einsum, single thread)."""
    t = target.astype(np.float32) - np.float32(target.mean())
    n = t.size
    cov = np.einsum("np,p->n", warped, t).astype(np.float64)
    total = np.einsum("np->n", warped).astype(np.float64)
    var_s = np.einsum("np,np->n", warped, warped).astype(np.float64) - total**2 / n
    var_t = float(np.einsum("p,p->", t, t))
    return cov / np.sqrt(np.maximum(var_s, 1e-12) * max(var_t, 1e-12))


def shift_batch(warped: np.ndarray, target: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """For each warped image, the translation that best moves it onto ``target`` and the NCC there.

    Cross-correlation of the zero-mean images by one batched FFT (zero padding: no wrap-around within
    the allowed range), searched within ``|dx|, |dy| <= max_shift`` pixels, a parabola through the peak
    along each axis for sub-pixel precision. The NCC is normalised by the whole images' energies.

    Parameters
    ----------
    warped : (N, H, W) float32
    target : (H, W) float32
    max_shift : largest shift searched, pixels

    Returns
    -------
    shifts : (N, 2) ``(dx, dy)`` pixels
    ncc : (N,) float64
    """
    from scipy import fft

    n, h, w = warped.shape
    m = int(max(1, min(max_shift, max(h, w) - 1)))
    size = (fft.next_fast_len(h + m, real=True), fft.next_fast_len(w + m, real=True))
    a = warped - warped.mean(axis=(1, 2), keepdims=True)
    b = target - target.mean()
    norm = np.sqrt(np.einsum("nhw,nhw->n", a, a).astype(np.float64) * float((b * b).sum()))
    spec = fft.rfft2(a, size, axes=(1, 2))
    del a
    np.conjugate(spec, out=spec)  # in place: fewer large temporaries (page faults are costly here)
    spec *= fft.rfft2(b, size)
    corr = fft.irfft2(spec, size, axes=(1, 2))
    del spec
    d = np.r_[-m: m + 1]
    win = corr[:, d % size[0]][:, :, d % size[1]] / np.maximum(norm, 1e-12)[:, None, None]  # (N, dy, dx)
    flat = win.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, win.shape[1:])
    k = np.arange(n)
    peak = win[k, iy, ix]

    def offset(lo, hi):  # vectorised parabola through (lo, peak, hi)
        den = lo - 2 * peak + hi
        ok = den < 0
        return np.where(ok, np.clip(0.5 * (lo - hi) / np.where(ok, den, -1.0), -0.5, 0.5), 0.0)

    last = 2 * m
    oy = offset(win[k, np.maximum(iy - 1, 0), ix], win[k, np.minimum(iy + 1, last), ix])
    ox = offset(win[k, iy, np.maximum(ix - 1, 0)], win[k, iy, np.minimum(ix + 1, last)])
    oy[(iy == 0) | (iy == last)] = 0.0
    ox[(ix == 0) | (ix == last)] = 0.0
    return np.stack([d[ix] + ox, d[iy] + oy], axis=1), peak.astype(np.float64)


def reduce_image(image: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Image resized by about ``r`` and its exact (3, 3) resample matrix (original px -> reduced px).

    Halvings by ``cv2.pyrDown`` (Gaussian, fast; pixel ``i`` sits at ``2 i``) while more than 2x too
    large, then ``cv2.INTER_AREA`` the rest of the way (pixel-centre convention).
    """
    if r >= 1:
        return image, np.eye(3)
    h, w = image.shape[:2]
    nw, nh = target_size((h, w), r)
    matrix = np.eye(3)
    while image.shape[1] >= 2 * nw and image.shape[0] >= 2 * nh:
        image = cv2.pyrDown(image)
        matrix = geometry.scaling(0.5) @ matrix
    ih, iw = image.shape[:2]
    if (iw, ih) != (nw, nh):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        matrix = geometry.resample_matrix(nw / iw, nh / ih) @ matrix
    return image, matrix


class Level:
    """Source and target reduced by one factor; scores candidate working-frame matrices there."""

    def __init__(self, source: np.ndarray, target: np.ndarray, size: int, params: PreprocessParams,
                 finer: Level | None = None) -> None:
        side = max(*source.shape, *target.shape)
        if finer is not None and size < max(*finer.s.shape, *finer.t.shape):  # reduce the finer level
            sub = size / max(*finer.s.shape, *finer.t.shape)
            (self.s, rs), (self.t, rt) = reduce_image(finer.s, sub), reduce_image(finer.t, sub)
            self.rs, self.rt = rs @ finer.rs, rt @ finer.rt
        else:
            self.s, self.rs = reduce_image(source, size / side)
            self.t, self.rt = reduce_image(target, size / side)
        self.max_shift = params.max_shift * max(self.t.shape)

    def warp(self, matrices: np.ndarray) -> np.ndarray:
        return warp_batch(self.s, self.t.shape, self.rt @ matrices @ np.linalg.inv(self.rs))

    def ncc(self, matrices: np.ndarray) -> np.ndarray:
        """(N,) NCC of the source warped by each working-frame matrix."""
        return _stats_ncc(self.warp(matrices).reshape(len(matrices), -1), self.t.reshape(-1))

    def shifted(self, matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) best NCC over shifts and (N, 2) the working-frame shift giving it."""
        shifts, ncc = shift_batch(self.warp(matrices), self.t, self.max_shift)
        return ncc, shifts / [self.rt[0, 0], self.rt[1, 1]]
