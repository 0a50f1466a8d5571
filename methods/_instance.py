"""Instance optimisation in torch (DeepHistReg-style): the shared engine of ``deformable`` and ``affine-io``.

Nothing is learned: for one pair, a transform is optimised directly by gradient descent (Adam) on a
similarity between the fixed image and the moving image warped by it (``grid_sample``), coarse to fine.

* **Pyramid**: the working images are resized (``cv2.resize``, ``INTER_AREA``) so that the fixed image's
  longer side is ``size`` at the finest level, halved per coarser level; the moving image is resized by the
  same factors. Every level's grid follows the ``cv2.resize`` pixel-centre convention, so the field of the
  finest level is a :class:`bench.deformation.Deformation` grid as it is.
* **Similarity**: local normalised cross-correlation in a ``window`` x ``window`` box (squared, so the sign of
  the stains' contrast does not matter; VoxelMorph / DeepHistReg's form), averaged over the fixed tissue
  mask dilated by one window (everything when the mask is empty or covers the image); ``global`` NCC for the
  affine mode is the squared correlation over that same mask.
* **Field mode**: a displacement field, one vector per pixel of each level, in that level's pixels; the
  regulariser is diffusion (mean squared forward differences of the field, per level pixel, i.e. of the
  dimensionless gradient of ``u``), weighted by ``regularisation``; the field is upsampled bilinearly between
  levels. The fixed point ``x`` is compared with the moving image at ``M^-1 (x + u(x))`` (``M`` an initial
  matrix, the identity for the methods here).
* **Affine mode**: ``A (x - c) + c + t`` (fixed -> moving working pixels, ``c`` the fixed image's centre),
  identity-initialised, the linear part and the translation (in units of half the fixed image's longer side)
  optimised by Adam at every level; the estimate is its inverse (moving -> fixed).

CPU runs are deterministic for a seed (``torch.manual_seed(context.seed)``; nothing here is random, the seed
only pins anything torch might draw); the number of threads is torch's current setting (the harness caps it
per worker). ``cuda`` is used when asked for and available.

A private module of the methods package (not a method): torch is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from bench import ImageView, RegistrationFailed


@dataclass
class Level:
    """One pyramid level: images, weights and the fixed working coordinates of its grid (torch tensors)."""

    fixed: Any  # (1, C, h, w) feature channels (see features)
    moving: Any  # (1, C, hm, wm)
    weight: Any  # (1, 1, h, w) similarity weight (dilated fixed tissue)
    coords: Any  # (1, h, w, 2) fixed working (x, y) of the grid points
    spacing: tuple[float, float]  # working pixels per level pixel (x, y)


@dataclass
class Result:
    """What an optimisation returns: the field (working px, finest grid) or the matrix, and a record."""

    field: np.ndarray | None = None  # (h, w, 2) float32, working pixels
    matrix: np.ndarray | None = None  # (3, 3) moving working -> fixed working
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_inputs(name: str, fixed: ImageView, moving: ImageView, window: int) -> None:
    """What both engine methods refuse before any work: a bad window (ValueError: a parameter error) or an
    empty tissue mask (RegistrationFailed: nothing to register)."""
    from bench import RegistrationFailed

    if window < 1 or window % 2 == 0:
        raise ValueError(f"{name}: window must be odd and positive, got {window}")
    if not fixed.mask.any() or not moving.mask.any():
        raise RegistrationFailed("empty tissue mask: nothing to register")


def pick_device(requested: str) -> str:
    """``cuda`` when asked for and available, else ``cpu``."""
    import torch

    return "cuda" if requested == "cuda" and torch.cuda.is_available() else "cpu"


def level_shapes(shape: tuple[int, int], size: int, levels: int, min_side: int = 16) -> list[tuple[float, tuple[int, int]]]:
    """``(factor, (h, w))`` per level, coarsest first: the finest has its longer side ``size`` (never upsampled),
    each coarser one half the previous factor; levels whose shorter side would be below ``min_side`` dropped.

    >>> [s for _, s in level_shapes((600, 1000), 512, 3)]
    [(77, 128), (154, 256), (307, 512)]
    """
    h, w = shape
    base = min(1.0, float(size) / max(h, w))
    out = []
    for k in range(int(levels) - 1, -1, -1):
        f = base / 2**k
        s = (max(1, int(round(h * f))), max(1, int(round(w * f))))
        if min(s) >= min_side or k == 0:
            out.append((f, s))
    return out


def _weights(mask: np.ndarray, shape: tuple[int, int], dilation: int) -> np.ndarray:
    """The fixed tissue mask at a level's size, dilated by ``dilation`` level pixels, as float32 0/1
    (everything when the mask is empty, nearly empty or complete)."""
    h, w = shape
    m = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.0
    if m.mean() < 0.01 or m.all():
        return np.ones((h, w), np.float32)
    if dilation > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        m = cv2.dilate(m.astype(np.uint8), k) > 0
    return m.astype(np.float32)


FEATURES = ("intensity", "gradient", "both")


def feature_channels(image: np.ndarray, kind: str) -> np.ndarray:
    """``(C, h, w)`` float32 channels compared by the similarity: the image (``intensity``), its gradient
    magnitude (``gradient``: central differences, divided by its 99th percentile so both images' edges have
    the same scale whatever their stains' contrast), or both.

    >>> feature_channels(np.zeros((4, 5), np.float32), "both").shape
    (2, 4, 5)
    """
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {kind!r}")
    img = np.asarray(image, np.float32)
    out = []
    if kind in ("intensity", "both"):
        out.append(img)
    if kind in ("gradient", "both"):
        gy, gx = np.gradient(img)
        mag = np.sqrt(gx * gx + gy * gy)
        top = float(np.percentile(mag, 99)) if mag.size else 0.0
        out.append(mag / top if top > 0 else mag)
    return np.stack(out).astype(np.float32)


def pyramid(fixed: ImageView, moving: ImageView, size: int, levels: int, window: int,
            use_mask: bool, device: str, kind: str = "intensity") -> list[Level]:
    """The levels, coarsest first, as tensors on ``device``; ``kind``: the :func:`feature_channels` compared."""
    import torch

    big_h, big_w = fixed.shape
    mh, mw = moving.shape
    out = []
    for f, (h, w) in level_shapes((big_h, big_w), size, levels):
        hm, wm = max(1, int(round(mh * f))), max(1, int(round(mw * f)))
        fi = cv2.resize(np.asarray(fixed.image, np.float32), (w, h), interpolation=cv2.INTER_AREA)
        mi = cv2.resize(np.asarray(moving.image, np.float32), (wm, hm), interpolation=cv2.INTER_AREA)
        wt = _weights(fixed.mask, (h, w), window) if use_mask else np.ones((h, w), np.float32)
        sx, sy = big_w / w, big_h / h
        xs = (np.arange(w) + 0.5) * sx - 0.5
        ys = (np.arange(h) + 0.5) * sy - 0.5
        gx, gy = np.meshgrid(xs, ys)
        coords = np.stack([gx, gy], axis=-1)[None].astype(np.float32)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        out.append(Level(t(feature_channels(fi, kind)[None]), t(feature_channels(mi, kind)[None]),
                         t(wt[None, None]), t(coords), (sx, sy)))
    return out


def local_ncc(f: Any, m: Any, weight: Any, window: int, eps: float = 1e-5) -> Any:
    """Weighted mean of the squared local NCC of two ``(1, C, h, w)`` tensors, averaged over the channels
    (1: perfect, 0: unrelated)."""
    import torch
    import torch.nn.functional as F

    stack = torch.cat([f, m, f * f, m * m, f * m], dim=1)
    # the box mean as two 1-D passes (2 k instead of k^2 operations per pixel); exact with
    # count_include_pad=False, since every row of a window has the same number of valid pixels
    half = window // 2
    mu = F.avg_pool2d(stack, (1, window), stride=1, padding=(0, half), count_include_pad=False)
    mu = F.avg_pool2d(mu, (window, 1), stride=1, padding=(half, 0), count_include_pad=False)
    mf, mm, ff, mmm, fm = mu.chunk(5, dim=1)
    cross = fm - mf * mm
    vf = (ff - mf * mf).clamp_min(0)
    vm = (mmm - mm * mm).clamp_min(0)
    cc = (cross * cross / (vf * vm + eps)).mean(dim=1)
    w = weight[:, 0]
    return (cc * w).sum() / w.sum().clamp_min(1e-12)


def global_ncc(f: Any, m: Any, weight: Any, eps: float = 1e-8) -> Any:
    """Weighted squared correlation coefficient of two ``(1, C, h, w)`` tensors, averaged over the channels."""
    w = weight / weight.sum().clamp_min(1e-12)
    dims = (0, 2, 3)
    mf, mm = (f * w).sum(dims, keepdim=True), (m * w).sum(dims, keepdim=True)
    cross = ((f - mf) * (m - mm) * w).sum(dims)
    vf, vm = (((f - mf) ** 2) * w).sum(dims), (((m - mm) ** 2) * w).sum(dims)
    return (cross * cross / (vf * vm + eps)).mean()


def _sample(level: Level, moving_points: Any, moving_shape: tuple[int, int]) -> Any:
    """The level's moving image at moving working points ``(1, h, w, 2)`` (zeros outside)."""
    import torch
    import torch.nn.functional as F

    big_mh, big_mw = moving_shape
    scale = torch.tensor([2.0 / big_mw, 2.0 / big_mh], dtype=moving_points.dtype, device=moving_points.device)
    grid = (2.0 * moving_points + 1.0) * scale * 0.5 - 1.0  # align_corners=False normalised
    return F.grid_sample(level.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _apply_inverse(matrix_inv: Any, points: Any) -> Any:
    return points @ matrix_inv[:2, :2].T + matrix_inv[:2, 2]


def _similarity(kind: str, window: int) -> Any:
    if kind == "global":
        return lambda f, m, w: global_ncc(f, m, w)
    return lambda f, m, w: local_ncc(f, m, w, window)


def _gaussian(sigma: float, device: str) -> Any:
    """A function blurring a ``(1, 2, h, w)`` field by a separable Gaussian of ``sigma`` px (the identity at 0;
    replicated borders)."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return lambda v: v
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = torch.tensor(g / g.sum(), dtype=torch.float32, device=device)
    kx, ky = k.view(1, 1, 1, -1).repeat(2, 1, 1, 1), k.view(1, 1, -1, 1).repeat(2, 1, 1, 1)

    def blur(v: Any) -> Any:
        v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), kx, groups=2)
        return F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), ky, groups=2)

    return blur


def _setup(seed: int, requested: str) -> str:
    import torch

    torch.manual_seed(int(seed))
    return pick_device(requested)


def optimise_field(fixed: ImageView, moving: ImageView, *, size: int, levels: int, iterations: tuple[int, ...],
                   learning_rate: float, regularisation: float, window: int, use_mask: bool,
                   initial: np.ndarray | None = None, device: str = "cpu", seed: int = 0,
                   features: str = "intensity", smoothing: float = 0.0, optimiser: str = "adam") -> Result:
    """Optimise a displacement field (see the module docstring); ``features``: what the similarity compares
    (:func:`feature_channels`); ``smoothing`` > 0: the optimised variable is passed through a Gaussian of that
    sigma (level pixels) to give the displacement (a smooth parametrisation, as Demons smooths its field);
    ``optimiser``: ``adam`` (``iterations`` steps of ``learning_rate`` level pixels) or ``lbfgs`` (a budget of
    ``iterations`` evaluations per level, strong-Wolfe line search; ``learning_rate`` scales its first step).

    Returns
    -------
    Result
        ``field`` ``(h, w, 2)`` float32 in fixed working pixels on the finest level's grid (the
        :class:`bench.deformation.Deformation` convention), and diagnostics per level (shape, iterations,
        similarity before/after, loss, seconds). Raises :class:`bench.RegistrationFailed` when the
        optimisation diverges (a non-finite loss or field).
    """
    import torch
    import torch.nn.functional as F

    dev = _setup(seed, device)
    pyr = pyramid(fixed, moving, size, levels, window, use_mask, dev, features)
    its = _per_level(iterations, len(pyr))
    m_inv = torch.tensor(np.linalg.inv(np.eye(3) if initial is None else initial), dtype=torch.float32, device=dev)
    sim = _similarity("local", window)
    smooth = _gaussian(float(smoothing), dev)
    u = None  # (1, 2, h, w) working pixels
    records = []
    for lev, n in zip(pyr, its, strict=True):
        t0 = time.perf_counter()
        h, w = lev.fixed.shape[-2:]
        spacing = torch.tensor(lev.spacing, dtype=torch.float32, device=dev).view(1, 2, 1, 1)
        if u is None:
            v0 = torch.zeros((1, 2, h, w), dtype=torch.float32, device=dev)
        else:
            v0 = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False) / spacing
        v = v0.clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=float(learning_rate))
        base = _apply_inverse(m_inv, lev.coords)  # reused when u = 0

        def losses(vv: Any, lev=lev, spacing=spacing, h=h, w=w) -> tuple[Any, Any]:  # this level's values
            vv = smooth(vv)
            disp = (vv * spacing).permute(0, 2, 3, 1)
            warped = _sample(lev, _apply_inverse(m_inv, lev.coords + disp), moving.shape)
            s = sim(lev.fixed, warped, lev.weight)
            dx = vv[:, :, :, 1:] - vv[:, :, :, :-1]
            dy = vv[:, :, 1:, :] - vv[:, :, :-1, :]
            reg = (dx * dx).mean() + (dy * dy).mean() if w > 1 and h > 1 else vv.sum() * 0
            return s, reg

        with torch.no_grad():
            s_start = float(sim(lev.fixed, _sample(lev, base, moving.shape), lev.weight)) if u is None else None
            s_init, _ = losses(v0)
        loss_val = float("nan")
        if optimiser == "lbfgs":
            opt = torch.optim.LBFGS([v], lr=float(learning_rate), max_iter=max(1, int(n)), max_eval=max(1, int(n)),
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-12,
                                    history_size=20)

            def closure(v=v, losses=losses) -> Any:
                v.grad = None
                s, reg = losses(v)
                value = -s + float(regularisation) * reg
                value.backward()
                return value

            if n:
                opt.step(closure)
                with torch.no_grad():
                    s, reg = losses(v)
                    loss_val = float(-s + float(regularisation) * reg)
        for _ in range(int(n) if optimiser != "lbfgs" else 0):
            opt.zero_grad(set_to_none=True)
            s, reg = losses(v)
            loss = -s + float(regularisation) * reg
            loss.backward()
            opt.step()
            loss_val = float(loss.detach())
        with torch.no_grad():
            s_end, reg_end = losses(v)
        if not np.isfinite(loss_val if n else 0.0) or not bool(torch.isfinite(v).all()):
            raise RegistrationFailed(f"deformable field diverged at level {len(records) + 1} "
                                     f"({h}x{w} px): non-finite loss or displacement")
        with torch.no_grad():
            u = smooth(v.detach()) * spacing
        rec = {"shape": [int(h), int(w)], "iterations": int(n), "similarity_start": round(float(s_init), 6),
               "similarity_end": round(float(s_end), 6), "regulariser_end": round(float(reg_end), 6),
               "loss_end": round(loss_val, 6) if n else None, "seconds": round(time.perf_counter() - t0, 3)}
        if s_start is not None:
            rec["similarity_identity"] = round(s_start, 6)
        records.append(rec)
    assert u is not None
    out = u[0].permute(1, 2, 0).contiguous().cpu().numpy().astype(np.float32)
    return Result(field=out, diagnostics={"device": dev, "levels": records})


def finest_similarity(fixed: ImageView, moving: ImageView, *, size: int, window: int, use_mask: bool,
                      matrix_inv: np.ndarray | None = None, field: np.ndarray | None = None,
                      kind: str = "local", device: str = "cpu", features: str = "intensity") -> float:
    """The similarity at the finest level for a given fixed -> moving map (``matrix_inv``, then ``field`` on the
    finest grid, working px): what the methods compare to keep the better of start and result."""
    import torch

    dev = pick_device(device)
    lev = pyramid(fixed, moving, size, 1, window, use_mask, dev, features)[-1]
    pts = lev.coords
    if field is not None:
        pts = pts + torch.from_numpy(np.ascontiguousarray(field, np.float32))[None].to(dev)
    mi = torch.tensor(np.eye(3) if matrix_inv is None else matrix_inv, dtype=torch.float32, device=dev)
    with torch.no_grad():
        warped = _sample(lev, _apply_inverse(mi, pts), moving.shape)
        return float(_similarity(kind, window)(lev.fixed, warped, lev.weight))


def optimise_affine(fixed: ImageView, moving: ImageView, *, size: int, levels: int, iterations: tuple[int, ...],
                    learning_rate: float, window: int, similarity: str, use_mask: bool,
                    device: str = "cpu", seed: int = 0, optimiser: str = "adam") -> Result:
    """Optimise an affine ``x -> A (x - c) + c + t`` (fixed -> moving working pixels) by the same engine.

    ``optimiser``: ``adam`` (``iterations`` steps of ``learning_rate`` per level) or ``lbfgs`` (torch's L-BFGS
    with a strong-Wolfe line search and a budget of ``iterations`` similarity evaluations per level, which a
    line search may overrun by a few; six parameters and a smooth similarity suit a quasi-Newton method,
    which needs far fewer evaluations than Adam).

    Returns
    -------
    Result
        ``matrix``: the 3x3 estimate, moving working -> fixed working (the inverse of the optimised map);
        diagnostics per level. Raises :class:`bench.RegistrationFailed` on a non-finite loss or parameters.
    """
    import torch

    dev = _setup(seed, device)
    pyr = pyramid(fixed, moving, size, levels, window, use_mask, dev)
    its = _per_level(iterations, len(pyr))
    big_h, big_w = fixed.shape
    centre = torch.tensor([(big_w - 1) / 2.0, (big_h - 1) / 2.0], dtype=torch.float32, device=dev)
    half = max(big_h, big_w) / 2.0
    lin = torch.zeros((2, 2), dtype=torch.float32, device=dev, requires_grad=True)
    shift = torch.zeros(2, dtype=torch.float32, device=dev, requires_grad=True)
    sim = _similarity(similarity, window)
    eye = torch.eye(2, dtype=torch.float32, device=dev)

    def mapped(coords: Any, a: Any, t: Any) -> Any:
        return (coords - centre) @ (eye + a).T + centre + t * half

    if optimiser not in ("adam", "lbfgs"):
        raise ValueError(f"optimiser must be adam or lbfgs, got {optimiser!r}")
    records = []
    for lev, n in zip(pyr, its, strict=True):
        t0 = time.perf_counter()
        with torch.no_grad():
            s_init = float(sim(lev.fixed, _sample(lev, mapped(lev.coords, lin, shift), moving.shape), lev.weight))
        loss_val = float("nan")
        evaluations = 0

        def closure(lev=lev) -> Any:  # this level's loss, with its gradient
            nonlocal evaluations
            evaluations += 1
            lin.grad = shift.grad = None
            value = -sim(lev.fixed, _sample(lev, mapped(lev.coords, lin, shift), moving.shape), lev.weight)
            value.backward()
            return value

        if optimiser == "lbfgs":
            opt = torch.optim.LBFGS([lin, shift], lr=float(learning_rate), max_iter=max(1, int(n)),
                                    max_eval=max(1, int(n)), line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-9)
            if n:
                loss_val = float(opt.step(closure).detach())
        else:
            opt = torch.optim.Adam([lin, shift], lr=float(learning_rate))  # fresh moments per level
            for _ in range(int(n)):
                loss_val = float(closure().detach())
                opt.step()
        if (n and not np.isfinite(loss_val)) or not bool(torch.isfinite(lin).all() and torch.isfinite(shift).all()):
            raise RegistrationFailed(f"affine-io diverged at level {len(records) + 1}: non-finite loss or parameters")
        with torch.no_grad():
            s_end = float(sim(lev.fixed, _sample(lev, mapped(lev.coords, lin, shift), moving.shape), lev.weight))
        records.append({"shape": list(lev.fixed.shape[-2:]), "iterations": int(n), "evaluations": evaluations,
                        "similarity_start": round(s_init, 6),
                        "similarity_end": round(s_end, 6), "seconds": round(time.perf_counter() - t0, 3)})
    a = (eye + lin).detach().cpu().double().numpy()
    t = shift.detach().cpu().double().numpy() * half
    c = centre.cpu().double().numpy()
    fixed_to_moving = np.eye(3)
    fixed_to_moving[:2, :2] = a
    fixed_to_moving[:2, 2] = c + t - a @ c
    if not np.all(np.isfinite(fixed_to_moving)) or abs(np.linalg.det(a)) < 1e-6:
        raise RegistrationFailed("affine-io: degenerate affine (singular linear part)")
    sv = np.linalg.svd(a, compute_uv=False)
    if sv.max() > 5.0 or sv.min() < 0.2 or np.abs(t).max() > 2 * max(big_h, big_w):
        raise RegistrationFailed(f"affine-io diverged: scales {sv.min():.3g}..{sv.max():.3g}, "
                                 f"shift {np.abs(t).max():.3g} px")
    return Result(matrix=np.linalg.inv(fixed_to_moving), diagnostics={"device": dev, "levels": records,
                                                                      "fixed_to_moving": fixed_to_moving.tolist()})


def _per_level(iterations: tuple[int, ...] | int, n_levels: int) -> list[int]:
    """Iterations per level, coarsest first: a tuple is aligned on its last entries (the finest levels)."""
    its = [int(iterations)] if isinstance(iterations, int) else [int(v) for v in iterations]
    if len(its) >= n_levels:
        return its[len(its) - n_levels:]
    return [its[0]] * (n_levels - len(its)) + its
