"""Dataset adapters, installed as ``bench.datasets`` (never as a bare ``datasets``, which would shadow
Hugging Face's library): the ANHIR pair table (:mod:`bench.datasets.anhir`) and the embedded generated
sample (:mod:`bench.datasets.sample`, built by :mod:`bench.datasets.synthetic`)."""
