"""The plan of a run, computed once before any work: options validated, methods resolved and built once,
the pair table read once, the output folder and the executor chosen.

:func:`make_plan` turns a :class:`RunConfig` (what the user asked for) into a :class:`Plan` (a typed, frozen
value the runner, the executors and the workers share). Every option is checked here, so a bad value is one
:class:`RunError` line before a worker starts or a row is written.

>>> parse_overrides(["sift.ratio=0.8", "preprocess.working_size=800"])
{'sift': {'ratio': '0.8'}, 'preprocess': {'working_size': '800'}}
>>> check_options(RunConfig(limit=0))
Traceback (most recent call last):
...
bench.plan.RunError: --limit 0: expected a whole number >= 1
>>> check_options(RunConfig(timeout_s=float("nan")))
Traceback (most recent call last):
...
bench.plan.RunError: --timeout nan: expected a number of seconds > 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import factory, metrics, registry
from bench.method import make_params
from bench.pairs import DatasetError, Pair, load_table
from bench.preprocess import PreprocessParams

EXECUTORS = ("serial", "processes", "dask")


class RunError(Exception):
    """The run cannot start (bad configuration); raised before any work is done."""


ESTIMATE_ENV = "HISTREG_BENCH_ERROR_ESTIMATE"  # "0": runs skip the error estimate unless asked (the test suite)


def estimate_by_default() -> bool:
    """Whether a run computes ``error_estimate`` when not told: yes, unless :data:`ESTIMATE_ENV` is 0/false/no."""
    return os.environ.get(ESTIMATE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class RunConfig:
    """What the user asked for (the command line, or a caller of :func:`bench.runner.run`)."""

    dataset: Path | None = None  # an ANHIR pair table; None: the embedded sample
    data_roots: tuple[Path, ...] = ()
    methods: str = "all"
    then: str | None = None  # a nonrigid stage: every chosen initial method M also runs as M>then
    out: Path | None = None
    workers: int = 1
    device: str = "auto"
    seed: int = 0
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # --set method.param=value
    timeout_s: float | None = None
    success_threshold: float | None = metrics.SUCCESS_THRESHOLD  # None: the default
    cache_enabled: bool = True
    cache_dir: Path | None = None
    plugins: tuple[str, ...] = ()
    executor: str = "auto"
    scheduler: str | None = None  # Dask scheduler address for executor "dask"
    limit: int | None = None  # only the first N pairs
    retry_failed: bool = False  # also rerun rows the method reported as failed (and bad inputs)
    error_estimate: bool = field(default_factory=estimate_by_default)  # the error_estimate column (a re-alignment)
    command: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A method by name with its parameter overrides (picklable, rebuilt once in each worker).

    ``version`` and ``params`` (JSON, every parameter with its value) are filled by the plan, so rows can be
    written for a method without building it (e.g. by the parent when a worker died).
    """

    name: str
    overrides: tuple[tuple[str, str], ...] = ()
    version: str = ""
    params: str = "{}"

    def build(self):
        return factory.resolve(self.name)(**dict(self.overrides))

    def params_dict(self) -> dict[str, Any]:
        return json.loads(self.params)


@dataclass(frozen=True)
class PairTask:
    """Everything a worker needs to process one pair with some methods."""

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
    split: bool = False  # one of several tasks of this pair (its preprocessing is kept in the worker's memory)
    error_estimate: bool = True  # score each ok affine answer's error_estimate (bench.quality.estimated_error)


@dataclass(frozen=True)
class Plan:
    """Everything decided before work starts."""

    config: RunConfig
    table: Path  # the pair table read (the embedded sample's when config.dataset is None)
    embedded: bool
    pairs: tuple[Pair, ...]
    out: Path
    specs: tuple[MethodSpec, ...]
    skipped: dict[str, str]  # methods left out of "all", with the reason
    preprocess: PreprocessParams
    device: str
    executor: str  # serial, processes or dask
    workers: int
    timeout_s: float | None
    success_threshold: float

    @property
    def method_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def task(self, pair: Pair, methods: Iterable[MethodSpec]) -> PairTask:
        c = self.config
        return PairTask(
            pair=pair,
            methods=tuple(methods),
            preprocess=self.preprocess,
            device=self.device,
            seed=c.seed,
            timeout_s=self.timeout_s,
            success_threshold=self.success_threshold,
            cache_dir=str(c.cache_dir) if c.cache_dir else None,
            cache_enabled=c.cache_enabled,
            plugins=c.plugins,
            error_estimate=c.error_estimate,
        )


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


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# device files a CUDA (or ROCm, or WSL) GPU needs on Linux: without any of them torch cannot see a GPU
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def cuda_possible() -> bool:
    """Whether a CUDA device may be there, answered without importing torch where that is certain: torch
    is not installed, or (Linux) no GPU device file exists. Importing torch takes about a second, which the
    parent process of every run paid only to learn that there is no GPU."""
    if not _has("torch"):
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(f) for f in _GPU_DEVICE_FILES)
    return sys.platform != "darwin"


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise RunError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return device
    has_cuda = False
    if cuda_possible():
        import torch

        has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise RunError(f"--device {device}: no CUDA device is available here")
    return device


def default_out(table: Path, embedded: bool) -> Path:
    name = "sample" if embedded else (table.parent.name or table.stem)
    return Path("reports") / name


def _whole(value: Any, option: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RunError(f"{option} {value}: expected a whole number >= {minimum}")


def check_options(config: RunConfig) -> None:
    """Refuse option values that make no sense (one line each); nothing is read or written."""
    _whole(config.workers, "--workers", 1)
    _whole(config.seed, "--seed", 0)
    if config.limit is not None:
        _whole(config.limit, "--limit", 1)
    t = config.timeout_s
    if t is not None and not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
        raise RunError(f"--timeout {t}: expected a number of seconds > 0")
    s = config.success_threshold
    if s is not None and not (isinstance(s, int | float) and math.isfinite(s) and 0 < s <= 1):
        raise RunError(f"--success-threshold {s}: expected a median rTRE > 0 and <= 1 (default "
                       f"{metrics.SUCCESS_THRESHOLD})")
    if config.executor not in ("auto", *EXECUTORS):
        raise RunError(f"--executor {config.executor!r}: expected serial, processes or dask")
    if config.scheduler and config.executor != "dask":
        raise RunError("--scheduler is for --executor dask")
    if config.out is not None and Path(config.out).exists() and not Path(config.out).is_dir():
        raise RunError(f"--out {config.out}: exists and is not a folder")
    if config.dataset is not None and not Path(config.dataset).is_file():
        raise RunError(f"--dataset {config.dataset}: pair table not found")


def _specs(config: RunConfig) -> tuple[list[MethodSpec], dict[str, str], dict[str, str]]:
    try:
        registry.discover(config.plugins)
    except registry.PluginError as exc:  # names the plugin and the cause
        raise RunError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a plugin that does not import is one line
        raise RunError(f"--plugin: cannot import {', '.join(config.plugins)}: {type(exc).__name__}: {exc}") from None
    try:
        selection = factory.select(config.methods)
    except registry.UnknownMethodError as exc:
        raise RunError(str(exc)) from None
    if not selection.chosen:
        raise RunError("no method is available to run")
    classes, skipped = selection.chosen, dict(selection.skipped)
    if config.then:
        try:
            classes, not_followed = factory.then(classes, config.then)
        except registry.UnknownMethodError as exc:
            raise RunError(str(exc)) from None
        skipped.update(not_followed)
    chosen = {c.name for c in classes}
    overrides = dict(config.overrides)
    pre_over = overrides.pop("preprocess", {})
    stage = factory.resolve(config.then).name if config.then else None
    if stage and stage in overrides and stage not in chosen:  # --then S --set S.p=v: S's parameters in every M>S
        _stage_overrides(overrides, stage, [c for c in classes if c.name.endswith(f">{stage}")])
    for owner in overrides:
        try:
            factory.resolve(owner)
        except registry.UnknownMethodError as exc:
            raise RunError(f"--set {owner}.*: {exc}") from None
        if owner not in chosen:
            raise RunError(f"--set {owner}.*: method {owner!r} is not among the methods of this run")
    specs = []
    for cls in classes:
        ov = overrides.get(cls.name, {})
        try:
            method = cls(**ov)  # validates names and types now, not in a worker
        except (ValueError, TypeError) as exc:
            raise RunError(f"--set: {exc}") from None
        params = json.dumps(dataclasses.asdict(method.params), sort_keys=True, default=str)
        specs.append(MethodSpec(cls.name, tuple(sorted(ov.items())), str(method.version), params))
    return specs, skipped, pre_over


def _stage_overrides(overrides: dict[str, dict[str, str]], stage: str, followed: list[type]) -> None:
    """Move ``--set STAGE.p=v`` (with ``--then STAGE``) into the member parameter of STAGE of every ``M>STAGE``
    (a composite's member parameters are one ``p=v;p=v`` text per member, :mod:`bench.compose`)."""
    from bench.compose import member_field

    values = overrides.pop(stage)
    text = ";".join(f"{k}={v}" for k, v in values.items())
    for cls in followed:
        field = member_field(stage)
        own = overrides.setdefault(cls.name, {})
        own[field] = f"{own[field]};{text}" if own.get(field) else text


def make_plan(config: RunConfig) -> Plan:
    """Validate everything that can be checked before work starts (raises :class:`RunError`)."""
    check_options(config)
    specs, skipped, pre_over = _specs(config)
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
    try:
        pairs = load_table(table, config.data_roots)
    except DatasetError as exc:
        raise RunError(str(exc)) from None
    if config.limit:
        pairs = pairs[: config.limit]
    device = resolve_device(config.device)
    executor = config.executor
    if executor == "auto":
        executor = "processes" if config.workers > 1 else "serial"
    threshold = metrics.SUCCESS_THRESHOLD if config.success_threshold is None else float(config.success_threshold)
    return Plan(
        config=config,
        table=table,
        embedded=embedded,
        pairs=tuple(pairs),
        out=Path(config.out) if config.out else default_out(table, embedded),
        specs=tuple(specs),
        skipped=dict(skipped),
        preprocess=pre,
        device=device,
        executor=executor,
        workers=config.workers,
        timeout_s=float(config.timeout_s) if config.timeout_s else None,
        success_threshold=threshold,
    )
