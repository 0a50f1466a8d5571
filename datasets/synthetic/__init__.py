"""Synthetic pairs of differently stained tissue sections with exact ground truth.

Every pair starts from one canonical *base* section, described by five stain-independent structure
channels (:data:`CHANNELS`: nuclei, cytoplasm, stroma, an immunohistochemical marker, basement membranes)
and a tissue outline. A *stain* is a colour model that turns those channels into optical density
(Beer-Lambert), so two stains of one base share the structure but differ in colour and intensity, as
consecutive sections of one block do.

* The **target** is stain A of the base, in the base frame.
* The **source** is stain B of the base moved by a random affine ``A`` (rotation up to
  ``max_rotation_deg`` about the centre, log-uniform scale, shear, a translation inside the margins)
  and a small smooth elastic displacement ``d``. Source pixel ``x`` shows base point ``E(A^-1 x)`` with
  ``E(q) = q + d(q)``; a base landmark ``p`` therefore lies at ``A E^-1(p)`` in the source, found by
  fixed-point iteration to better than 1e-6 px.
* ``true_matrix = A^-1`` (source -> target) is exact up to the elastic part, whose components are
  bounded by ``elastic_px`` (in base pixels).

Tissues: ``colon-ihc`` is skimage's real IHC image (colonic glands, DAB + hematoxylin) unmixed by colour
deconvolution and re-stained; ``kidney-like``, ``lung-like`` and ``breast-like`` are procedural (Voronoi
tubules, alveoli and fat cells, glomeruli, bronchioles, lobules, nuclei as small blobs).

One module per job:

* :mod:`.config`: the generator's version, :class:`GeneratorConfig`, :class:`Variation` and
  :class:`SyntheticPair`;
* :mod:`.fields`: the structure channels and the small raster helpers (noise, nuclei, Voronoi cells);
* :mod:`.tissue`: the tissue builders, :func:`base_section` and the landmarks sampled on it;
* :mod:`.stains`: the stain colour models and :func:`render` (stain, glass, dust, noise);
* :mod:`.deform`: how the source moves (affine, mirror, elastic displacement, sampling maps): the place
  for any new deformation with known ground truth;
* :mod:`.pair`: :func:`generate_pair`, which puts the above together;
* :mod:`.write`: :func:`write_pair`, :func:`dataset_plan`, :func:`write_dataset` (images, landmarks, table).
"""

from bench.datasets.synthetic.config import GENERATOR_VERSION, GeneratorConfig, SyntheticPair, Variation
from bench.datasets.synthetic.fields import CHANNELS
from bench.datasets.synthetic.pair import generate_pair
from bench.datasets.synthetic.stains import STAINS, render, stain_matrix
from bench.datasets.synthetic.tissue import TISSUES, base_section
from bench.datasets.synthetic.write import dataset_plan, write_dataset, write_pair

__all__ = [
    "CHANNELS",
    "GENERATOR_VERSION",
    "STAINS",
    "TISSUES",
    "GeneratorConfig",
    "SyntheticPair",
    "Variation",
    "base_section",
    "dataset_plan",
    "generate_pair",
    "render",
    "stain_matrix",
    "write_dataset",
    "write_pair",
]
