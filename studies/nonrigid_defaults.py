"""Choose the nonrigid methods' defaults on generated pairs with a known nonrigid deformation.

Each case: a generated two-stain pair (``bench.datasets.synthetic.generate_pair``, no elastic part, no holes;
the tissues taken in turn from ``TISSUES``, two different stains drawn per pair; by default the source's fine
structure comes from another section, ``Variation(texture_swap_sigma=...)``, as in consecutive real cuts), the
source warped onto the target by its exact affine (the start a perfect affine method would give), then
deformed by a known smooth random field (``bench.deformation.random_smooth_field``). The method gets the
fixed (target) and moving (deformed source) views in that frame; its answer moves the source landmarks into
the target frame (``bench.deformation.warp_points``, ANHIR's direction) and the error is measured against the
target landmarks, in working pixels, before (the exact affine alone) and after.

Sets: one per ``--field AMPLITUDE:SIGMA`` (largest displacement and smoothing sigma, working px at the
1024 px working size; default 8:60, 16:100, 24:150), and one not deformed at all (a good start must not get
worse). Each set has its own seeds. Per setting and set: median error before / after over the pairs, the
worst pair after, pairs worse than their start (> +0.1 px), failures, median time per pair.

Public functions only. One CPU thread (``torch.set_num_threads(1)``, SimpleITK single-threaded by the methods).

    python studies/nonrigid_defaults.py --quick          # a few seconds, tiny inputs
    python studies/nonrigid_defaults.py                  # the table of docs/nonrigid.md
    python studies/nonrigid_defaults.py --method deformable --set size=256 --set regularisation=1
    python studies/nonrigid_defaults.py --method deformable --try size=512 --try "size=768;regularisation=10"

``--try`` (repeatable, ``;``-separated ``PARAM=VALUE``) runs several settings on the same cases in one
process, so their times are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from bench.datasets.synthetic import TISSUES, GeneratorConfig, Variation, generate_pair

from bench import Context, ImageView, registry
from bench.deformation import check, random_smooth_field, warp_image, warp_points
from bench.geometry import apply, random_affine


def _view(rgb: np.ndarray, mask: np.ndarray) -> ImageView:
    """Inverted grayscale (tissue bright, glass 0) and mask, as the shared preprocessing gives."""
    gray = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    bg = float(np.median(gray[~mask])) if (~mask).any() else 0.0
    image = np.clip(gray - bg, 0.0, 1.0) * mask
    return ImageView(image.astype(np.float32), mask.astype(bool))


def add_noise(view: ImageView, amount: float, seed: int, sigma: float = 1.5) -> ImageView:
    """The view with independent fine noise inside its tissue (Gaussian, smoothed at ``sigma`` px, standard
    deviation ``amount`` x the tissue's): what one stain shows and the other does not, so the two images
    correlate as weakly as real stain pairs do (``--noise``)."""
    if amount <= 0:
        return view
    rng = np.random.default_rng(seed)
    n = cv2.GaussianBlur(rng.standard_normal(view.image.shape).astype(np.float32), (0, 0), sigma)
    n *= amount * float(view.image[view.mask].std()) / max(float(n.std()), 1e-12)
    return ImageView(np.clip(view.image + n, 0.0, None).astype(np.float32) * view.mask, view.mask)


def make_case(seed: int, size: int, amplitude: float, scale: float, *, tissue: str | None = None,
              swap: float = 0.0, noise: float = 0.0, affine: tuple[float, float, float] | None = None):
    """``(fixed, moving, moving_points, fixed_points)``: views in the fixed frame, the moving view deformed by
    a known field; ``moving_points`` are where the fixed landmarks ``fixed_points`` are in the moving view.
    ``tissue``: one of ``TISSUES`` (drawn when None); ``swap``: the generator's ``texture_swap_sigma``;
    ``noise``: :func:`add_noise` to both views (independently); ``affine``: ``(rotation deg, scale, shift px)``
    bounds of a random affine that moves the aligned source instead of a field (an imperfect affine start, for
    ``affine-io``)."""
    cfg = GeneratorConfig(size=size, n_landmarks=40, max_rotation_deg=30, elastic_px=0.0,
                          hole_probability=0.0, dust_probability=0.0)
    pair = generate_pair(seed, tissue=tissue, config=cfg, variation=Variation(texture_swap_sigma=swap))
    h, w = pair.target_rgb.shape[:2]
    m = pair.true_matrix[:2]
    fill = tuple(int(v) for v in np.median(pair.source_rgb[~pair.source_mask], axis=0))
    src_rgb = cv2.warpAffine(pair.source_rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)
    src_mask = cv2.warpAffine(pair.source_mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    fixed = add_noise(_view(pair.target_rgb, pair.target_mask), noise, seed + 2000)
    aligned = add_noise(_view(src_rgb, src_mask), noise, seed + 3000)
    fixed_points = pair.target_landmarks
    assert np.allclose(apply(pair.true_matrix, pair.source_landmarks), fixed_points, atol=1e-6)
    if affine is not None:
        rot, sc, shift = affine
        p = random_affine(np.random.default_rng(seed + 4000), ((w - 1) / 2, (h - 1) / 2), max_rotation_deg=rot,
                          scale_range=(1 - sc, 1 + sc), max_shear=sc, max_translation=shift)
        moved = ImageView(cv2.warpAffine(aligned.image, p[:2], (w, h), flags=cv2.INTER_LINEAR),
                          cv2.warpAffine(aligned.mask.astype(np.uint8), p[:2], (w, h), flags=cv2.INTER_NEAREST) > 0)
        return fixed, moved, apply(p, fixed_points), fixed_points
    if amplitude <= 0:
        return fixed, aligned, fixed_points.copy(), fixed_points
    field = random_smooth_field((h, w), amplitude, scale, seed=seed + 1000)
    moving = ImageView(warp_image(aligned.image, None, field), warp_image(aligned.mask, None, field))
    moving_points = warp_points(None, field, fixed_points)  # p + v(p) = x: where each landmark went
    return fixed, moving, moving_points, fixed_points


def evaluate(name: str, params: dict, cases: list, threads: int = 1) -> dict:
    import torch

    torch.set_num_threads(threads)
    method = registry.get(name)(**params)
    method.prepare(Context())
    before, after, times, worse, failed = [], [], [], 0, 0
    for fixed, moving, mp, fp in cases:
        b = np.median(np.linalg.norm(mp - fp, axis=1))
        t0 = time.perf_counter()
        try:
            est = method.estimate(fixed, moving, Context(seed=0))
        except Exception as exc:  # noqa: BLE001 - a failed case counts as its start (any error of the method)
            failed += 1
            print(f"  {name}: failed: {exc}")
            before.append(b), after.append(b), times.append(time.perf_counter() - t0)
            continue
        times.append(time.perf_counter() - t0)
        if est.deformation is not None:
            problem = check(est.deformation)
            if problem:
                print(f"  {name}: {problem}")
        got = warp_points(est.matrix, est.deformation, mp)
        a = np.median(np.linalg.norm(got - fp, axis=1))
        before.append(b), after.append(a)
        worse += a > b + 0.1
    return {"before": float(np.median(before)), "after": float(np.median(after)), "worst": float(np.max(after)),
            "time": float(np.median(times)), "worse": worse, "failed": failed, "n": len(cases)}


def make_sets(pairs: int, size: int, fields: list[tuple[float, float]], swap: float,
              noise: float = 0.0, affines: list[tuple[float, float, float]] | None = None) -> dict[str, list]:
    """The generated sets: one per ``(amplitude, sigma)`` (at a ``size`` px working size; both scaled with
    ``size / 1024``), then the not deformed control; pair ``k`` of a set has the tissue ``TISSUES[k % 4]`` and
    a seed of its own set. With ``affines`` (``(rotation deg, scale, shift px at 1024 px)`` each), one set per
    random-affine start instead of the fields."""
    f = size / 1024.0
    sets = {}
    if affines:
        for j, (rot, sc, shift) in enumerate(affines):
            sets[f"affine {rot:g} deg, {sc:g}, {shift * f:g} px"] = [
                make_case(100 * j + k + 50, size, 0.0, 60.0, tissue=TISSUES[k % len(TISSUES)], swap=swap,
                          noise=noise, affine=(rot, sc, shift * f)) for k in range(pairs)]
        return sets
    for j, (amp, sig) in enumerate([*fields, (0.0, 60.0)]):
        label = f"{amp * f:g} px, sigma {sig * f:g}" if amp > 0 else "not deformed"
        sets[label] = [make_case(100 * j + k, size, amp * f, sig * f, tissue=TISSUES[k % len(TISSUES)], swap=swap,
                                 noise=noise)
                       for k in range(pairs)]
    return sets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny inputs, a few seconds")
    ap.add_argument("--method", action="append", help="method(s) to run (default: all nonrigid and affine-io)")
    ap.add_argument("--set", action="append", default=[], help="PARAM=VALUE for the method(s)")
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help="a setting to compare, 'P=V;P=V' on top of --set (repeatable; default: --set alone)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs per set")
    ap.add_argument("--size", type=int, default=1024, help="longer side of the generated target (working size)")
    ap.add_argument("--field", action="append", default=[],
                    help="AMPLITUDE:SIGMA of a deformed set, working px at 1024 px (default 8:60, 16:100, 24:150)")
    ap.add_argument("--swap", type=float, default=4.0,
                    help="texture_swap_sigma of the generator (0: same fine structure in both sections)")
    ap.add_argument("--affine", action="append", default=[],
                    help="ROTATION:SCALE:SHIFT bounds of a random-affine start set instead of the fields "
                         "(degrees, relative, working px at 1024 px), e.g. 2:0.03:12")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="independent fine noise in each image, x the tissue's standard deviation (0: none)")
    args = ap.parse_args(argv)
    fields = [tuple(float(v) for v in f.split(":")) for f in args.field] or [(8, 60), (16, 100), (24, 150)]
    if args.quick:
        args.pairs, args.size, fields = 1, 160, [(19.2, 96.0)]  # 3 px, sigma 15 px at 160 px
    names = args.method or ["deformable", "demons", "bspline"]
    params = dict(kv.split("=", 1) for kv in args.set)
    tries = [dict(kv.split("=", 1) for kv in t.split(";") if kv) for t in args.tries] or [{}]
    if args.quick:
        quick = {"deformable": {"size": 128, "levels": 2, "iterations": "20,20"},
                 "demons": {"size": 128, "levels": 2, "iterations": "10,10"},
                 "bspline": {"size": 128, "iterations": "10"},
                 "affine-io": {"size": 128, "levels": 2, "iterations": "20,20"}}
    else:
        quick = {}
    affines = [tuple(float(v) for v in a.split(":")) for a in args.affine]
    sets = make_sets(args.pairs, args.size, fields, args.swap, args.noise, affines)
    print(f"{args.pairs} generated pairs per set, target {args.size} px, texture swap sigma {args.swap:g}, "
          f"noise {args.noise:g}; one CPU thread\n")
    print("| method | params | cases | median error before [px] | median error after [px] | worst after [px] | "
          "worse | failed | median time [s] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for extra in tries:
            p = {**quick.get(name, {}), **params, **extra}
            ptxt = ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"
            for label, cases in sets.items():
                r = evaluate(name, p, cases)
                print(f"| {name} | {ptxt} | {label} | {r['before']:.2f} | {r['after']:.2f} | {r['worst']:.2f} | "
                      f"{r['worse']}/{r['n']} | {r['failed']} | {r['time']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
