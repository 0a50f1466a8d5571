"""Misbehaving methods for the fault tests (test_faults, test_distributed, test_hostile), loaded as a plugin by
file path (the ``faulty`` fixture of conftest.py), so worker processes, Dask workers and ``check``'s children import
the same file. Every name starts with ``fault-``; the fixture unregisters them afterwards."""

import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from bench import Estimate, Method, register


class _Light(Method):
    uses_preprocessing = False
    description = "A misbehaving method of the fault tests."


@register
class Hang(_Light):
    name = "fault-hang"  # every call, the first included

    def estimate(self, fixed, moving, context):
        time.sleep(3600)


@register
class NativeHang(_Light):
    name = "fault-native-hang"  # deaf to the in-process alarm, as a loop in native code is

    def estimate(self, fixed, moving, context):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)


@register
class Segfault(_Light):
    name = "fault-segv"

    def estimate(self, fixed, moving, context):
        os.kill(os.getpid(), signal.SIGSEGV)


@register
class Exits(_Light):
    name = "fault-exit"

    def estimate(self, fixed, moving, context):
        sys.exit(3)


@register
class HardExit(_Light):
    name = "fault-os-exit"

    def estimate(self, fixed, moving, context):
        os._exit(4)


@register
class BadDiagnostics(_Light):
    name = "fault-diagnostics"

    def estimate(self, fixed, moving, context):
        return Estimate(np.eye(3), {"object": object()})


@register
class Zero(_Light):
    name = "fault-zero"

    def estimate(self, fixed, moving, context):
        return Estimate(np.zeros((2, 3)))


@register
class NotFinite(_Light):
    name = "fault-nan"

    def estimate(self, fixed, moving, context):
        return Estimate(np.full((2, 3), np.nan))


@dataclass(frozen=True)
class SleepyParams:
    seconds: float = 1.0  # how long each call sleeps


@register
class Sleepy(_Light):
    name = "fault-sleepy"  # slow but well behaved: for interrupts, killed parents and killed Dask workers
    Params = SleepyParams

    def estimate(self, fixed, moving, context):
        time.sleep(self.params.seconds)
        return Estimate(np.eye(3))
