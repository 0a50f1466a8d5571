"""Executors: where pair tasks run. Each takes the tasks, the worker count, the work function
(:func:`bench.work.run_pair`) and ``meanwhile``, a function to call in this process before the results
(the runner's reference workload: the supervised executors run it while the workers it leaves a core to
start), and yields :class:`bench.work.PairResult` values as they finish; the runner alone writes them, so
rows land the same way from any executor.

- ``serial``: one supervised worker process with the machine's threads (:mod:`bench.supervise`);
- ``processes``: N supervised worker processes, each capped to ``cores / N`` threads;
- ``dask``: a Dask cluster (:mod:`bench.distributed`; each task supervised in a child of its Dask worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from bench.plan import PairTask, RunError
from bench.work import PairResult

Executor = Callable[[list[PairTask], int, Callable, Callable | None], Iterator[PairResult]]


def serial(tasks: list[PairTask], workers: int, work: Callable,
           meanwhile: Callable | None = None) -> Iterator[PairResult]:
    from bench.supervise import supervised

    yield from supervised(tasks, 1, work, threads=None, meanwhile=meanwhile)


def processes(tasks: list[PairTask], workers: int, work: Callable,
              meanwhile: Callable | None = None) -> Iterator[PairResult]:
    from bench.supervise import supervised

    yield from supervised(tasks, workers, work, threads=max(1, (os.cpu_count() or 1) // workers),
                          meanwhile=meanwhile)


def get(kind: str, scheduler: str | None = None) -> Executor:
    """The executor called ``kind`` (serial, processes or dask)."""
    if kind == "dask":
        from bench.distributed import dask_executor

        return dask_executor(scheduler)
    table = {"serial": serial, "processes": processes}
    if kind not in table:
        raise RunError(f"--executor {kind!r}: expected serial, processes or dask")
    return table[kind]
