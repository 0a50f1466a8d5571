"""How the harness times a method call: wall and CPU time, CUDA synchronised, optional time limit."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class CallTimeout(Exception):
    """The call ran past its time limit."""


@dataclass
class Timed:
    value: Any
    wall_s: float
    cpu_s: float


def _cuda_sync(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CallTimeout` in the block after ``seconds`` (main thread of a process only).

    Native code (OpenCV, SimpleITK) is interrupted when it next returns to Python. Off the main thread
    (e.g. in a Dask worker) the limit cannot be enforced and the block runs unbounded.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise CallTimeout(f"call exceeded the time limit of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed(fn: Callable[[], Any], device: str = "cpu", limit_s: float | None = None) -> Timed:
    """Call ``fn()`` and measure it; CUDA work is synchronised before both clock readings."""
    _cuda_sync(device)
    with time_limit(limit_s):
        w0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        _cuda_sync(device)
        w1, c1 = time.perf_counter(), time.process_time()
    return Timed(value, w1 - w0, c1 - c0)
