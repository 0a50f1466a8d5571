"""The classical methods' tuning set: generated pairs only, never ../shared/data (docs/classical.md).

Emulates the shared preprocessing's output (centres of mass aligned, a residual rotation left), and makes the
pairs harder than the embedded sample in the way real consecutive sections are: an elastic warp, and the fine
band (Gaussian sigma FINE px) of the moving image replaced by another generated section's, so only coarser
structure is shared, as between two real cuts. Also counts how many of 8 unrelated pairs (fixed of one pair,
moving of the next, another tissue) a method wrongly accepts.

usage: python benchmarks/tune_classical.py METHOD [param=value ...]
env:   N (pairs, 24), ROT (residual rotation, deg, 8), SIZE (px, 800), ELASTIC (px, 8), FINE (px, 3),
       V=1 (one line per pair), TUNE_CACHE (folder for the built pairs, default: the temp folder)
"""

import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from bench.datasets.synthetic import GeneratorConfig, dataset_plan, generate_pair

from bench import Context, ImageView, RegistrationFailed, geometry
from bench.registry import get

N = int(os.environ.get("N", 24))
ROT = float(os.environ.get("ROT", 8))
SIZE = int(os.environ.get("SIZE", 800))
ELASTIC = float(os.environ.get("ELASTIC", 8))
FINE = float(os.environ.get("FINE", 3))  # fine band (sigma px) replaced by another section's: 0 = off
CACHE = Path(os.environ.get("TUNE_CACHE", tempfile.gettempdir())) / f"histreg-tune_{N}_{ROT}_{SIZE}_{ELASTIC}_{FINE}.pkl"


def view(rgb, mask):
    g = 1 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    g[~mask] = 0
    return ImageView(g.astype(np.float32), mask.astype(bool), rgb)


def emulate(pair):
    """Moving in the fixed's shape, centres of mass aligned (what the shared stage does besides rotation)."""
    ft, fs = pair.target_mask, pair.source_mask
    h, w = ft.shape
    ct = np.argwhere(ft).mean(0)[::-1]
    cs = np.argwhere(fs).mean(0)[::-1]
    pre = geometry.translation(*(ct - cs))
    mov = cv2.warpAffine(pair.source_rgb, pre[:2], (w, h), borderValue=(240, 240, 240))
    mmask = cv2.warpAffine(fs.astype(np.uint8), pre[:2], (w, h), flags=cv2.INTER_NEAREST) > 0
    return view(pair.target_rgb, ft), view(mov, mmask), pre


def build():
    if CACHE.exists():
        return pickle.loads(CACHE.read_bytes())
    cfg = GeneratorConfig(size=SIZE, max_rotation_deg=ROT, elastic_px=ELASTIC)
    items = []
    plan = dataset_plan(N, 12345)
    for k, (tissue, s, t, seed) in enumerate(plan):
        p = generate_pair(seed, tissue=tissue, source_stain=s, target_stain=t, config=cfg)
        f, m, pre = emulate(p)
        if FINE > 0:  # consecutive sections: different cells; only coarser structure is shared
            tissue2, s2, t2, seed2 = plan[(k + 4) % len(plan)] if len(plan) > 4 else plan[k]
            other = generate_pair(seed2 + 7, tissue=tissue, source_stain=s, target_stain=t, config=cfg)
            og = 1 - cv2.cvtColor(other.target_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
            og = cv2.resize(og, m.image.shape[::-1])
            fine = og - cv2.GaussianBlur(og, (0, 0), FINE)
            g = cv2.GaussianBlur(m.image, (0, 0), FINE) + fine
            g = np.clip(np.where(m.mask, g, 0), 0, 1).astype(np.float32)
            m = ImageView(g, m.mask, m.rgb)
        items.append(dict(tissue=tissue, stains=f"{s}->{t}", fixed=f, moving=m, pre=pre,
                          src=p.source_landmarks, tgt=p.target_landmarks))
    CACHE.write_bytes(pickle.dumps(items))
    return items


def main():
    name = sys.argv[1]
    over = dict(kv.split("=", 1) for kv in sys.argv[2:])
    m = get(name)(**over)
    items = build()
    res, false_ok = [], 0
    verbose = os.environ.get("V")
    for i, it in enumerate(items):
        f, mv = it["fixed"], it["moving"]
        diag = np.hypot(*f.shape)
        t0 = time.perf_counter()
        try:
            e = m.estimate(f, mv, Context(seed=0))
            dt = time.perf_counter() - t0
            moved = geometry.apply(e.matrix @ it["pre"], it["src"])
            r = float(np.median(np.linalg.norm(moved - it["tgt"], axis=1)) / diag)
            info = {k: v for k, v in e.diagnostics.items() if k in ("inliers", "matches", "evidence_contrast", "iterations")}
        except RegistrationFailed as ex:
            dt = time.perf_counter() - t0
            r, info = np.nan, str(ex)[:110]
        res.append((r, dt))
        if verbose:
            print(f"{i:2d} {it['tissue']:12s} {it['stains']:8s} rtre={r:.4f} {dt:.2f}s {info}")
    # unrelated: fixed of pair i, moving of pair i+1 (another tissue)
    n_unrel = min(8, len(items))
    for i in range(n_unrel):
        a, b = items[i], items[(i + 1) % len(items)]
        try:
            e = m.estimate(a["fixed"], b["moving"], Context(seed=0))
            false_ok += 1
            if verbose:
                print("  UNRELATED accepted", {k: v for k, v in e.diagnostics.items() if k in ("inliers", "evidence_contrast")})
        except RegistrationFailed:
            pass
    r = np.array(res)
    rt = np.nan_to_num(r[:, 0], nan=np.inf)
    print(f"{name} {over}: success(0.035) {np.sum(rt <= 0.035)}/{len(rt)}, <=0.01 {np.sum(rt <= 0.01)}, "
          f"failed {np.sum(np.isnan(r[:, 0]))}, median rTRE {np.median(rt):.4f}, median time {np.median(r[:, 1]):.2f}s, "
          f"unrelated accepted {false_ok}/{n_unrel}")


if __name__ == "__main__":
    main()
