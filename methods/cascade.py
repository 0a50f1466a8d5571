"""``cascade``: the default composition of this project's methods (``docs/compose.md``).

A fallback chain (:mod:`bench.compose`): ``sift``, then ``iterative``, then the learned network refined by
``iterative``, then the preprocessing alone. The first member whose result is not reported as failed and whose
landmark-free quality (:func:`bench.quality.alignment_quality`) reaches ``accept`` (1.3) decides and the rest do
not run; when none does, the pair is refused (``refuse_below`` = ``accept``).

Chosen on generated data only (``docs/compose.md``, which names the study script). Inside the
cascade ``sift`` runs without its own evidence check (``min_evidence=0``): the cascade's quality check
replaces it and costs less (it works at 256 px), so the common case (sift accepted) takes about sift's time.
"""

from __future__ import annotations

from bench import register
from bench.compose import Composite


@register
class Cascade(Composite):
    name = "cascade"
    expression = "sift|iterative|learned>iterative|preprocessed"
    defaults = {"accept": 1.3, "refuse_below": 1.3, "sift": "min_evidence=0"}
    description = ("sift, else iterative, else learned refined by iterative, else the preprocessing: the first "
                   "result whose quality reaches 1.3, else refused (fallback chain chosen on generated data).")
