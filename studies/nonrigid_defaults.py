"""Choose the nonrigid methods' defaults on generated pairs with a known nonrigid deformation.

Each case: a generated two-stain pair (``bench.datasets.synthetic.generate_pair``, no elastic part, no holes),
the source warped onto the target by its exact affine (the start a perfect affine method would give), then
deformed by a known smooth random field (``bench.deformation.random_smooth_field``). The method gets the
fixed (target) and moving (deformed source) views in that frame; its answer moves the source landmarks into
the target frame (``bench.deformation.warp_points``, ANHIR's direction) and the error is measured against the
target landmarks, in working pixels, before (the exact affine alone) and after. A second set of cases has no
deformation at all (``amplitude 0``): a good start must not get worse.

Public functions only. One CPU thread (``torch.set_num_threads(1)``, SimpleITK single-threaded by the methods).

    python studies/nonrigid_defaults.py --quick          # a few seconds, tiny inputs
    python studies/nonrigid_defaults.py                  # the table of docs/nonrigid.md
    python studies/nonrigid_defaults.py --method deformable --set size=256 --set regularisation=1
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from bench.datasets.synthetic import GeneratorConfig, generate_pair

from bench import Context, ImageView, registry
from bench.deformation import check, random_smooth_field, warp_image, warp_points
from bench.geometry import apply


def _view(rgb: np.ndarray, mask: np.ndarray) -> ImageView:
    """Inverted grayscale (tissue bright, glass 0) and mask, as the shared preprocessing gives."""
    gray = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    bg = float(np.median(gray[~mask])) if (~mask).any() else 0.0
    image = np.clip(gray - bg, 0.0, 1.0) * mask
    return ImageView(image.astype(np.float32), mask.astype(bool))


def make_case(seed: int, size: int, amplitude: float, scale: float):
    """``(fixed, moving, moving_points, fixed_points)``: views in the fixed frame, the moving view deformed by
    a known field; ``moving_points`` are where the fixed landmarks ``fixed_points`` are in the moving view."""
    cfg = GeneratorConfig(size=size, n_landmarks=40, max_rotation_deg=30, elastic_px=0.0,
                          hole_probability=0.0, dust_probability=0.0)
    pair = generate_pair(seed, config=cfg)
    h, w = pair.target_rgb.shape[:2]
    m = pair.true_matrix[:2]
    fill = tuple(int(v) for v in np.median(pair.source_rgb[~pair.source_mask], axis=0))
    src_rgb = cv2.warpAffine(pair.source_rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)
    src_mask = cv2.warpAffine(pair.source_mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    fixed = _view(pair.target_rgb, pair.target_mask)
    aligned = _view(src_rgb, src_mask)
    fixed_points = pair.target_landmarks
    assert np.allclose(apply(pair.true_matrix, pair.source_landmarks), fixed_points, atol=1e-6)
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
    return {"before": float(np.median(before)), "after": float(np.median(after)), "time": float(np.median(times)),
            "worse": worse, "failed": failed, "n": len(cases)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny inputs, a few seconds")
    ap.add_argument("--method", action="append", help="method(s) to run (default: all nonrigid and affine-io)")
    ap.add_argument("--set", action="append", default=[], help="PARAM=VALUE for the method(s)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="longer side of the generated target (working size)")
    ap.add_argument("--amplitude", type=float, default=8.0, help="largest displacement, working px")
    ap.add_argument("--scale", type=float, default=60.0, help="field smoothing sigma, working px")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.size, args.amplitude, args.scale = 1, 160, 3.0, 15.0
    names = args.method or ["deformable", "demons", "bspline"]
    params = dict(kv.split("=", 1) for kv in args.set)
    if args.quick:
        quick = {"deformable": {"size": 128, "levels": 2, "iterations": "20,20"},
                 "demons": {"size": 128, "levels": 2, "iterations": "10,10"},
                 "bspline": {"size": 128, "iterations": "10"},
                 "affine-io": {"size": 128, "levels": 2, "iterations": "20,20"}}
    else:
        quick = {}
    sets = {f"deformed {args.amplitude:g} px": [make_case(s, args.size, args.amplitude, args.scale)
                                                 for s in range(args.pairs)],
            "not deformed": [make_case(s, args.size, 0.0, args.scale) for s in range(args.pairs)]}
    print(f"{args.pairs} generated pairs per set, target {args.size} px, field amplitude {args.amplitude:g} px, "
          f"sigma {args.scale:g} px; one CPU thread\n")
    print("| method | params | cases | median error before [px] | median error after [px] | worse | failed | "
          "median time [s] |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        p = {**quick.get(name, {}), **params}
        for label, cases in sets.items():
            r = evaluate(name, p, cases)
            ptxt = ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"
            print(f"| {name} | {ptxt} | {label} | {r['before']:.2f} | {r['after']:.2f} | {r['worse']}/{r['n']} | "
                  f"{r['failed']} | {r['time']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
