"""``deformable``: a dense displacement field by instance optimisation in torch (DeepHistReg-style).

A nonrigid stage: it refines an alignment that is already close (after the shared preprocessing, or as the
second step of ``sift>deformable``, ``cascade>deformable``), and returns the identity matrix with a
:class:`bench.deformation.Deformation` on the fixed working frame. The engine (:mod:`bench.methods._instance`)
optimises a displacement field, coarse to fine over ``levels`` levels whose finest has the longer side
``size`` pixels (the field lives on that grid), by Adam on the local NCC (``window``) between the fixed image
and the warped moving image inside the dilated fixed tissue mask, plus ``regularisation`` x diffusion (squared
gradients of the field).

The result is checked: a non-finite field, or one that folds on more than ``max_folding`` of its grid, raises
:class:`bench.RegistrationFailed` (a ``failed`` row, never a wild answer); when the final local NCC at the
finest level is not above the start's (``u = 0``), the zero field is returned (``kept_start``), so the stage
does not make an alignment worse by its own measure.

Defaults were chosen on generated pairs only (``studies/nonrigid_defaults.py``, ``docs/nonrigid.md``):
two-stain generated pairs of the four generated tissues, the source's fine structure from another section
(texture swap, as consecutive cuts), aligned by their exact affine, then deformed by known smooth random
fields (8 px / sigma 60, 16 / 100 and 24 / 150 working px at 1024 px) or not at all; the landmark error
after (median and worst pair) and the time per pair on one CPU thread decided ``size``, the iterations, the
learning rate, the window and the regulariser weight. Version 2 (issue 19, second round): the coarse levels
get (300, 300, 200) Adam steps instead of (100, 100, 100), the finest still 60: the larger fields were not
converged at the coarse levels (24 px set: median 2.07 -> 1.47 px, worst 3.34 -> 2.59 px), for about the
cost of 35 more steps at the finest level. A finer grid (768 px), a larger window, a stronger or weaker
regulariser and a larger learning rate were not better (``docs/nonrigid.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bench import Context, Estimate, ImageView, Method, RegistrationFailed, register
from bench.deformation import LOCAL_REFINEMENT_LIMITS, Deformation, folding


@dataclass(frozen=True)
class DeformableParams:
    """Typed, defaulted parameters of ``deformable``."""

    size: int = 512  # longer side of the finest level (the field's grid), pixels
    levels: int = 4  # pyramid levels, each half the size of the next
    iterations: tuple[int, ...] = (300, 300, 200, 60)  # Adam steps per level, coarsest first
    learning_rate: float = 0.1  # Adam step, level pixels
    regularisation: float = 30.0  # weight of the diffusion term (mean squared field gradient)
    window: int = 7  # local NCC window, level pixels (odd)
    use_mask: bool = True  # similarity inside the fixed tissue mask dilated by one window
    features: Literal["intensity", "gradient", "both"] = "intensity"  # what the similarity compares: intensity, gradient (magnitude) or both
    optimiser: Literal["adam", "lbfgs"] = "adam"  # Adam, or L-BFGS (iterations = evaluations; learning_rate 1)
    smoothing: float = 0.0  # > 0: Gaussian sigma (level px) turning the optimised variable into the field
    max_folding: float = 0.005  # share of the field allowed a non-positive Jacobian before it fails
    keep_start: bool = True  # return the zero field when the final similarity is not above the start's


@register
class Deformable(Method):
    name = "deformable"
    kind = "nonrigid"
    version = "2"
    description = "Dense displacement field by instance optimisation (torch, local NCC, diffusion, multi-level)."
    uses_preprocessing = True
    devices = ("cpu", "cuda")
    Params = DeformableParams
    known_limits = LOCAL_REFINEMENT_LIMITS  # contract checks it fails by design (bench.conformance)

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        from bench.methods._instance import check_inputs, finest_similarity, optimise_field

        p: DeformableParams = self.params
        check_inputs(self.name, fixed, moving, p.window)
        t0 = time.perf_counter()
        res = optimise_field(fixed, moving, size=p.size, levels=p.levels, iterations=p.iterations,
                             learning_rate=p.learning_rate, regularisation=p.regularisation, window=p.window,
                             use_mask=p.use_mask, device=context.device, seed=context.seed,
                             features=p.features, smoothing=p.smoothing, optimiser=p.optimiser)
        d = Deformation(res.field, fixed.shape)
        share = folding(d)
        diag = dict(res.diagnostics)
        diag["folding"] = round(share, 6)
        diag["max_displacement_px"] = round(float(np.linalg.norm(d.field, axis=2).max()), 3)
        if share > p.max_folding:
            raise RegistrationFailed(f"deformable field folds on {100 * share:.2f} % of its grid "
                                     f"(limit {100 * p.max_folding:.2f} %)")
        kept = False
        if p.keep_start:
            kw = dict(size=p.size, window=p.window, use_mask=p.use_mask, device=context.device, features=p.features)
            start = finest_similarity(fixed, moving, **kw)
            end = finest_similarity(fixed, moving, field=d.field, **kw)
            diag["similarity_start"], diag["similarity_end"] = round(start, 6), round(end, 6)
            if not end > start:
                kept = True
                d = Deformation.zeros(fixed.shape, d.grid_shape)
        diag["kept_start"] = kept
        diag["seconds"] = round(time.perf_counter() - t0, 3)
        return Estimate(np.eye(3), diag, deformation=d)
