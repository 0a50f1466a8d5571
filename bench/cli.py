"""Command line: ``python -m bench COMMAND``, COMMAND one of run, list, check, report, export-anhir,
import-anhir, cache, make-large, train (``python -m bench COMMAND --help``: its options).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line in a log or a pipe


def say(text: object) -> None:
    """Print text as it is (paths and ids may hold ``[``: never read as markup)."""
    console.print(str(text), markup=False, highlight=False)


def fail(message: object) -> int:
    """One ``error:`` line (the message printed literally); returns the exit code 2."""
    console.print(f"[red]error:[/] {escape(str(message))}", highlight=False)
    return 2


CHECK_TIMEOUT_S = 300.0  # per contract check: a generous bound (the slowest built-in check takes seconds)
_PLUGIN_HELP = "methods from outside: a module, a .py file, or either with :Class (repeatable)"


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run methods over a dataset of ANHIR pairs and store the results")
    p.add_argument("--dataset", type=Path, help="ANHIR pair table (CSV); default: the embedded generated sample")
    p.add_argument("--data-root", type=Path, action="append", default=[], metavar="DIR",
                   help="extra folder to resolve the table's relative paths against (repeatable)")
    p.add_argument("--methods", default="all", help="'all' (every available initial, affine method) or a "
                   "comma-separated list of methods and expressions")
    p.add_argument("--then", metavar="NAME", help="a nonrigid stage (bspline, demons, deformable): every chosen "
                   "initial method M also runs as M>NAME, started from M's result (the downstream success)")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<dataset name>)")
    p.add_argument("--workers", type=int, default=1, help="pairs processed in parallel processes (default 1)")
    p.add_argument("--executor", default="auto", choices=["auto", "serial", "processes", "dask"],
                   help="where pairs run: auto = serial for 1 worker, else processes; dask = a Dask cluster")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://host:8786) for --executor dask; "
                   "default: a local cluster with --workers workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (methods that cannot use it run on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                   help="override a parameter, e.g. sift.ratio=0.75 or preprocess.working_size=800 (repeatable)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="time limit per method call, seconds")
    p.add_argument("--success-threshold", type=float, default=None,
                   help="median rTRE at or below which a pair counts as a success (default 0.035)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessing cache")
    p.add_argument("--no-error-estimate", action="store_true",
                   help="skip the error_estimate column (a local re-alignment of every ok affine answer: about "
                   "0.2 s per row, and torch's import once per worker; default on unless HISTREG_BENCH_ERROR_ESTIMATE=0)")
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache folder (default: user cache)")
    p.add_argument("--plugin", action="append", default=[], metavar="PLUGIN", help=_PLUGIN_HELP)
    p.add_argument("--limit", type=int, help="only the first N pairs of the table")
    p.add_argument("--retry-failed", action="store_true",
                   help="also run again the stored rows a method reported as failed, and bad inputs "
                   "(timeouts and crashes are always run again)")


def _progress_columns():
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from bench import runner

    config = runner.RunConfig(
        dataset=args.dataset,
        data_roots=tuple(args.data_root),
        methods=args.methods,
        then=args.then,
        out=args.out,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
        timeout_s=args.timeout,
        success_threshold=args.success_threshold,
        cache_enabled=not args.no_cache,
        cache_dir=args.cache_dir,
        plugins=tuple(args.plugin),
        executor=args.executor,
        scheduler=args.scheduler,
        limit=args.limit,
        retry_failed=args.retry_failed,
        error_estimate=False if args.no_error_estimate else runner.estimate_by_default(),
        command=" ".join(shlex.quote(a) for a in ["python", "-m", "bench", *sys.argv[1:]]),
    )
    try:
        config.overrides = runner.parse_overrides(args.overrides)
        plan = runner.make_plan(config)
    except runner.RunError as exc:
        return fail(exc)
    say(f"methods: {', '.join(plan.method_names)}")
    for name, reason in plan.skipped.items():
        console.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}")
    say(f"{len(plan.pairs)} pairs -> {plan.out}")
    with Progress(*_progress_columns(), console=console, transient=False) as prog:
        task = prog.add_task("pairs", total=None, last="")

        def on_result(res, i, n):
            last = res.rows[-1]
            prog.update(task, total=n, completed=i,
                        last=escape(f"pair {last.pair_id} {last.method}: {last.status}"))

        try:
            summary = runner.run(plan, progress=on_result)
        except runner.RunError as exc:
            prog.stop()
            return fail(exc)
        except runner.RunInterrupted as exc:
            prog.stop()
            say(str(exc))
            return 130
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing new"
    retried = f" ({summary.retried} earlier timeouts or crashes run again)" if summary.retried else ""
    say(f"wrote {summary.written} rows ({counts}); {summary.already} already stored{retried}")
    for (method, status), (n, message) in sorted(summary.problems.items()):
        say(f"  {method}: {n} {status}" + (f"; first: {message}" if message else ""))
    say(f"results: {summary.out / 'results.csv'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``list``: a short table of the methods; ``list NAME``: one method's parameters and known limits."""
    from bench import registry

    try:
        registry.discover(tuple(args.plugin))
    except registry.PluginError as exc:
        return fail(exc)
    out = Console()
    if args.name:
        return _list_one(args.name, out)
    rows, unavailable, limited = [], {}, []
    for name in registry.names():
        cls = registry.get(name)
        reason = cls.unavailable_reason()
        if reason:
            unavailable[name] = reason
        if cls.known_limits:
            limited.append(f"{name} ({len(cls.known_limits)})")
        version = cls.version if len(cls.version) <= 7 else cls.version[:6] + "…"  # `list NAME`: all of it
        rows.append((name, cls.kind, version, "no" if reason else "yes", cls.description.split(". ")[0]))
    width = max(40, out.width)
    nw = max([len(r[0]) for r in rows] + [4])
    for i, (name, kind, version, available, desc) in enumerate(
            [("name", "kind", "version", "available", "description"), *rows]):
        line = f"{name:<{nw}}  {kind:<8}  {version:<7}  {available:<9}  {desc}"
        if len(line) > width:  # the description is cut to the terminal (COLUMNS), the rest stays aligned
            line = line[: width - 1].rstrip() + "…"
        out.print(line, markup=False, highlight=False, style="bold" if i == 0 else None)
    for name, reason in unavailable.items():
        out.print(f"{name} is unavailable: {reason}", markup=False)
    for mod, err in registry.broken_modules().items():
        out.print(f"{mod} failed to import: {err}", markup=False)
    if limited:
        out.print(f"known limits declared by: {', '.join(limited)}", markup=False)
    out.print("kind: affine methods start a pipeline (run --methods all runs them); nonrigid ones follow one "
              "(run --then NAME, or --methods 'sift>NAME').", markup=False)
    out.print("`list NAME` shows a method's parameters and known limits (`list preprocess`: the shared "
              "stage's); `check NAME` runs its contract checks.", markup=False)
    return 0


def _list_one(name: str, out: Console) -> int:
    import textwrap

    from bench import factory, registry
    from bench.method import describe_params

    if name == "preprocess":
        from bench.preprocess import PreprocessParams

        out.print("preprocess: the shared preprocessing stage (docs/preprocessing.md)", markup=False)
        _print_params(out, describe_params(PreprocessParams), "preprocess")
        return 0
    try:
        cls = factory.resolve(name)
    except registry.UnknownMethodError as exc:
        return fail(exc)
    width = max(40, out.width)
    reason = cls.unavailable_reason()
    lines = [f"{cls.name} {cls.version} ({cls.kind}): {cls.description or '(no description)'}",
             f"available: {'yes' if not reason else 'no: ' + reason}",
             f"input: {'the shared preprocessing' if cls.uses_preprocessing else 'resampled images only'}; "
             f"devices: {', '.join(cls.devices)}; requires: {', '.join(cls.requires) or '-'}",
             f"class: {cls.__module__}.{cls.__qualname__}"]
    for line in lines:
        out.print(textwrap.fill(line, width, subsequent_indent="  "), markup=False, highlight=False)
    _print_params(out, describe_params(cls.Params), cls.name)
    if cls.known_limits:
        out.print(f"known limits (contract checks it fails by design; `check {cls.name}`):", markup=False)
        for check, why in cls.known_limits.items():
            out.print(textwrap.fill(f"{check}: {why}", width, initial_indent="  ", subsequent_indent="      "),
                      markup=False, highlight=False)
    else:
        out.print("known limits: none declared", markup=False)
    return 0


def _print_params(out: Console, params: list, owner: str) -> None:
    import dataclasses
    import textwrap

    width = max(40, out.width)
    if not params:
        out.print("parameters: none", markup=False)
        return
    out.print(f"parameters (--set {owner}.NAME=VALUE):", markup=False)
    for p in params:
        default = "(required)" if p.default is dataclasses.MISSING else repr(p.default)
        out.print(textwrap.fill(f"{p.name}: {p.type} = {default}", width, initial_indent="  ",
                                subsequent_indent="      "), markup=False, highlight=False)
        if p.help:
            out.print(textwrap.fill(p.help, width, initial_indent="      ", subsequent_indent="      "),
                      markup=False, highlight=False)


def cmd_check(args: argparse.Namespace) -> int:
    """``check NAME``: run every contract check (bench.conformance) on one method, one line per check."""
    from rich.text import Text

    from bench import conformance, factory, isolate, registry

    try:
        registry.discover(tuple(args.plugin))
        cls = factory.resolve(args.name)
    except registry.UnknownMethodError as exc:  # also a PluginError
        return fail(exc)
    out = Console(soft_wrap=True)  # one line per check, whatever the terminal's width
    import inspect

    where = inspect.getsourcefile(cls) or cls.__module__
    out.print(f"{cls.name} {cls.version} ({cls.__qualname__} in {where})", markup=False, highlight=False)
    styles = {conformance.PASS: "green", conformance.FAIL: "bold red", conformance.LIMIT: "yellow",
              conformance.SKIP: "dim"}
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        return fail(f"--timeout {args.timeout:g}: expected a positive number of seconds")
    results = []
    # each check in a supervised child: a method that exits, crashes or hangs fails that check, and the rest run
    with isolate.Isolated(registry.discover, (tuple(args.plugin),)) as child:
        for check in conformance.CHECKS:
            outcome = child.call(conformance.run_named_check, cls.name, check, timeout=args.timeout)
            r = outcome.value if outcome.ok else conformance.Result(check, conformance.FAIL,
                                                                    f"{outcome.kind}: {outcome.error}")
            results.append(r)
            line = r.line()
            out.print(Text.assemble("  ", (line[:12], styles[r.status]), line[12:]), highlight=False)
    counts = {s: sum(r.status == s for r in results) for s in styles}
    out.print(f"{len(results)} checks: {counts[conformance.PASS]} passed, {counts[conformance.LIMIT]} known "
              f"limit(s), {counts[conformance.FAIL]} failed, {counts[conformance.SKIP]} skipped", markup=False)
    if counts[conformance.FAIL]:
        return 1
    if counts[conformance.SKIP]:
        return fail(f"not checked here: {cls.name} is unavailable ({cls.unavailable_reason()})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench import report

    try:
        runs = args.run or [report.latest_run(Path("reports"))]
        path = report.build_report([Path(r) for r in runs], args.out)
    except report.ReportError as exc:
        return fail(exc)
    say(f"report: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bench import report

    try:
        path = report.export_anhir(args.run, args.method, args.out)
    except report.ReportError as exc:
        return fail(exc)
    say(f"ANHIR submission: {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from bench import anhir_import
    from bench.report import ReportError

    try:
        summary = anhir_import.import_anhir(args.run, args.method, args.table, replace=args.replace)
    except ReportError as exc:
        return fail(exc)
    say(anhir_import.summary_line(summary))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache path``: the folder and its size; ``cache clear``: remove the cached pairs and generated samples."""
    import shutil

    from bench import cache as cache_mod
    from bench.cachedir import CACHE_ENV, cache_root

    root = cache_root()
    cache = cache_mod.PreprocessCache(args.cache_dir)
    if args.action == "clear":
        n = cache.clear()
        samples = []
        if args.cache_dir is None:  # the embedded sample is regenerated on its next use
            samples = sorted(root.glob("sample-*")) if root.is_dir() else []
            for folder in samples:
                shutil.rmtree(folder, ignore_errors=True)
        say(f"removed {n} cached pairs from {cache.folder}"
            + (f" and {len(samples)} generated sample folder(s) from {root}" if samples else ""))
    else:
        where = cache.folder if args.cache_dir else root
        size, files = cache_mod.folder_size(where)
        print(where)
        say(f"{size / 1e6:.1f} MB in {files} files (${CACHE_ENV} moves it; "
            "`python -m bench cache clear` empties it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Declaring the commands imports none of their code: each command imports what it needs when it runs, so
    # --help, list, report ... never import torch (tests/test_structure.py).
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a fatal error")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("list", help="the registered methods; `list NAME`: one method's parameters and known limits")
    p.add_argument("name", nargs="?", help="a method (or 'preprocess'): every parameter, its type, default and "
                   "meaning, and the method's known limits")
    p.add_argument("--plugin", action="append", default=[], metavar="PLUGIN", help=_PLUGIN_HELP)
    p = sub.add_parser("check", help="run the contract checks on one method, each in a supervised process "
                       "(exit status 1 unless every check ran and passed)")
    p.add_argument("name", help="method name")
    p.add_argument("--timeout", type=float, default=CHECK_TIMEOUT_S, metavar="S",
                   help=f"time limit of each check in seconds (default {CHECK_TIMEOUT_S:g})")
    p.add_argument("--plugin", action="append", default=[], metavar="PLUGIN", help=_PLUGIN_HELP)
    p = sub.add_parser("report", help="tables, plots, gallery and report.html from stored runs")
    p.add_argument("--run", type=Path, action="append", help="run folder (repeatable; default: the latest under reports/)")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/report)")
    p = sub.add_parser("export-anhir", help="write a run's results in the ANHIR submission layout")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("import-anhir", help="add a tool's ANHIR submission table to a run as one more method "
                       "(scored here; its time is the one the tool reported)")
    p.add_argument("table", type=Path, help="the submission's pair table (with 'Warped source landmarks' and "
                   "'Execution time [minutes]' columns)")
    p.add_argument("--run", type=Path, required=True, help="run folder whose dataset the submission covers")
    p.add_argument("--method", required=True, help="name the imported rows get (must be new in the run)")
    p.add_argument("--replace", action="store_true", help="replace the rows of a method of that name")
    p = sub.add_parser("cache", help="show or clear the preprocessing cache")
    p.add_argument("action", choices=["path", "clear"])
    p.add_argument("--cache-dir", type=Path)
    p = sub.add_parser("make-large", help="write a full-resolution (16000 px) generated pair, JPEG and tiled TIFF")
    p.add_argument("folder", type=Path)
    p.add_argument("--long-side", type=int, default=16000)
    p = sub.add_parser("train", help="train the learned method's network (unsupervised)")
    from bench.learning import config  # the options only: torch is imported when training runs

    config.add_arguments(p)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from bench.learning import train
    except ImportError as exc:  # torch missing: the command explains itself
        return fail(f"training needs torch: {exc}")
    return int(train.run(args) or 0)


def cmd_make_large(args: argparse.Namespace) -> int:
    from bench.largescale import write_large_pair

    for fmt, table in write_large_pair(args.folder, long_side=args.long_side).items():
        say(f"{fmt}: {table}")
    return 0


COMMANDS = {"make-large": cmd_make_large, "run": cmd_run, "list": cmd_list, "check": cmd_check, "report": cmd_report, "export-anhir": cmd_export, "import-anhir": cmd_import,
            "cache": cmd_cache, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Fatal errors are one ``error:`` line and exit code 2 (``--debug``: the traceback);
    Ctrl-C exits 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        say("interrupted")
        return 130
    except Exception as exc:  # one line, not a traceback, unless --debug
        if debug:
            raise
        text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        return fail(f"{text} (run with --debug for the traceback)")
