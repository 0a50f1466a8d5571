"""Dataset adapters, installed as ``bench.datasets`` (never as a bare ``datasets``, which would shadow
Hugging Face's library): each makes pairs in the harness's pair-table format (:mod:`bench.pairs`). Today:
the generator of stain pairs with exact ground truth (:mod:`bench.datasets.synthetic`) and the embedded
sample built with it (:mod:`bench.datasets.sample`). ANHIR's own tables are read by :mod:`bench.pairs`
directly: their format is the harness's."""
