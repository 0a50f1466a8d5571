"""``preprocessed``: identity after the shared preprocessing (resampling, masks, initial rotation).

The paper's "Preprocessed" row: how far the shared stage alone gets, and the floor every other method
starts from.
"""

from __future__ import annotations

import numpy as np

from bench import Context, Estimate, ImageView, Method, register


@register
class Preprocessed(Method):
    name = "preprocessed"
    version = "1"
    description = "The shared preprocessing alone (initial rotation), no further alignment (Table 1, 'Preprocessed')."
    uses_preprocessing = True
    devices = ("cpu", "cuda")
    known_limits = {  # contract checks it fails by design (bench.conformance)
        "recovers_translation": "adds nothing to the shared preprocessing, which the direct checks leave out",
        "recovers_rotation": "adds nothing to the shared preprocessing, which the direct checks leave out",
        "recovers_known_transform": "the preprocessing recovers translation and rotation only, not scale or shear",
    }

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        return Estimate(np.eye(3))
