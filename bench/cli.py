"""Command line: ``python -m bench run|list|report|export-anhir|train|cache``."""

from __future__ import annotations

import argparse
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
from rich.table import Table

console = Console(stderr=True)


def say(text: object) -> None:
    """Print text as it is (paths and ids may hold ``[``: never read as markup)."""
    console.print(str(text), markup=False, highlight=False)


def fail(message: object) -> int:
    """One ``error:`` line (the message printed literally); returns the exit code 2."""
    console.print(f"[red]error:[/] {escape(str(message))}", highlight=False)
    return 2


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run methods over a dataset of ANHIR pairs and store the results")
    p.add_argument("--dataset", type=Path, help="ANHIR pair table (CSV); default: the embedded generated sample")
    p.add_argument("--data-root", type=Path, action="append", default=[], metavar="DIR",
                   help="extra folder to resolve the table's relative paths against (repeatable)")
    p.add_argument("--methods", default="all", help="'all' (every available method) or a comma-separated list")
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
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache folder (default: user cache)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module that registers extra methods (repeatable)")
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
                        last=escape(f"pair {last['pair_id']} {last['method']}: {last['status']}"))

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
    import dataclasses

    from bench import registry

    registry.discover(tuple(args.plugin))
    table = Table(title="registered methods")
    for col in ("name", "version", "available", "preprocessing", "devices", "parameters (defaults)"):
        table.add_column(col)
    for name in registry.names():
        cls = registry.get(name)
        reason = cls.unavailable_reason()
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params)) or "-"
        table.add_row(name, cls.version, "yes" if not reason else f"[red]no[/]: {reason}",
                      "shared" if cls.uses_preprocessing else "none", ",".join(cls.devices), params)
    Console().print(table)
    for mod, err in registry.broken_modules().items():
        Console().print(f"[red]unavailable[/] {mod}: {err}")
    from bench.preprocess import PreprocessParams

    pre = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(PreprocessParams))
    Console().print(f"preprocess parameters: {pre}")
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
    from bench.report import ReportError, importer

    try:
        summary = importer.import_anhir(args.run, args.method, args.table, replace=args.replace)
    except ReportError as exc:
        return fail(exc)
    say(importer.summary_line(summary))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from bench.cache import PreprocessCache

    cache = PreprocessCache(args.cache_dir)
    if args.action == "clear":
        n = cache.clear()
        console.print(f"removed {n} cached pairs from {cache.folder}")
    else:
        console.print(str(cache.folder))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a fatal error")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("list", help="list the registered methods, their availability and parameters")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
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
    try:
        from bench.learning import train

        train.add_arguments(p)
    except ImportError as exc:  # torch missing: the command explains itself
        p.set_defaults(_train_error=str(exc))
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "_train_error", None):
        console.print(f"[red]error:[/] training needs torch: {args._train_error}")
        return 2
    from bench.learning import train

    return int(train.run(args) or 0)


def cmd_make_large(args: argparse.Namespace) -> int:
    from bench.largescale import write_large_pair

    for fmt, table in write_large_pair(args.folder, long_side=args.long_side).items():
        console.print(f"{fmt}: {table}")
    return 0


COMMANDS = {"make-large": cmd_make_large, "run": cmd_run, "list": cmd_list, "report": cmd_report, "export-anhir": cmd_export, "import-anhir": cmd_import,
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
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if debug:
            raise
        text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        return fail(f"{text} (run with --debug for the traceback)")
