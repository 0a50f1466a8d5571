"""``affine-io``: an affine by instance optimisation in torch (the ``deformable`` engine's affine mode).

Meant as a refinement after another initial method (``learned>affine-io``: the paper's network followed by
DeepHistReg-style refinement on the pair itself) or after the shared preprocessing alone. The engine
(:mod:`bench.methods._instance`) optimises ``x -> A (x - c) + c + t`` (fixed -> moving working pixels,
identity-initialised) by L-BFGS (or Adam) on the local NCC (or the global NCC) inside the dilated fixed
tissue mask, coarse to fine; the estimate is its inverse, moving -> fixed in the working frame. The transform is
parametrised in working pixels directly (no ``theta`` in normalised coordinates, so no conversion like
``bench.learning.model.theta_to_matrix`` is needed; ``_instance`` turns points into ``grid_sample``'s
normalised coordinates itself).

When the final similarity at the finest level is not above the start's, the identity (the start) is
returned (``kept_start``), so the refinement does not make its input worse by its own measure; a
non-finite or singular result raises :class:`bench.RegistrationFailed`.

Defaults chosen on generated pairs only (``studies/nonrigid_defaults.py``, ``docs/nonrigid.md``). Version 2:
L-BFGS with (20, 20, 20, 10) evaluations over 4 levels (32 to 256 px) instead of Adam's (100, 100, 60) steps
over 3: on generated pairs moved by random affines (2-15 degrees, 3-12 % scale, 12-100 px at 1024 px) the same
or a lower landmark error (0.5-0.8 px median) in a fifth of the time (0.22 vs 0.96 s per pair, one thread);
with 3 levels L-BFGS lost the larger starts (15 degrees: median 42 px after), the fourth, coarser level
brought them back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bench import Context, Estimate, ImageView, Method, register


@dataclass(frozen=True)
class AffineIOParams:
    """Typed, defaulted parameters of ``affine-io``."""

    size: int = 256  # longer side of the finest level, pixels
    levels: int = 4  # pyramid levels, each half the size of the next
    iterations: tuple[int, ...] = (20, 20, 20, 10)  # per level, coarsest first: L-BFGS evaluations (Adam: steps)
    learning_rate: float = 1.0  # L-BFGS: step scale of its line search; Adam: step of the linear part (and of
    #                             the translation / half the image), e.g. 0.002 with (100, 100, 60) steps
    similarity: Literal["local", "global"] = "local"  # local NCC (window) or global NCC
    window: int = 7  # local NCC window, level pixels (odd)
    use_mask: bool = True  # similarity inside the fixed tissue mask dilated by one window
    optimiser: Literal["adam", "lbfgs"] = "lbfgs"  # L-BFGS (strong Wolfe line search) or Adam
    keep_start: bool = True  # return the identity when the final similarity is not above the start's


@register
class AffineIO(Method):
    name = "affine-io"
    kind = "affine"
    version = "2"
    description = "Affine by instance optimisation (torch, local NCC, multi-level, L-BFGS): a refinement step."
    uses_preprocessing = True
    devices = ("cpu", "cuda")
    Params = AffineIOParams

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        from bench.methods._instance import check_inputs, finest_similarity, optimise_affine

        p: AffineIOParams = self.params
        check_inputs(self.name, fixed, moving, p.window)
        t0 = time.perf_counter()
        res = optimise_affine(fixed, moving, size=p.size, levels=p.levels, iterations=p.iterations,
                              learning_rate=p.learning_rate, window=p.window, similarity=p.similarity,
                              use_mask=p.use_mask, device=context.device, seed=context.seed,
                              optimiser=p.optimiser)
        matrix = res.matrix
        diag = dict(res.diagnostics)
        kept = False
        if p.keep_start:
            kw = dict(size=p.size, window=p.window, use_mask=p.use_mask, kind=p.similarity, device=context.device)
            start = finest_similarity(fixed, moving, **kw)
            end = finest_similarity(fixed, moving, matrix_inv=np.linalg.inv(matrix), **kw)
            diag["similarity_start"], diag["similarity_end"] = round(start, 6), round(end, 6)
            if not end > start:
                kept, matrix = True, np.eye(3)
        diag["kept_start"] = kept
        diag["seconds"] = round(time.perf_counter() - t0, 3)
        return Estimate(matrix, diag)
