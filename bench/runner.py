"""The runner: every chosen method over every pair, one result row per (pair, method).

One pair's journey (all in :func:`run_pair`, which also runs inside worker processes):

1. read the landmark files (a bad file fails that pair's rows with a one-line message);
2. run the shared preprocessing once for the methods that use it (and the light stage once for those
   that do not), through the on-disk cache;
3. for each method: ``estimate`` timed by the harness (warm-up call excluded), composed into one matrix in
   original pixel coordinates, source landmarks warped by it, scored against the target landmarks.

The parent process is the only writer of the results store, so rows from any executor land the same way.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import geometry, metrics, quality, registry
from bench.datasets.anhir import LandmarkError, Pair, file_digest, load_table, read_landmarks
from bench.method import Context, Method, RegistrationFailed, make_params
from bench.preprocess import ImageLoadError, PreparedPair, PreprocessParams
from bench.schema import SCHEMA_VERSION, TIME_MEASURED
from bench.store import ResultStore
from bench.timing import CallTimeout, timed


class RunError(Exception):
    """The run cannot start (bad configuration); raised before any work is done."""


@dataclass(frozen=True)
class MethodSpec:
    """A method by name with its parameter overrides (picklable, rebuilt in each worker)."""

    name: str
    overrides: tuple[tuple[str, str], ...] = ()

    def build(self) -> Method:
        return registry.get(self.name)(**dict(self.overrides))


@dataclass(frozen=True)
class PairTask:
    """Everything a worker needs to process one pair."""

    pair: Pair
    methods: tuple[MethodSpec, ...]
    preprocess: PreprocessParams
    device: str = "cpu"
    seed: int = 0
    timeout_s: float | None = None
    success_threshold: float = metrics.SUCCESS_THRESHOLD
    cache_dir: str | None = None
    cache_enabled: bool = True
    plugins: tuple[str, ...] = ()


@dataclass
class PairResult:
    rows: list[dict[str, Any]]
    warped: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (N, 2) warped source landmarks


# ----------------------------------------------------------------------------------------------------
# per process state: method instances are built, prepared and warmed up once per process
_INSTANCES: dict[tuple[MethodSpec, str], Method] = {}
_WARM: set[tuple[MethodSpec, str]] = set()


def _instance(spec: MethodSpec, ctx: Context) -> Method:
    key = (spec, ctx.device)
    if key not in _INSTANCES:
        m = spec.build()
        m.prepare(ctx)
        _INSTANCES[key] = m
    return _INSTANCES[key]


def _prepare(task: PairTask, full: bool) -> tuple[PreparedPair, float, bool]:
    """Run (or fetch from cache) one preprocessing stage; returns (prepared, compute seconds, cached)."""
    from bench import cache as cache_mod

    cache = cache_mod.PreprocessCache(task.cache_dir, enabled=task.cache_enabled)
    t0 = time.perf_counter()
    prepared, cached = cache.get_or_prepare(task.pair.source_image, task.pair.target_image, task.preprocess, full)
    spent = time.perf_counter() - t0
    compute = float(prepared.diagnostics.get("time_s", spent)) if cached else spent
    return prepared, compute, cached


def _base_row(pair: Pair, method: type[Method] | Method, spec: MethodSpec) -> dict[str, Any]:
    params = getattr(method, "params", None)
    return {
        "pair_id": pair.pair_id,
        "tissue": pair.tissue,
        "method": spec.name,
        "method_version": method.version,
        "params": dataclasses.asdict(params) if params is not None else dict(spec.overrides),
        "source_image": str(pair.source_image),
        "target_image": str(pair.target_image),
        "source_landmarks": str(pair.source_landmarks or ""),
        "target_landmarks": str(pair.target_landmarks or ""),
        "diagonal": pair.diagonal,
        "success": False,
        "time_source": TIME_MEASURED,
    }


def _failed_rows(task: PairTask, specs: Iterable[MethodSpec], message: str) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        cls = registry.get(spec.name)
        row = _base_row(task.pair, cls, spec)
        row.update(status="failed", error=message, device=task.device)
        rows.append(row)
    return rows


def _diagonal(pair: Pair, prepared: PreparedPair) -> float:
    if pair.diagonal:
        return float(pair.diagonal)
    return metrics.image_diagonal(*prepared.target_shape)


def run_pair(task: PairTask) -> PairResult:
    """Process one pair with every method of the task. Never raises for a bad pair or a failing method."""
    if task.plugins:
        registry.discover(task.plugins)
    pair = task.pair
    if pair.problem:
        return PairResult(_failed_rows(task, task.methods, pair.problem))
    try:
        src_lnd = read_landmarks(pair.source_landmarks) if pair.source_landmarks else None
        tgt_lnd = read_landmarks(pair.target_landmarks) if pair.target_landmarks else None
    except LandmarkError as exc:
        return PairResult(_failed_rows(task, task.methods, str(exc)))

    stages: dict[bool, tuple[PreparedPair, float, bool] | str] = {}
    result = PairResult(rows=[])
    for spec in task.methods:
        cls = registry.get(spec.name)
        full = cls.uses_preprocessing
        if full not in stages:
            try:
                stages[full] = _prepare(task, full)
            except (ImageLoadError, OSError, ValueError) as exc:
                stages[full] = str(exc) if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
        stage = stages[full]
        if isinstance(stage, str):
            result.rows.extend(_failed_rows(task, [spec], stage))
            continue
        prepared, pre_time, cached = stage
        row, warped = _run_method(task, spec, prepared, src_lnd, tgt_lnd)
        row.update(time_preprocess_s=pre_time, preprocess_cached=cached)
        result.rows.append(row)
        if warped is not None:
            result.warped[spec.name] = warped
    return result


def _run_method(
    task: PairTask,
    spec: MethodSpec,
    prepared: PreparedPair,
    src_lnd: np.ndarray | None,
    tgt_lnd: np.ndarray | None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    pair = task.pair
    try:
        method = _instance(spec, Context(device=task.device, seed=task.seed, pair_id=pair.pair_id))
    except Exception as exc:  # noqa: BLE001 - a method that cannot even start fails its rows
        return _failed_rows(task, [spec], f"cannot start method: {type(exc).__name__}: {exc}")[0], None
    device = method.device_for(task.device)
    ctx = Context(device=device, seed=task.seed, pair_id=pair.pair_id)
    row = _base_row(pair, method, spec)
    row["device"] = device

    def call():
        return method.estimate(prepared.fixed, prepared.moving, ctx)

    key = (spec, task.device)
    status, error, estimate, diagnostics = "ok", "", None, {}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if key not in _WARM:  # warm-up call, excluded from timing
            call()
            _WARM.add(key)
            t0, c0 = time.perf_counter(), time.process_time()
        out = timed(call, device=device, limit_s=task.timeout_s)
        estimate, wall, cpu = out.value, out.wall_s, out.cpu_s
        if estimate.frame == "original":
            matrix, working = estimate.matrix, prepared.to_working(estimate.matrix)
        else:
            matrix, working = prepared.to_original(estimate.matrix), estimate.matrix
        row["quality"] = quality.alignment_quality(prepared.fixed, prepared.moving, working)
        diagnostics = dict(estimate.diagnostics)
    except CallTimeout as exc:
        status, error = "timeout", str(exc)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    except RegistrationFailed as exc:
        status, error = "failed", f"method reported failure: {exc}"
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    except Exception as exc:  # noqa: BLE001 - one failing call never stops the run
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    fallback = status != "ok"
    if fallback:  # score what a pipeline would fall back to: the preprocessing alone
        matrix = prepared.to_original(np.eye(3))
    diagnostics["preprocess"] = {
        k: v for k, v in prepared.diagnostics.items() if isinstance(v, int | float | str | bool)
    }
    row.update(
        status=status,
        error=error,
        time_s=wall,
        time_cpu_s=cpu,
        matrix=matrix,
        diagnostics=diagnostics,
        fallback=fallback,
    )
    warped = None
    if src_lnd is not None:
        warped = geometry.apply(matrix, src_lnd)
        if tgt_lnd is not None:
            scores = metrics.score_pair(warped, src_lnd, tgt_lnd, _diagonal(pair, prepared), task.success_threshold)
            row.update(scores)
            row["success"] = bool(scores["success"]) and status == "ok"
    if tgt_lnd is None and status == "ok":
        row["status"] = "unscored"
    return row, warped


# ----------------------------------------------------------------------------------------------------
# executors: each yields PairResults as they finish


def _serial(tasks: list[PairTask], workers: int) -> Iterator[PairResult]:  # noqa: ARG001
    for t in tasks:
        yield run_pair(t)


def limit_threads(n: int) -> None:
    """Cap the threads of every numeric library in this process (one call per worker)."""
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    import cv2

    cv2.setNumThreads(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:
        pass
    if "torch" in sys.modules or _has("torch"):
        import torch

        torch.set_num_threads(n)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _processes(tasks: list[PairTask], workers: int) -> Iterator[PairResult]:
    import concurrent.futures as cf
    import multiprocessing as mp

    per_worker = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=limit_threads, initargs=(per_worker,)) as ex:
        futures = [ex.submit(run_pair, t) for t in tasks]
        for fut in cf.as_completed(futures):
            yield fut.result()


EXECUTORS: dict[str, Callable[[list[PairTask], int], Iterator[PairResult]]] = {
    "serial": _serial,
    "processes": _processes,
}


# ----------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    dataset: Path | None = None  # an ANHIR pair table; None: the embedded sample
    data_roots: tuple[Path, ...] = ()
    methods: str = "all"
    out: Path | None = None
    workers: int = 1
    device: str = "auto"
    seed: int = 0
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # --set method.param=value
    timeout_s: float | None = None
    success_threshold: float = metrics.SUCCESS_THRESHOLD
    cache_enabled: bool = True
    cache_dir: Path | None = None
    plugins: tuple[str, ...] = ()
    executor: str = "auto"
    scheduler: str | None = None  # Dask scheduler address for executor "dask"
    limit: int | None = None  # only the first N pairs
    command: str = ""


@dataclass
class RunSummary:
    out: Path
    n_pairs: int
    methods: list[str]
    skipped: dict[str, str]
    written: int
    already: int
    counts: dict[str, int]


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["sift.ratio=0.8", "preprocess.working_size=800"]`` -> ``{"sift": {"ratio": "0.8"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        owner, dot, param = key.strip().partition(".")
        if not sep or not dot or not owner or not param:
            raise RunError(f"--set {item!r}: expected METHOD.PARAM=VALUE or preprocess.PARAM=VALUE")
        out.setdefault(owner, {})[param] = value.strip()
    return out


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise RunError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return device
    has_cuda = False
    if _has("torch"):
        import torch

        has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise RunError(f"--device {device}: no CUDA device is available here")
    return device


def _git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    import psutil

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["histreg-bench", "numpy", "opencv-contrib-python-headless", "opencv-python", "opencv-contrib-python",
             "SimpleITK", "torch", "mahotas", "scikit-image", "scipy", "pandas", "tifffile", "pillow", "itk-elastix"]
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            continue
    return out


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its finished children (worker processes), MiB."""
    import resource

    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def default_out(table: Path, embedded: bool) -> Path:
    name = "sample" if embedded else (table.parent.name or table.stem)
    return Path("reports") / name


def plan(config: RunConfig) -> tuple[list[Pair], Path, registry.Selection, list[MethodSpec], PreprocessParams, bool]:
    """Validate everything that can be checked before work starts (raises :class:`RunError`)."""
    registry.discover(config.plugins)
    try:
        selection = registry.select(config.methods)
    except registry.UnknownMethodError as exc:
        raise RunError(str(exc)) from None
    if not selection.chosen:
        raise RunError("no method is available to run")
    chosen = {c.name for c in selection.chosen}
    overrides = dict(config.overrides)
    pre_over = overrides.pop("preprocess", {})
    for owner in overrides:
        if owner not in registry.names():
            try:
                registry.get(owner)
            except registry.UnknownMethodError as exc:
                raise RunError(f"--set {owner}.*: {exc}") from None
        if owner not in chosen:
            raise RunError(f"--set {owner}.*: method {owner!r} is not among the methods of this run")
    specs = []
    for cls in selection.chosen:
        ov = overrides.get(cls.name, {})
        try:
            cls(**ov)  # validates names and types now, not in a worker
        except (ValueError, TypeError) as exc:
            raise RunError(f"--set: {exc}") from None
        specs.append(MethodSpec(cls.name, tuple(sorted(ov.items()))))
    try:
        pre = make_params(PreprocessParams, pre_over, owner="preprocess")
    except (ValueError, TypeError) as exc:
        raise RunError(f"--set: {exc}") from None

    embedded = config.dataset is None
    if embedded:
        from bench.datasets.sample import sample_table

        table = sample_table()
    else:
        table = Path(config.dataset)
    from bench.datasets.anhir import DatasetError

    try:
        pairs = load_table(table, config.data_roots)
    except DatasetError as exc:
        raise RunError(str(exc)) from None
    if config.limit:
        pairs = pairs[: config.limit]
    out = Path(config.out) if config.out else default_out(table, embedded)
    return pairs, out, selection, specs, pre, embedded


def _check_resume(store: ResultStore, manifest: dict[str, Any], specs: list[MethodSpec]) -> None:
    old = store.read_manifest()
    if not old:
        return
    if old.get("schema_version") != SCHEMA_VERSION:
        raise RunError(f"{store.folder}: results of schema {old.get('schema_version')}, this is {SCHEMA_VERSION}: use a new --out")
    if old.get("dataset", {}).get("sha256") != manifest["dataset"]["sha256"]:
        raise RunError(f"{store.folder} holds results of another dataset ({old['dataset'].get('path')}): use a new --out")
    if old.get("preprocess") != manifest["preprocess"]:
        raise RunError(f"{store.folder} holds results made with other preprocessing parameters: use a new --out")
    for name, info in manifest["methods"].items():
        prev = old.get("methods", {}).get(name)
        if prev and (prev.get("params") != info["params"] or prev.get("version") != info["version"]):
            raise RunError(
                f"{store.folder} holds {name!r} results made with other parameters or another version "
                f"({prev}); use a new --out to compare them"
            )


def run(config: RunConfig, progress: Callable[[PairResult, int, int], None] | None = None) -> RunSummary:
    pairs, out, selection, specs, pre, embedded = plan(config)
    device = resolve_device(config.device)
    store = ResultStore(out)
    dataset_path = Path(config.dataset) if config.dataset else None
    if dataset_path is None:
        from bench.datasets.sample import sample_table

        dataset_path = sample_table()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "command": config.command,
        "git_commit": _git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "packages": package_versions(),
        "dataset": {
            "path": str(dataset_path.resolve()),
            "embedded_sample": embedded,
            "sha256": file_digest(dataset_path),
            "n_pairs": len(pairs),
            "data_roots": [str(r) for r in config.data_roots],
        },
        "preprocess": dataclasses.asdict(pre),
        "methods": {
            s.name: {"version": registry.get(s.name).version, "params": s.build().params_dict()} for s in specs
        },
        "skipped_methods": selection.skipped,
        "device": device,
        "seed": config.seed,
        "workers": config.workers,
        "timeout_s": config.timeout_s,
        "success_threshold": config.success_threshold,
    }
    _check_resume(store, manifest, specs)
    old = store.read_manifest()
    if old:  # keep the record of earlier methods in this folder, refresh the rest
        merged_methods = {**old.get("methods", {}), **manifest["methods"]}
        manifest["methods"] = merged_methods
        manifest["created"] = old.get("created", manifest["created"])
        manifest["resumed"] = datetime.now(UTC).isoformat(timespec="seconds")
    from bench.reference import reference_time

    manifest["reference_time_s"] = reference_time()
    store.write_manifest(manifest)

    done = store.done_keys()
    tasks = []
    already = 0
    for p in pairs:
        todo = tuple(s for s in specs if (p.pair_id, s.name) not in done)
        already += len(specs) - len(todo)
        if todo:
            tasks.append(
                PairTask(
                    pair=p,
                    methods=todo,
                    preprocess=pre,
                    device=device,
                    seed=config.seed,
                    timeout_s=config.timeout_s,
                    success_threshold=config.success_threshold,
                    cache_dir=str(config.cache_dir) if config.cache_dir else None,
                    cache_enabled=config.cache_enabled,
                    plugins=config.plugins,
                )
            )
    executor = config.executor
    if executor == "auto":
        executor = "processes" if config.workers > 1 else "serial"
    if executor == "dask":
        from bench.distributed import dask_executor

        execute = dask_executor(config.scheduler)
    elif executor in EXECUTORS:
        execute = EXECUTORS[executor]
    else:
        raise RunError(f"--executor {executor!r}: expected serial, processes or dask")
    written = 0
    counts: dict[str, int] = {}
    for i, res in enumerate(execute(tasks, config.workers), start=1):
        for method, pts in res.warped.items():
            store.write_warped(method, res.rows[0]["pair_id"], pts)
        store.append(res.rows)
        written += len(res.rows)
        for r in res.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        if progress:
            progress(res, i, len(tasks))
    manifest["peak_rss_mb"] = peak_rss_mb()
    store.write_manifest(manifest)
    return RunSummary(out, len(pairs), [s.name for s in specs], selection.skipped, written, already, counts)


__all__ = ["RunConfig", "RunError", "RunSummary", "run", "run_pair", "PairTask", "MethodSpec", "parse_overrides"]
