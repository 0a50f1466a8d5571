"""One generated pair: :func:`generate_pair` draws a tissue, two stains and a movement, renders both.

Every pair starts from one canonical base section (:mod:`.tissue`). The target is stain A of the base, in
the base frame; the source is stain B of the base moved by :mod:`.deform` (an affine ``A`` and a small
elastic displacement), rendered by :mod:`.stains`. ``true_matrix = A^-1`` (source -> target) is exact up to
the elastic part.
"""

from __future__ import annotations

import cv2
import numpy as np
from bench.datasets.synthetic.config import GeneratorConfig, SyntheticPair, Variation
from bench.datasets.synthetic.deform import _Elastic, _mirror, _sampling_maps, _source_frame
from bench.datasets.synthetic.fields import _blur
from bench.datasets.synthetic.stains import STAINS, render
from bench.datasets.synthetic.tissue import TISSUES, _landmarks, base_section

from bench.geometry import apply


def _choose(rng: np.random.Generator, tissue: str | None, source_stain: str | None,
            target_stain: str | None) -> tuple[str, str, str]:
    """Fill in the tissue and two *different* stains left as ``None``; validate the given ones."""
    for name, value, known in (("tissue", tissue, TISSUES), ("source_stain", source_stain, STAINS),
                               ("target_stain", target_stain, STAINS)):
        if value is not None and value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    tissue = tissue or TISSUES[int(rng.integers(len(TISSUES)))]
    if target_stain is None:
        target_stain = str(rng.choice([s for s in STAINS if s != source_stain]))
    if source_stain is None:
        source_stain = str(rng.choice([s for s in STAINS if s != target_stain]))
    return tissue, source_stain, target_stain


def generate_pair(seed: int, *, tissue: str | None = None, source_stain: str | None = None,
                  target_stain: str | None = None, config: GeneratorConfig = GeneratorConfig(),
                  variation: Variation = Variation()) -> SyntheticPair:
    """Generate one pair of differently stained sections with exact ground truth.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.SeedSequence(seed)``: same seed and config, same arrays.
    tissue, source_stain, target_stain : str, optional
        One of :data:`TISSUES` / :data:`STAINS`; drawn at random when ``None`` (two different stains).
    config : GeneratorConfig
    variation : Variation
        Mirrored sources and swapped fine texture; its own random streams, so with its defaults the pair
        is exactly the one generated without it.

    Returns
    -------
    SyntheticPair
        Target ``(H, W, 3)`` with ``max(H, W) == config.size``; source ``(H2, W2, 3)`` sized to hold the
        moved tissue; ``(N, 2)`` landmarks; ``true_matrix`` (3x3) maps source to target pixels, exact
        up to the elastic part (each component at most ``elastic_px`` in target pixels; its determinant is
        negative for a mirrored source).
    """
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
    pick, struct, geom, paint_t, paint_s, mirror_rng, swap_rng = streams
    tissue, source_stain, target_stain = _choose(pick, tissue, source_stain, target_stain)
    u = config.size / 800.0
    shape = (int(round(config.size * pick.uniform(*config.aspect_range))), config.size)
    if pick.random() < 0.25:
        shape = shape[::-1]
    channels, mask = base_section(struct, tissue, shape, u, config.hole_probability)
    target_landmarks = _landmarks(struct, channels, mask, config.n_landmarks, u)
    elastic = _Elastic.random(geom, config.elastic_px, config.size)
    mirrored, pre = "", None
    if mirror_rng.random() < variation.mirror_probability:
        mirrored = "lr" if mirror_rng.random() < 0.5 else "tb"
        pre = _mirror(shape, mirrored)
    a, source_shape = _source_frame(geom, config, mask, u, pre)
    source_landmarks = apply(a, elastic.invert(target_landmarks))
    mx, my = _sampling_maps(a, elastic, source_shape)
    source_channels = channels
    if variation.texture_swap_sigma > 0:  # consecutive cuts: same coarse structure, other cells
        sigma = variation.texture_swap_sigma * u
        other, _ = base_section(swap_rng, tissue, shape, u, 0.0)
        soft = _blur(mask.astype(np.float32), 0.6 * u)[..., None]
        fine = (other - _blur(other, sigma)) * soft
        source_channels = np.clip(_blur(channels, sigma) + fine, 0, 1.5).astype(np.float32)
    moved = cv2.remap(source_channels, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    source_mask = cv2.remap(mask.astype(np.float32), mx, my, cv2.INTER_LINEAR) > 0.5
    target_rgb = render(paint_t, channels, target_stain, u=u, jitter=config.stain_jitter,
                        dust=bool(paint_t.random() < config.dust_probability))
    source_rgb = render(paint_s, moved, source_stain, u=u, jitter=config.stain_jitter,
                        dust=bool(paint_s.random() < config.dust_probability))
    return SyntheticPair(
        source_rgb=source_rgb, target_rgb=target_rgb,
        source_landmarks=source_landmarks, target_landmarks=target_landmarks,
        true_matrix=np.linalg.inv(a), tissue=tissue, source_stain=source_stain,
        target_stain=target_stain, seed=int(seed), source_mask=source_mask, target_mask=mask, mirrored=mirrored,
    )
