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

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        return Estimate(np.eye(3), frame="original")  # exactly the identity in original pixels
