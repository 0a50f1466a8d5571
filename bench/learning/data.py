"""Training data for the learned method: pairs -> shared preprocessing -> cached arrays -> augmented tensors.

Sources of pairs:

* the project's generator (:mod:`bench.datasets.synthetic`): any number of pairs from any seed;
* the ``training`` split of an ANHIR pair table (:func:`bench.pairs.load_table`).

Every pair goes once through :func:`bench.preprocess.prepare_pair` (resampling, tissue masks, inversion,
initial rotation) and is resampled so the longer side of the larger image is ``input_size``; the result is
cached as one ``.npz`` per pair (images, masks and, when known, landmarks in that network frame), so
epochs never re-run the preprocessing. :func:`augment` then applies independent random affine transforms
to source and target, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from bench import geometry
from bench.learning.model import matrix_to_theta, warp
from bench.preprocess import PreparedPair, PreprocessParams, prepare_pair


@dataclass
class CachedPair:
    """One preprocessed pair at network resolution.

    Attributes
    ----------
    key : str
        Cache key (pair identity + preprocessing + input size).
    moving, fixed : (H, W) float32 arrays
        Preprocessed source (rotation already applied) and target, tissue bright, background 0.
    moving_mask, fixed_mask : (H, W) bool arrays
    moving_points, fixed_points : (N, 2) float64 arrays or None
        Corresponding landmarks ``(x, y)`` in these frames (validation diagnostics only, never a loss).
    moving_valid : (H, W) bool array or None
        The moving image's field of view (:attr:`bench.method.ImageView.valid`); None = everywhere.
    """

    key: str
    moving: np.ndarray
    fixed: np.ndarray
    moving_mask: np.ndarray
    fixed_mask: np.ndarray
    moving_points: np.ndarray | None = None
    fixed_points: np.ndarray | None = None
    moving_valid: np.ndarray | None = None


def input_scales(shapes: Iterable[tuple[int, int]], input_size: int) -> tuple[float, list[tuple[int, int]]]:
    """Common factor so the longest side of all ``(H, W)`` shapes becomes ``input_size``, and new shapes."""
    shapes = list(shapes)
    factor = input_size / max(max(s) for s in shapes)
    return factor, [(max(1, round(h * factor)), max(1, round(w * factor))) for h, w in shapes]


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-resize an ``(H, W)`` float or bool image to ``shape`` ``(h, w)``."""
    if image.dtype == bool:
        return cv2.resize(image.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(image.astype(np.float32), shape[::-1], interpolation=cv2.INTER_AREA)


def shrink_prepared(
    prepared: PreparedPair, input_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resample a prepared pair to network resolution.

    Returns
    -------
    moving, moving_mask, fixed, fixed_mask : arrays at network resolution
    r_moving, r_fixed : (3, 3) arrays
        Working-frame pixels -> network-frame pixels, for the moving and the fixed image.
    """
    mv, fx = prepared.moving, prepared.fixed
    _, (ms, fs) = input_scales([mv.shape, fx.shape], input_size)
    r_m = geometry.resample_matrix(ms[1] / mv.shape[1], ms[0] / mv.shape[0])
    r_f = geometry.resample_matrix(fs[1] / fx.shape[1], fs[0] / fx.shape[0])
    moving = resize(np.where(mv.mask, mv.image, 0.0), ms)
    fixed = resize(np.where(fx.mask, fx.image, 0.0), fs)
    return moving, resize(mv.mask, ms), fixed, resize(fx.mask, fs), r_m, r_f


def _cache_key(identity: str, params: PreprocessParams, input_size: int) -> str:
    from bench import preprocess

    text = json.dumps(
        {"id": identity, "pre": repr(params), "stage": preprocess.STAGE_VERSION, "code": preprocess.stage_fingerprint(),
         "in": input_size},
        sort_keys=True,
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def prepare_cached(
    identity: str,
    paths: Callable[[], tuple[Path, Path]],
    points: Callable[[], tuple[np.ndarray | None, np.ndarray | None]],
    cache_dir: Path,
    params: PreprocessParams,
    input_size: int,
) -> CachedPair:
    """Load a pair from ``cache_dir`` or preprocess it (``paths()`` -> source, target files) and cache it.

    ``points()`` gives original-pixel source/target landmarks (or ``None``) mapped into the network frame.
    """
    key = _cache_key(identity, params, input_size)
    file = cache_dir / f"{key}.npz"
    if file.exists():
        with np.load(file) as z:
            get = {k: z[k] for k in z.files}
        return CachedPair(key, get["moving"], get["fixed"], get["moving_mask"], get["fixed_mask"],
                          get.get("moving_points"), get.get("fixed_points"), get.get("moving_valid"))
    source, target = paths()
    prepared = prepare_pair(source, target, params)
    moving, m_mask, fixed, f_mask, r_m, r_f = shrink_prepared(prepared, input_size)
    src_pts, tgt_pts = points()
    arrays = {"moving": moving, "fixed": fixed, "moving_mask": m_mask, "fixed_mask": f_mask}
    if prepared.moving.valid is not None:
        arrays["moving_valid"] = resize(prepared.moving.valid, moving.shape)
    if src_pts is not None and tgt_pts is not None:
        n = min(len(src_pts), len(tgt_pts))
        r_s = geometry.resample_matrix(*prepared.source_scale)
        r_t = geometry.resample_matrix(*prepared.target_scale)
        arrays["moving_points"] = geometry.apply(r_m @ prepared.source_pre @ r_s, src_pts[:n])
        arrays["fixed_points"] = geometry.apply(r_f @ r_t, tgt_pts[:n])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(file)
    return CachedPair(key, moving, fixed, m_mask, f_mask, arrays.get("moving_points"), arrays.get("fixed_points"),
                      arrays.get("moving_valid"))


def generated_pair(seed: int, size: int, cache_dir: Path, params: PreprocessParams, input_size: int) -> CachedPair:
    """One pair of :mod:`bench.datasets.synthetic` (``seed``, target longer side ``size``), preprocessed."""
    from bench.datasets import synthetic

    version = getattr(synthetic, "GENERATOR_VERSION", "?")
    raw = cache_dir / "raw"
    box: dict[str, object] = {}

    def make() -> object:
        if "pair" not in box:
            box["pair"] = synthetic.generate_pair(seed, config=synthetic.GeneratorConfig(size=size))
        return box["pair"]

    def paths() -> tuple[Path, Path]:
        pair = make()
        raw.mkdir(parents=True, exist_ok=True)
        out = []
        for name, rgb in (("source", pair.source_rgb), ("target", pair.target_rgb)):
            path = raw / f"gen{version}-s{size}-{seed}-{name}.png"
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            out.append(path)
        return out[0], out[1]

    def points() -> tuple[np.ndarray, np.ndarray]:
        pair = make()
        return pair.source_landmarks, pair.target_landmarks

    try:
        return prepare_cached(f"generated:v{version}:size{size}:seed{seed}", paths, points, cache_dir, params,
                              input_size)
    finally:
        for f in raw.glob(f"gen{version}-s{size}-{seed}-*.png"):
            f.unlink()


def anhir_pairs(table: Path, data_roots: list[Path], cache_dir: Path, params: PreprocessParams, input_size: int,
                status: str = "training") -> list[CachedPair]:
    """The ``status`` split of an ANHIR pair table, preprocessed and cached (rows with problems skipped)."""
    from bench.pairs import load_table, read_landmarks

    out = []
    for pair in load_table(table, data_roots):
        if pair.status != status or pair.problem:
            continue

        def points(pair=pair) -> tuple[np.ndarray | None, np.ndarray | None]:
            if not pair.scorable:
                return None, None
            return read_landmarks(pair.source_landmarks), read_landmarks(pair.target_landmarks)

        identity = f"anhir:{Path(pair.source_image).resolve()}:{Path(pair.target_image).resolve()}"
        out.append(prepare_cached(identity, lambda p=pair: (p.source_image, p.target_image), points, cache_dir,
                                  params, input_size))
    return out


# ---------------------------------------------------------------------------------------------
# Augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Random affine augmentation applied independently to source and target (paper, section 2.3)."""

    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.15)
    max_shear: float = 0.08
    max_translation_frac: float = 0.08  # of the image's longer side
    crop_probability: float = 0.0  # chance of cutting both images to one random window first
    crop_range: tuple[float, float] = (0.5, 0.9)  # window side / canvas side (drawn per axis)
    gamma_range: tuple[float, float] = (1.0, 1.0)  # per image: tissue intensities raised to a power in this range
    blur_probability: float = 0.0  # per image: chance of a Gaussian blur (a stain that shows no fine texture)
    blur_sigma: tuple[float, float] = (1.0, 3.0)  # its sigma range, network-input pixels
    swap_probability: float = 0.0  # chance of giving the moving image another section's fine texture
    swap_sigma: float = 2.0  # the fine band swapped: the image minus its Gaussian blur of this sigma (pixels)
    cut_probability: float = 0.0  # per image: chance of cutting it by its own frame, unknown to the network
    cut_range: tuple[float, float] = (0.6, 0.9)  # that frame's side / image side (drawn per axis)


def random_matrix(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig) -> np.ndarray:
    """A random 3x3 pixel transform about the centre of an ``(H, W)`` image."""
    h, w = shape
    return geometry.random_affine(
        rng,
        ((w - 1) / 2, (h - 1) / 2),
        max_rotation_deg=cfg.max_rotation_deg,
        scale_range=cfg.scale_range,
        max_shear=cfg.max_shear,
        max_translation=cfg.max_translation_frac * max(h, w),
    )


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad an ``(H, W)`` image at the bottom and right to ``shape`` (pixel coordinates unchanged)."""
    return np.pad(image, ((0, shape[0] - image.shape[0]), (0, shape[1] - image.shape[1])))


def common_canvas(*images: np.ndarray) -> list[np.ndarray]:
    """Pad images to their common ``(max H, max W)`` canvas, so ``theta`` = identity means pixel identity."""
    shape = (max(i.shape[0] for i in images), max(i.shape[1] for i in images))
    return [pad_to(i, shape) for i in images]


def common_view(*valid: np.ndarray) -> np.ndarray:
    """Where all of equally shaped fields of view (bool or [0, 1] float) have data, less a one-pixel rim.

    Multiplying both network inputs by it gives them the same frame edges: a section that fills its
    frame is cut by the frame, and two scans' frames need not correspond, so an edge only one image has
    would read as a tissue outline and pull the prediction towards matching frames instead of tissue.
    """
    inside = np.logical_and.reduce([np.asarray(v) > 0.5 for v in valid])
    return cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def as_input(image: np.ndarray) -> torch.Tensor:
    """A 2-D image as the network's ``(1, 1, H, W)`` float32 tensor (on the CPU)."""
    return torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]


def _warp_np(image: np.ndarray, matrix: np.ndarray) -> torch.Tensor:
    t = as_input(image)
    theta = torch.from_numpy(matrix_to_theta(matrix, image.shape, image.shape)).float()[None]
    return warp(t, theta, image.shape)


def to_tensors(pair: CachedPair, rng: np.random.Generator | None, cfg: AugmentConfig | None = None,
               others: list[CachedPair] | None = None, *, fov: bool = True, with_weights: bool = False):
    """Network inputs for one pair, augmented when ``rng`` is given.

    With ``fov`` both inputs are cut to their common field of view (:func:`common_view`), as the
    ``learned`` method does at inference; the augmentation's own zero-filled borders count as frame edges.

    Returns
    -------
    moving, fixed : (1, 1, H, W) float32 tensors (masked: background 0), padded to one common canvas
    matrices : tuple of two (3, 3) arrays
        The augmentation applied to moving and fixed (identity without ``rng``).
    weights : tuple of two (1, 1, H, W) float32 tensors or None, only ``with_weights``
        Where each image was not cut by an unknown frame (``cut_probability``): the loss counts only pixels
        inside both (None: nothing was cut). The network never sees them.
    """
    cfg = cfg or AugmentConfig()
    mv = np.where(pair.moving_mask, pair.moving, 0.0)
    fx = np.where(pair.fixed_mask, pair.fixed, 0.0)
    vm = np.ones(mv.shape, np.float32) if pair.moving_valid is None else pair.moving_valid.astype(np.float32)
    vf = np.ones(fx.shape, np.float32)
    if rng is not None and others and cfg.swap_probability > 0 and rng.random() < cfg.swap_probability:
        mv = swap_texture(mv, pair.moving_mask, others[int(rng.integers(len(others)))].fixed, cfg.swap_sigma)
    mv, fx, vm, vf = common_canvas(mv, fx, vm, vf)
    mats, weights = (np.eye(3), np.eye(3)), None
    if rng is not None:
        shift = np.eye(3)
        m_shape, f_shape = pair.moving.shape, pair.fixed.shape
        if cfg.crop_probability > 0 and rng.random() < cfg.crop_probability:
            (mv, fx, vm, vf), (x0, y0) = random_crop(rng, [mv, fx, vm, vf], pair.fixed_mask, cfg.crop_range)
            shift = geometry.translation(-x0, -y0)
            m_shape = f_shape = fx.shape
        cuts = [_random_frame(rng, img.shape, cfg) for img in (mv, fx)]
        if any(c is not None for c in cuts):
            weights = tuple(np.ones(mv.shape, np.float32) if c is None else c for c in cuts)
            mv, fx = (img * (1 if c is None else c) for img, c in zip((mv, fx), cuts, strict=True))
        mv, fx = restain(rng, mv, cfg), restain(rng, fx, cfg)
        a_m = random_matrix(rng, m_shape, cfg) @ shift
        a_f = random_matrix(rng, f_shape, cfg) @ shift
        mats = (a_m, a_f)
        w_m, w_f = a_m @ np.linalg.inv(shift), a_f @ np.linalg.inv(shift)
        mv, fx, vm, vf = (_warp_np(a, m)[0, 0].numpy() for a, m in ((mv, w_m), (fx, w_f), (vm, w_m), (vf, w_f)))
        if weights is not None:
            weights = (_warp_np(weights[0], w_m)[0, 0].numpy(), _warp_np(weights[1], w_f)[0, 0].numpy())
    if fov:
        common = common_view(vm, vf)
        mv, fx = mv * common, fx * common
    out = (as_input(mv), as_input(fx), mats)
    if with_weights:
        return (*out, None if weights is None else (as_input(weights[0]), as_input(weights[1])))
    return out


def _random_frame(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig) -> np.ndarray | None:
    """With ``cfg.cut_probability``: a 0/1 window of ``shape`` (side ``cut_range`` x the image's, anywhere).

    One image's own frame: tissue that fills it is cut there, and the other image's frame differs.
    """
    if cfg.cut_probability <= 0 or rng.random() >= cfg.cut_probability:
        return None
    h, w = shape
    ch, cw = (max(8, int(round(n * rng.uniform(*cfg.cut_range)))) for n in (h, w))
    y0, x0 = int(rng.integers(0, max(1, h - ch + 1))), int(rng.integers(0, max(1, w - cw + 1)))
    out = np.zeros(shape, np.float32)
    out[y0:y0 + ch, x0:x0 + cw] = 1.0
    return out


def swap_texture(image: np.ndarray, mask: np.ndarray, other: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` with its fine band (image minus its blur) replaced by that of ``other`` (resized to fit).

    Two consecutive real sections share the tissue's layout but not its cells: this keeps the coarse
    structure of ``image`` and puts another section's fine texture on it (inside ``mask``; 0 outside).
    """
    o = cv2.resize(np.asarray(other, np.float32), image.shape[::-1], interpolation=cv2.INTER_AREA)
    coarse = cv2.GaussianBlur(np.asarray(image, np.float32), (0, 0), sigma)
    fine = o - cv2.GaussianBlur(o, (0, 0), sigma)
    return np.where(mask, np.clip(coarse + fine, 1e-3, None), 0.0).astype(np.float32)


def restain(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Random intensity changes of one image (tissue > 0, background 0 kept): a gamma, sometimes a blur.

    Two real stains relate non-linearly and one may show fine texture the other lacks; the generator's stains
    are re-colourings of one texture, so these changes widen what the network sees.
    """
    lo, hi = cfg.gamma_range
    out = image
    if (lo, hi) != (1.0, 1.0):
        gamma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        out = np.where(out > 0, np.power(np.clip(out, 0, None), gamma), 0.0).astype(np.float32)
    if cfg.blur_probability > 0 and rng.random() < cfg.blur_probability:
        tissue = out > 0
        out = np.where(tissue, cv2.GaussianBlur(out.astype(np.float32), (0, 0), rng.uniform(*cfg.blur_sigma)), 0.0)
    return out


def random_crop(rng: np.random.Generator, images: list[np.ndarray], fixed_mask: np.ndarray,
                side_range: tuple[float, float]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """One random window, the same for all ``images`` of a common canvas, around the fixed tissue.

    Real sections often fill their frame, so their outline is cut off; generated ones lie whole on a blank
    slide. Cropping both images to one window (so their pixel correspondence is unchanged) shows the
    network tissue that fills the frame as well. Returns the crops and the window's ``(x0, y0)``.
    """
    h, w = images[0].shape
    ch = int(round(h * rng.uniform(*side_range)))
    cw = int(round(w * rng.uniform(*side_range)))
    ys, xs = np.nonzero(fixed_mask)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (h / 2, w / 2)
    y0 = int(np.clip(round(cy - ch / 2 + rng.uniform(-0.15, 0.15) * ch), 0, h - ch))
    x0 = int(np.clip(round(cx - cw / 2 + rng.uniform(-0.15, 0.15) * cw), 0, w - cw))
    return [img[y0:y0 + ch, x0:x0 + cw] for img in images], (x0, y0)
