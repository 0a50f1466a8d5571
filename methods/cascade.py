"""``cascade``: the default composition of this project's methods (``docs/compose.md``).

A fallback chain (:mod:`bench.compose`): the first member whose result is not reported as failed and whose
landmark-free quality passes ``accept`` decides; the later members run only when the earlier ones did not
convince. The order and the threshold were chosen on generated data only (``benchmarks/cascade_study.py``).
"""

from __future__ import annotations

# the members register first (the registry imports method files in name order, cascade before them)
import bench.methods.iterative  # noqa: F401
import bench.methods.learned  # noqa: F401
import bench.methods.preprocessed  # noqa: F401
import bench.methods.sift  # noqa: F401

from bench import register
from bench.compose import Composite


@register
class Cascade(Composite):
    name = "cascade"
    expression = "sift|learned>iterative|preprocessed"
    description = ("sift; if it fails or its alignment scores low, the learned network refined by iterative; "
                   "then the preprocessing alone (fallback chain, chosen on generated data).")
