"""One call at a time in a supervised child process, with a time limit: for code the harness does not trust.

:class:`Isolated` keeps one spawned child process and runs picklable calls in it, one at a time. Whatever a
call does (raise, call ``sys.exit``, crash the process with a signal or ``os._exit``, hang in Python or in
native code), :meth:`Isolated.call` returns an :class:`Outcome` saying so, and the next call gets a fresh child
when the old one died or overran. The child dies with its parent and ignores Ctrl-C (the parent handles it),
as the run's workers do (:mod:`bench.supervise`, whose helpers it uses). ``bench check`` runs each contract
check this way, so a method that exits, crashes or hangs fails its check instead of ending or hanging
``check``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from bench.supervise import describe_exit, die_with_parent

OK, RAISED, CRASHED, TIMEOUT = "ok", "raised", "crashed", "timeout"


@dataclass(frozen=True)
class Outcome:
    """What one isolated call gave: ``kind`` is ``ok`` (``value`` holds the result), ``raised``, ``crashed``
    or ``timeout`` (``error`` says what happened, on one line)."""

    kind: str
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == OK


def _child(conn: Connection, parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        try:
            conn.send((OK, fn(*args)))
        except SystemExit as exc:  # the call tried to end the process: its outcome, not the child's end
            conn.send((CRASHED, f"called sys.exit({exc.code!r})"))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" ({frames[-1].filename.rsplit('/', 1)[-1]} line {frames[-1].lineno})" if frames else ""
            conn.send((RAISED, f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}"))


class Isolated:
    """A supervised child process for calls one at a time (see the module docstring).

    Parameters
    ----------
    initializer, initargs : run once in each new child before its first call (e.g. load plugins)
    """

    def __init__(self, initializer: Callable | None = None, initargs: tuple = ()) -> None:
        self.initializer, self.initargs = initializer, initargs
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        import os

        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, os.getpid(), self.initializer, self.initargs),
                                       daemon=True, name="bench-isolated")
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited at start: the child ignores Ctrl-C
        try:
            self._proc.start()
        finally:
            signal.signal(signal.SIGINT, old)
        child.close()
        self._conn = parent

    def call(self, fn: Callable, *args: Any, timeout: float | None = None) -> Outcome:
        """``fn(*args)`` in the child (``fn`` and ``args`` picklable), at most ``timeout`` seconds."""
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            self._start()
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send((fn, args))
        except OSError:  # died between the check and the send
            return self._crashed()
        ready = wait([self._conn, self._proc.sentinel], timeout)
        if self._conn in ready:
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                return self._crashed()
            if kind == CRASHED:  # sys.exit: the child lives on, the call failed
                return Outcome(CRASHED, error=value)
            return Outcome(OK, value) if kind == OK else Outcome(RAISED, error=value)
        if ready:  # the process ended without an answer
            return self._crashed()
        self._stop()
        return Outcome(TIMEOUT, error=f"did not finish within {timeout:g} s (its process was stopped)")

    def _crashed(self) -> Outcome:
        assert self._proc is not None
        self._proc.join(5)
        code = self._proc.exitcode
        self._stop()
        return Outcome(CRASHED, error=f"its process {describe_exit(code)}")

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        """Ask the child to end (killed when it does not within a few seconds)."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(3)
        self._stop()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CRASHED", "OK", "RAISED", "TIMEOUT", "Isolated", "Outcome"]
