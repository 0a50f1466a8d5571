"""The shared preprocessing stage (Algorithm 1, steps 1-6): runs once per pair, before every method.

``prepare_pair(source, target, params, full=True)`` returns a :class:`PreparedPair`: both images in a
common *working frame* (one constant resampling factor per pair), tissue masks, and the transform the
stage already applied to the source (centre-of-mass translation, initial rotation, optional flip).
``full=False`` is the light stage for methods that do not use the shared preprocessing: load, resample,
grayscale, invert only (no mask, no rotation, the moving image keeps its own shape).

Steps of the full stage (see ``docs/preprocessing.md``), and the module that does each:

1. read both headers, pick ``factor = working_size / longer side of the larger image`` (never above 1
   unless ``upsample``), decode each image reduced as far as possible (:mod:`bench.imageio`) and resample
   it with ``cv2.INTER_AREA`` by that factor, keeping the exact per-axis scales (:mod:`.images`);
2. grayscale and invert (tissue bright) (:mod:`.images`, :func:`view_from`);
3. tissue mask: smoothed Laplacian magnitude, thresholded, cleaned by morphology (:mod:`.masks`,
   :func:`tissue_mask`); the background is set to 0;
4. initial rotation (:mod:`.rotation`, :func:`rotation_search`): the source's tissue centre of mass onto the
   target's, then every angle of the full circle at once (one batch of warps by ``cv2.remap`` on stacked
   sampling maps, global NCC, each angle at its best shift by one batched FFT cross-correlation: the reduced
   images and the batched scoring are :mod:`.levels`), refined around the best coarse angles; optionally the
   mirrored source too, the flip test deciding (:mod:`.flip`, :func:`texture_mi`); on a close call the
   other mirror state is kept as :attr:`PreparedPair.alternative` and the harness lets the methods' answers
   decide (``bench.work``);
5. the source (colour, mask, image) is warped by the result ``source_pre`` into the target's frame
   (:mod:`.stage`, which runs the steps: :func:`prepare_pair`).

The parameters and the stage's version are in :mod:`.params`; what else its results depend on (its code and
libraries, for the cache's key) in :mod:`.fingerprint`. Warps and the rank-binned mutual information
are the shared ones of :mod:`bench.imaging`.
"""

from bench.imageio import ImageLoadError
from bench.preprocess.fingerprint import stage_fingerprint
from bench.preprocess.flip import texture_mi
from bench.preprocess.images import view_from
from bench.preprocess.levels import shift_batch, warp_batch
from bench.preprocess.masks import tissue_mask
from bench.preprocess.params import STAGE_VERSION, PreprocessParams, params_dict
from bench.preprocess.rotation import branch_matrix, candidate_matrices, rotation_search
from bench.preprocess.stage import PreparedPair, prepare_pair

__all__ = [
    "STAGE_VERSION",
    "ImageLoadError",
    "PreparedPair",
    "PreprocessParams",
    "branch_matrix",
    "candidate_matrices",
    "params_dict",
    "prepare_pair",
    "rotation_search",
    "shift_batch",
    "stage_fingerprint",
    "texture_mi",
    "tissue_mask",
    "view_from",
    "warp_batch",
]
