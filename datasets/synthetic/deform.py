"""How the source is moved away from the base section, with exact ground truth.

The source shows the base section moved by a random affine ``A`` (rotation about the centre, log-uniform
scale, shear, a translation inside the margins; optionally after a mirror) and a small smooth elastic
displacement ``d`` (:class:`_Elastic`): source pixel ``x`` shows base point ``E(A^-1 x)`` with
``E(q) = q + d(q)``. :func:`_sampling_maps` gives those base positions as ``cv2.remap`` maps, and a base
landmark ``p`` lies at ``A E^-1(p)`` in the source (:meth:`_Elastic.invert`). A new deformation with known
ground truth (a displacement field and its inverse at the landmarks) belongs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from bench.datasets.synthetic.config import GeneratorConfig

from bench.geometry import apply, random_affine, translation


@dataclass(frozen=True)
class _Elastic:
    """Smooth displacement ``d(q) = sum_k a_k sin(w_k . q + phi_k)`` per component, ``|d_x|, |d_y| <= bound``."""

    amp: np.ndarray  # (2, K)
    freq: np.ndarray  # (2, K, 2)
    phase: np.ndarray  # (2, K)

    @classmethod
    def random(cls, rng: np.random.Generator, bound: float, size: float, modes: int = 4) -> _Elastic:
        amp = rng.dirichlet(np.ones(modes), size=2) * bound
        wavelength = rng.uniform(0.35, 0.9, (2, modes)) * size
        direction = rng.uniform(0, 2 * np.pi, (2, modes))
        freq = np.stack([np.cos(direction), np.sin(direction)], -1) * (2 * np.pi / wavelength)[..., None]
        return cls(amp, freq, rng.uniform(0, 2 * np.pi, (2, modes)))

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Displacement ``(dx, dy)`` at points ``(x, y)`` (arrays of one shape, float32 or float64)."""
        out = []
        for c in range(2):
            d = np.zeros_like(x)
            for a, (fx, fy), p in zip(self.amp[c], self.freq[c], self.phase[c], strict=True):
                d += (a * np.sin(fx * x + fy * y + p)).astype(x.dtype)
            out.append(d)
        return out[0], out[1]

    def invert(self, points: np.ndarray, tol: float = 1e-9, max_iter: int = 500) -> np.ndarray:
        """Solve ``q + d(q) = p`` for ``(N, 2)`` points ``p`` by fixed-point iteration (contraction)."""
        p = np.asarray(points, np.float64)
        q = p.copy()
        for _ in range(max_iter):
            dx, dy = self(q[:, 0], q[:, 1])
            q_new = p - np.stack([dx, dy], 1)
            if np.max(np.abs(q_new - q), initial=0.0) < tol:
                return q_new
            q = q_new
        raise RuntimeError("elastic displacement is not invertible by fixed-point iteration (too strong)")


def _mirror(shape: tuple[int, int], mirrored: str) -> np.ndarray:
    """The 3x3 mirror (base -> base) about the centre of a ``shape`` canvas: ``"lr"`` left-right, else
    top-bottom."""
    c = ((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    flip = np.diag([-1.0, 1.0, 1.0]) if mirrored == "lr" else np.diag([1.0, -1.0, 1.0])
    return translation(*c) @ flip @ translation(-c[0], -c[1])


def _source_frame(rng: np.random.Generator, cfg: GeneratorConfig, mask: np.ndarray,
                  u: float, pre: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Random affine ``A`` (base -> source pixels) and a source canvas ``(h, w)`` holding all the tissue.

    ``pre`` (3x3, base -> base, e.g. a mirror) is applied before the random affine.
    """
    h, w = mask.shape
    a0 = random_affine(rng, ((w - 1) / 2, (h - 1) / 2), max_rotation_deg=cfg.max_rotation_deg,
                       scale_range=cfg.scale_range, max_shear=cfg.max_shear)
    if pre is not None:
        a0 = a0 @ pre
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    moved = apply(a0, pts)
    reach = 2.0 * cfg.elastic_px * max(cfg.scale_range) * (1 + cfg.max_shear) + 2.0 * u + 2.0
    lo, hi = moved.min(0) - reach, moved.max(0) + reach
    margins = rng.uniform(0.02, 0.02 + 2 * cfg.max_translation_frac, 4) * cfg.size
    a = translation(margins[0] - lo[0], margins[1] - lo[1]) @ a0
    size = hi - lo + margins[:2] + margins[2:]
    return a, (int(np.ceil(size[1])), int(np.ceil(size[0])))


def _sampling_maps(a: np.ndarray, elastic: _Elastic, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each source pixel ``x`` the base position ``E(A^-1 x)`` as cv2.remap maps (float32)."""
    inv = np.linalg.inv(a)
    yy, xx = np.indices(shape, dtype=np.float32)
    ux = (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]).astype(np.float32)
    uy = (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]).astype(np.float32)
    dx, dy = elastic(ux, uy)
    return ux + dx, uy + dy
