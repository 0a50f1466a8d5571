"""Run the benchmark's pair tasks on a Dask cluster.

Why Dask (not Ray): it is pure Python and small to install, a local cluster starts in about a second
(tests start one), the same ``Client(address)`` call points it at a real scheduler started with
``dask scheduler`` / ``dask worker tcp://host:8786`` on many machines (or dask-jobqueue on a SLURM/PBS
cluster), and it ships our plain picklable task objects as they are.

Each task is one pair with all its methods, and the results come back to the client, which alone writes the
results store, so the rows are the same as a local run's. Workers need this package installed and the data
at the same paths (or ``--data-root`` pointing at a shared mount).

Calls are supervised as in a local run: a Dask task runs its pair in a supervised child process of the Dask
worker (:func:`bench.supervise.resident`, kept across tasks so method instances and warm-up persist, replaced
when it dies), so a method that crashes becomes a ``failed`` row (``crashed: ...``), one that hangs a
``timeout`` row (``--timeout`` holds here too), and the Dask worker itself never dies of a method.

The client takes each task's result on its own as it finishes. A task that errors anyway (its Dask worker
was killed from outside more often than ``distributed.scheduler.allowed-failures`` allows, so Dask raised
``KilledWorker``; or the task itself raised) gives ``failed`` rows for all of that pair's methods of the
task, with ``error`` starting ``crashed:``: the other pairs' rows are kept, and a rerun of the same command
runs those rows again (as it retries a local run's crashes). A Dask worker killed once is handled by Dask
itself: the task runs again on another worker, so only the work of its task in flight is repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bench.plan import PairTask
from bench.record import CRASHED, Row
from bench.work import PairResult

LOST_MESSAGE_CHARS = 300  # of the Dask error quoted in a lost task's rows


def supervised_task(task: PairTask, work: Callable) -> PairResult:
    """A Dask task: ``task`` run by ``work`` in this Dask worker's supervised child process, as one result."""
    from bench.supervise import resident

    results = resident([task], work, threads=1)  # one task per Dask worker thread: one thread for its libraries
    rows = [row for res in results for row in res.rows]
    warped = {method: pts for res in results for method, pts in res.warped.items()}
    return PairResult(rows, warped, finished=True)


def lost_task(task: PairTask, exc: BaseException) -> PairResult:
    """The rows of a task whose result never came back: ``failed``, retried by a rerun (``crashed:``)."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    detail = detail[:detail.find(". ") + 1] or detail  # the first sentence (KilledWorker's text goes on)
    if len(detail) > LOST_MESSAGE_CHARS:
        detail = detail[:LOST_MESSAGE_CHARS - 3] + "..."
    message = f"{CRASHED} the Dask task of this pair was lost ({detail})"
    return PairResult([Row.failed(task.pair, spec, message, task.device) for spec in task.methods], {}, finished=True)


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
            futures = client.map(supervised_task, tasks, work=work, pure=False)
            task_of = {fut.key: task for fut, task in zip(futures, tasks, strict=True)}
            done = as_completed(futures)
            del futures  # each future is released once its result is taken
            for fut in done:  # each on its own: one lost task never loses the others' rows
                task = task_of.pop(fut.key)
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: that pair's rows, the run goes on
                    res = lost_task(task, exc)
                fut.release()
                yield res
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    return execute
