"""``identity``: no preprocessing, identity matrix. The paper's "Initial" row (the error before alignment)."""

from __future__ import annotations

import numpy as np

from bench import Context, Estimate, ImageView, Method, register


@register
class Identity(Method):
    name = "identity"
    version = "2"
    description = "No alignment at all: the initial error (Table 1, 'Initial')."
    uses_preprocessing = False
    devices = ("cpu", "cuda")
    known_limits = {  # contract checks it fails by design (bench.conformance)
        "recovers_translation": "returns the identity by design: the 'Initial' row",
        "recovers_rotation": "returns the identity by design: the 'Initial' row",
        "recovers_known_transform": "returns the identity by design: the 'Initial' row",
    }

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        return Estimate(np.eye(3), frame="original")  # exactly the identity in original pixels
