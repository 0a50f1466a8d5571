"""A small fixed reference workload, timed on the machine, so times from two machines compare.

ANHIR's BIRL normalised execution times by a short fixed registration run on the same machine. This
one is deterministic and single-threaded: smoothing, resampling, a rotation sweep and a feature pass on a
fixed generated 512x512 image. ``time_s / reference_time_s`` is the machine-normalised time.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

REFERENCE_VERSION = "1"


def _workload(img: np.ndarray) -> float:
    acc = 0.0
    small = cv2.GaussianBlur(img, (0, 0), 2.0)
    for angle in range(0, 360, 5):
        m = cv2.getRotationMatrix2D((256, 256), angle, 1.0)
        rot = cv2.warpAffine(small, m, (512, 512))
        acc += float(np.corrcoef(rot.ravel(), small.ravel())[0, 1])
    kps = cv2.ORB_create(500).detect(img, None)
    return acc + len(kps)


def reference_time(repeats: int = 5) -> float:
    """Median seconds of the fixed workload on this machine (single thread)."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((512, 512)) * 255).astype(np.uint8), (0, 0), 1.5)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        _workload(img)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _workload(img)
            times.append(time.perf_counter() - t0)
    finally:
        cv2.setNumThreads(threads)
    return float(np.median(times))
