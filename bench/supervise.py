"""Supervised worker processes: every method call runs in a worker the parent can replace.

The benchmark runs other people's code. Whatever a method does (hang in native code, crash with a signal,
call ``sys.exit`` or ``os._exit``), the run records that (pair, method) as a ``timeout`` or ``failed``
row with a message and goes on. Design:

- N long-lived worker processes (spawned, so no state is shared with the parent) each take one pair at a
  time (:class:`bench.plan.PairTask`) and run the work function on it (:func:`bench.work.run_pair`); method
  instances and warm-up stay in the worker across pairs, exactly as in a plain loop.
- Before each method call the worker tells the parent (method, phase, time limit, the method's device and
  the pair's :class:`bench.record.Fallback`, from which the parent builds the row if the call never ends);
  after it, it sends the finished row. The parent writes rows as they come, so an interrupt loses only the
  calls in flight.
- The time limit is enforced twice: inside the worker (``SIGALRM``: the call raises, the worker lives on)
  and by the parent (the limit plus :data:`GRACE_S`: the worker is killed, for calls stuck in native code).
- A worker that dies (signal, exit) or overruns is replaced; its pair goes on in the new worker with the
  methods not yet done. A death outside a method call (reading or preparing the pair) fails the pair's
  remaining methods, so a bad input can never crash the run twice.
- Workers die with the parent (``PR_SET_PDEATHSIG`` on Linux, a watch thread elsewhere) and ignore
  SIGINT (the parent alone handles Ctrl-C, then kills them at once).

Serial runs use one supervised worker with the machine's threads; ``--workers N`` uses N, each capped to
``cores / N`` threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from bench.plan import PairTask
from bench.record import CRASHED, Fallback, Row, Status
from bench.work import PairResult

GRACE_S = 2.0  # the parent kills a call this long (plus 10 %) after its limit, when SIGALRM did not stop it
TAIL_PAIRS = 2  # with N workers, the last TAIL_PAIRS * N pairs are split into one task per method
Work = Callable[[PairTask, Callable[[str, dict[str, Any]], None]], Any]


def limit_threads(n: int) -> None:
    """Cap the threads of every numeric library in this process (one call per worker).

    torch and SimpleITK are not imported for it (torch alone costs a worker about a second to import, and a run
    of feature methods never needs it): their thread counts come from the environment set here, which they read
    when they are first imported (``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``), and are set
    directly when they are imported already.
    """
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    import cv2

    cv2.setNumThreads(n)
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends (even by ``kill -9``)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the parent ended before the call above
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_main(conn: Connection, parent_pid: int, threads: int | None, work: Work) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    if threads:
        limit_threads(threads)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        try:
            conn.send((kind, data))
        except Exception as exc:  # e.g. an object that cannot be pickled
            if kind == "call":
                conn.send((kind, {**data, "fallback": None}))
            elif kind == "row":
                row = data["row"].unsendable(
                    f"the result could not be sent to the harness: {type(exc).__name__}: {exc}")
                conn.send(("row", {"row": row, "warped": None}))
            else:
                raise

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:  # every result is sent and nothing is left to save: end without the slow teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            work(task, on_event)
        except BaseException as exc:  # noqa: BLE001 - reported, then this worker is replaced
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("done", None))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


@dataclass
class _Call:
    method: str
    phase: str
    limit: float | None
    device: str
    fallback: Fallback | None
    started: float


class _Worker:
    """One supervised process and what it is doing."""

    def __init__(self, ctx, work: Work, threads: int | None) -> None:
        self.ctx, self.work, self.threads = ctx, work, threads
        self.task: PairTask | None = None
        self.done: set[str] = set()
        self.call: _Call | None = None
        self._start()

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(child, os.getpid(), self.threads, self.work),
                                     daemon=True, name="bench-worker")
        main = threading.current_thread() is threading.main_thread()  # signals can be set there only (a Dask
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # task runs in a thread)
        try:  # SIG_IGN is inherited through exec: workers ignore Ctrl-C
            self.proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        child.close()
        self.conn = parent

    @property
    def deadline(self) -> float | None:
        if self.call is None or not self.call.limit:
            return None
        return self.call.started + self.call.limit * 1.1 + GRACE_S

    def assign(self, task: PairTask) -> None:
        for attempt in range(2):
            if not self.proc.is_alive():  # died while idle (e.g. killed from outside): a fresh one
                self.restart()
            try:
                self.conn.send(task)
                break
            except OSError:
                if attempt:
                    raise
                self.restart()
        self.task, self.done, self.call = task, set(), None

    def stop(self, kill: bool) -> None:
        """End the process: at once (``kill``), or asked to finish (call :meth:`ask_to_stop` first)."""
        if kill and self.proc.is_alive():
            self.proc.kill()
        self.proc.join(0 if kill else 2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.conn.close()

    def ask_to_stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)

    def restart(self) -> None:
        self.stop(kill=True)
        self.task, self.call = None, None
        self._start()


class Supervisor:
    """Run tasks on supervised workers; iterate for results (one :class:`PairResult` per row)."""

    def __init__(self, tasks: list[PairTask], workers: int, work: Work, threads: int | None = None,
                 meanwhile: Callable[[], Any] | None = None) -> None:
        tasks = list(tasks)
        if workers > 1:  # the last pairs one method per task, so the workers finish together
            tail = len(tasks) - TAIL_PAIRS * workers
            tasks = tasks[:max(0, tail)] + [replace(t, methods=(m,), split=len(t.methods) > 1)
                                              for t in tasks[max(0, tail):] for m in t.methods]
        self.queue = deque(tasks)
        self.outstanding: dict[str, int] = {}
        for t in tasks:
            self.outstanding[t.pair.pair_id] = self.outstanding.get(t.pair.pair_id, 0) + len(t.methods)
        self.cost: dict[str, list[float]] = {}  # method -> [seconds, calls] seen so far
        self.ctx, self.work, self.threads, self.meanwhile = mp.get_context("spawn"), work, threads, meanwhile
        self.n_workers = max(1, min(workers, len(tasks))) if tasks else 0
        self.workers: list[_Worker] = []
        self.exit_codes: list[int | None] = []  # of the workers at the end (replaced ones not included)

    def _start_workers(self) -> None:
        """Start the workers, each with its first task. ``meanwhile`` (the runner's reference workload, timed
        on one thread) runs here while only the workers that leave it a core of its own have started: with
        N single-threaded workers on N cores, N - 1 start first and the last when it is done; a serial run's
        worker, which may use every core, starts after it."""
        first = self.n_workers
        if self.meanwhile is not None:
            cores = os.cpu_count() or 1
            first = min(self.n_workers, max(0, (cores - 1) // (self.threads or cores)))
        for n in (first, self.n_workers - first):
            for _ in range(n):
                w = _Worker(self.ctx, self.work, self.threads)
                self.workers.append(w)
                if self.queue:
                    w.assign(self._next())
            if self.meanwhile is not None:
                meanwhile, self.meanwhile = self.meanwhile, None
                meanwhile()

    def _next(self) -> PairTask:
        """The queued task expected to take longest (methods not seen yet first; ties: the first queued), so
        long calls start early and short ones fill the end."""
        if len(self.queue) == 1 or not self.cost:
            return self.queue.popleft()

        def expected(task: PairTask) -> float:
            total = 0.0
            for m in task.methods:
                seconds, calls = self.cost.get(m.name, (0.0, 0))
                total += seconds / calls if calls else float("inf")
            return total

        best = max(range(len(self.queue)), key=lambda i: (expected(self.queue[i]), -i))
        task = self.queue[best]
        del self.queue[best]
        return task

    def _result(self, row: Row, warped: Any) -> PairResult:
        pid = row.pair_id
        if isinstance(row.time_s, float):
            entry = self.cost.setdefault(row.method, [0.0, 0])
            entry[0] += row.time_s
            entry[1] += 1
        self.outstanding[pid] -= 1
        return PairResult([row], {row.method: warped} if warped is not None else {},
                          finished=self.outstanding[pid] <= 0)

    def _receive(self, w: _Worker) -> Iterator[PairResult]:
        """Every message waiting from ``w``; stops at a closed pipe."""
        while w.task is not None:
            try:
                if not w.conn.poll():
                    return
                kind, data = w.conn.recv()
            except (EOFError, OSError):
                return
            if kind == "call":
                fallback = data["fallback"] or (w.call.fallback if w.call and w.call.method == data["method"] else None)
                w.call = _Call(data["method"], data["phase"], data["limit"], data["device"], fallback,
                               time.monotonic())
            elif kind == "row":
                w.call = None
                w.done.add(data["row"].method)
                yield self._result(data["row"], data["warped"])
            elif kind == "done":
                w.task, w.call = None, None
            elif kind == "error":
                yield from self._lost(w, f"{CRASHED} the worker failed: {data}")
                return

    def _lost(self, w: _Worker, message: str, status: str = Status.FAILED.value) -> Iterator[PairResult]:
        """``w``'s call ended abnormally: record it, replace the worker, continue the pair elsewhere."""
        task, call = w.task, w.call
        w.restart()
        if task is None:
            return
        rest = [s for s in task.methods if s.name not in w.done]
        if call is None:  # outside a method call: the pair itself kills workers, fail what is left of it
            for spec in rest:
                row = Row.failed(task.pair, spec, f"{message} while reading or preparing the pair", task.device)
                yield self._result(row, None)
            return
        spec = next(s for s in rest if s.name == call.method)
        if call.phase == "scoring":  # the call had returned: the harness's scoring of its answer was lost
            message = f"{message} (while the harness scored the answer)"
        if call.phase == "warm-up":  # keep the CRASHED prefix first: it decides what a rerun retries
            message = message.replace("the method call", "the first (warm-up) call") if message.startswith(
                CRASHED) else f"first (warm-up) {message}"
        row = Row.lost(task.pair, spec, call.device, call.fallback, status, message, time.monotonic() - call.started)
        yield self._result(row, call.fallback.scores.warped if call.fallback is not None else None)
        rest = [s for s in rest if s.name != call.method]
        if rest:
            self.queue.appendleft(replace(task, methods=tuple(rest)))

    def __iter__(self) -> Iterator[PairResult]:
        try:
            self._start_workers()
            while self.queue or any(w.task is not None for w in self.workers):
                for w in self.workers:
                    if w.task is None and self.queue:
                        w.assign(self._next())
                busy = [w for w in self.workers if w.task is not None]
                deadlines = [d for d in (w.deadline for w in busy) if d is not None]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout)
                for w in busy:
                    yield from self._receive(w)
                    if w.task is None:
                        continue
                    if not w.proc.is_alive():
                        yield from self._receive(w)  # whatever it sent before it died
                        if w.task is not None:
                            what = " during the method call" if w.call else ""
                            yield from self._lost(w, f"{CRASHED} the worker process "
                                                     f"{describe_exit(w.proc.exitcode)}{what}")
                    elif w.deadline is not None and time.monotonic() > w.deadline:
                        call = w.call
                        yield from self._lost(
                            w, f"call exceeded the time limit of {call.limit:g} s and did not return "
                               "(its worker process was stopped)", Status.TIMEOUT.value)
        finally:
            self.close(kill=sys.exc_info()[0] is not None)

    def close(self, kill: bool = True) -> None:
        if not kill:
            for w in self.workers:
                w.ask_to_stop()
        for w in self.workers:
            w.stop(kill=kill)
        self.exit_codes = [w.proc.exitcode for w in self.workers]
        self.workers = []


def supervised(tasks: list[PairTask], workers: int, work: Work, threads: int | None = None,
               meanwhile: Callable[[], Any] | None = None) -> Iterator[PairResult]:
    """Results of ``tasks`` run by ``work`` in ``workers`` supervised processes, one row at a time
    (``meanwhile``: see :meth:`Supervisor._start_workers`)."""
    yield from Supervisor(tasks, workers, work, threads, meanwhile)


class Resident(Supervisor):
    """One supervised worker kept across task lists (see :func:`resident`): a list that ends normally leaves
    it running with its method instances and warm-up, as a local run's worker keeps them across pairs; an
    error or an abandoned iteration ends it, and the next list starts a fresh one."""

    def __init__(self, work: Work, threads: int | None = None) -> None:
        super().__init__([], 1, work, threads)
        self.n_workers = 1

    def _start_workers(self) -> None:
        if not self.workers:
            self.workers.append(_Worker(self.ctx, self.work, self.threads))

    def close(self, kill: bool = True) -> None:
        if kill:
            super().close(kill=True)

    def results(self, tasks: list[PairTask]) -> Iterator[PairResult]:
        self.queue = deque(tasks)
        self.outstanding = {}
        for t in tasks:
            self.outstanding[t.pair.pair_id] = self.outstanding.get(t.pair.pair_id, 0) + len(t.methods)
        yield from self


_RESIDENTS = threading.local()  # per thread: (work, threads) -> Resident


def resident(tasks: list[PairTask], work: Work, threads: int | None = None) -> list[PairResult]:
    """Results of ``tasks``, run one call at a time in a supervised worker process that this thread keeps
    between calls: the Dask path runs each task this way (:mod:`bench.distributed`), so a method that
    crashes or hangs becomes its row exactly as in a local run, and the Dask worker never dies of it.

    One resident per thread (Linux ends a child whose parent *thread* ends: ``die_with_parent``), so a Dask
    worker with N threads keeps N. A Dask worker under a nanny is a daemon process, which Python forbids to
    start children: the flag is lifted here (it only guards ``Process.start``; the nanny still ends the
    worker, and the resident with it).
    """
    with contextlib.suppress(AttributeError):
        config = mp.current_process()._config
        if config.get("daemon"):
            config["daemon"] = False
    mine = _RESIDENTS.__dict__.setdefault("by_work", {})
    worker = mine.get((work, threads))
    if worker is None:
        worker = mine[(work, threads)] = Resident(work, threads)
    return list(worker.results(tasks))  # an error ends the worker's process (close(kill=True)) and propagates
