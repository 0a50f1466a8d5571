"""Run the benchmark's pair tasks on a Dask cluster.

Why Dask (not Ray): it is pure Python and small to install, a local cluster starts in about a second
(tests start one), the same ``Client(address)`` call points it at a real scheduler started with
``dask scheduler`` / ``dask worker tcp://host:8786`` on many machines (or dask-jobqueue on a SLURM/PBS
cluster), and it ships our plain picklable task objects as they are.

Each task is one pair with all its methods (the work function, :func:`bench.work.run_pair`), exactly as
the local executors run it; results come back to the client, which alone writes the results store, so the
rows are the same as a local run's. Workers need this package installed and the data at the same paths (or
``--data-root`` pointing at a shared mount). Calls are not supervised here: the per-call ``--timeout``
cannot be enforced in Dask worker threads (a task runs unbounded), and a crashing method takes its Dask
worker with it (Dask then retries the task on another worker, up to its own limit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bench.plan import PairTask
from bench.supervise import limit_threads
from bench.work import PairResult


def dask_executor(scheduler: str | None) -> Callable[..., Iterator[PairResult]]:
    """An executor that sends tasks to ``scheduler`` (``tcp://host:8786``) or to a new local cluster."""

    def execute(tasks: list[PairTask], workers: int, work: Callable,
                meanwhile: Callable | None = None) -> Iterator[PairResult]:
        if meanwhile is not None:
            meanwhile()
        try:
            from distributed import Client, LocalCluster, as_completed
        except ImportError as exc:
            raise RuntimeError("the dask executor needs: pip install 'histreg-bench[distributed]'") from exc
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
        try:
            # one task per worker thread: each task's numeric libraries get one thread (no oversubscription)
            client.run(limit_threads, 1)
            futures = client.map(work, tasks, pure=False)
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    return execute
