"""The method registry: a plain lookup of method classes by name, filled by registration and discovery.

Methods register by name with :func:`register` (a class decorator) when their module is imported.
:func:`discover` imports, once, every module in the ``bench.methods`` package (the project's ``methods/``
folder) and the entry points of other installed packages in the ``bench.methods`` group; methods from
outside the project also load as *plugins*, named on the command line (``--plugin``). A plugin is one of:

* a module name, ``my_package.my_methods`` (imported; also found in the current folder, as
  ``python -m`` would);
* a ``.py`` file, ``/path/to/my_methods.py`` or ``my_methods.py`` (loaded under a module name made from
  its resolved path, so every process that loads the same file gets the same module and the same classes);
* either of those followed by ``:Class``, ``my_package.my_methods:MyMethod``: the module is imported and
  ``Class`` registered (decorating it with :func:`register` is then optional).

A plugin the user names that cannot be loaded raises :class:`PluginError` (one line: which plugin, why);
a broken entry point or built-in module only makes its methods *unavailable*, listed with the reason
(:func:`broken_modules`). Optional heavy dependencies (torch, mahotas ...) must be imported inside the
method, not at module level, so a missing one makes the method *unavailable* instead of breaking the registry.

:func:`get` knows registered names only. Composed names (``sift|iterative``) are parsed and built above the
registry: :func:`bench.factory.resolve` and :func:`bench.factory.select` resolve every name the user gives.
Of the project, this module imports only :mod:`bench.method` (and, in :func:`discover`, the method modules).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

from bench.method import Method

_REGISTRY: dict[str, type[Method]] = {}
_BROKEN: dict[str, str] = {}  # module name -> import error, shown as unavailable
_PLUGINS: dict[str, list[type[Method]]] = {}  # plugin spec as given -> the classes it registered
_DISCOVERED = False
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


class UnknownMethodError(KeyError):
    """A method name that is not registered, or that cannot run here."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class PluginError(UnknownMethodError):
    """A plugin the user named cannot be loaded; the message names the plugin and the cause, on one line.

    A subclass of :class:`UnknownMethodError`, so callers that turn registry errors into a clean error
    line (:func:`bench.plan.make_plan`, the ``list`` and ``check`` commands) handle it too.
    """


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a Method subclass")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__qualname__}: method name must be a non-empty lower-case word "
                         f"(letters, digits, _ . + -), got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def discover(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in methods and entry-point plugins (once), then the given plugins.

    Raises :class:`PluginError` when one of ``plugins`` cannot be loaded. Loading the same plugin again
    (another call, or another process given the same string) is a no-op.
    """
    global _DISCOVERED
    if not _DISCOVERED:
        import bench.methods as pkg

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            _import(f"{pkg.__name__}.{info.name}")
        load_entry_points()
        _DISCOVERED = True
    for spec in plugins:
        load_plugin(spec)


def load_entry_points(group: str = "bench.methods") -> None:
    """Load every entry point of ``group`` (``module`` or ``module:Class``); a broken one is listed as
    unavailable with its reason instead of breaking the registry."""
    for ep in importlib.metadata.entry_points(group=group):
        try:
            load_plugin(ep.value)
        except PluginError as exc:
            _BROKEN[f"entry point {ep.name} = {ep.value}"] = str(exc)


def load_plugin(spec: str) -> list[type[Method]]:
    """Load one plugin (``module``, ``file.py``, either with ``:Class``); returns the classes it registered.

    >>> load_plugin("bench.methods.identity:Identity")[0].name
    'identity'
    >>> load_plugin("no_such_module_xyz")
    Traceback (most recent call last):
    ...
    bench.registry.PluginError: plugin 'no_such_module_xyz': no module or file of that name ...
    """
    spec = str(spec).strip()
    if spec in _PLUGINS:
        return _PLUGINS[spec]
    target, attr = _split_spec(spec)
    before = dict(_REGISTRY)
    try:
        module = _load_module(target, spec)
        if attr:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    raise PluginError(f"plugin {spec!r}: {module.__name__} has no attribute {attr!r}")
            if not (isinstance(obj, type) and issubclass(obj, Method)):
                raise PluginError(f"plugin {spec!r}: {attr} is {obj!r}, not a bench.Method subclass")
            register(obj)
    except ValueError as exc:  # register(): a bad or duplicate name
        raise PluginError(f"plugin {spec!r}: {exc}") from exc
    added = [c for n, c in _REGISTRY.items() if before.get(n) is not c]
    if attr:
        added = added or [obj]
    _PLUGINS[spec] = added
    return added


def _split_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:Class"`` -> ``("pkg.mod", "Class")``; a trailing ``:Name`` only (never a drive letter)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", tail):
        return head, tail
    return spec, ""


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or (os.altsep is not None and os.altsep in target)


def plugin_module_name(path: str | Path) -> str:
    """The module name a plugin file is loaded under: its stem and a digest of its resolved path.

    The same file always gets the same name (in every worker process); two files of the same name in
    different folders do not collide, and none shadows an installed module.

    >>> plugin_module_name("/tmp/my methods.py").startswith("bench_plugin_my_methods_")
    True
    """
    path = Path(path).expanduser().resolve()
    stem = re.sub(r"\W", "_", path.stem)
    return f"bench_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _load_module(target: str, spec: str):
    if _is_file_spec(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin {spec!r}: no such file {str(path)!r}")
        name = plugin_module_name(path)
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise PluginError(f"plugin {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name while it runs
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if not isinstance(exc, Exception | SystemExit):  # Ctrl-C stays Ctrl-C
                raise
            raise PluginError(f"plugin {spec!r} failed to import: {_cause(exc, path)}") from exc
        return module
    try:
        return _import_name(target)
    except PluginError:
        raise
    except (Exception, SystemExit) as exc:  # any error of the user's module becomes one clear line
        raise PluginError(f"plugin {spec!r} failed to import: {_cause(exc, None)}") from exc


def _import_name(target: str):
    """Import a module by name; the current folder is searched too (last), as ``python -m`` would."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if not _is_missing(exc, target):
            raise  # the plugin itself imports something missing: a cause, reported by the caller
        cwd = os.getcwd()
        top = target.split(".")[0]
        if cwd in sys.path or importlib.machinery.PathFinder.find_spec(top, [cwd]) is None:
            raise PluginError(f"plugin {target!r}: no module or file of that name (looked in sys.path and "
                              f"{cwd}; a file needs its .py suffix or a folder in its path)") from None
        sys.path.append(cwd)  # after everything installed: a file here never shadows a library
        return importlib.import_module(target)


def _is_missing(exc: ModuleNotFoundError, target: str) -> bool:
    """True when ``exc`` says ``target`` (or a package on its path) does not exist."""
    return bool(exc.name) and (target == exc.name or target.startswith(f"{exc.name}."))


def _cause(exc: BaseException, path: Path | None) -> str:
    """``Type: message`` of an import error, with the file and line where it was raised."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({Path(exc.filename).name} line {exc.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
        if path is not None:
            frames = [f for f in frames if Path(f.filename) == path] or frames
        if frames:
            where = f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})"
    if isinstance(exc, SystemExit):  # a module that ends the process while it is imported
        return f"it called sys.exit({exc.code!r}) while being imported{where}"
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{where}"


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken method file must not break the registry
        _BROKEN[module] = _cause(exc, None)


def names() -> list[str]:
    """The registered names, sorted (composed names are not registered)."""
    discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``; unknown names raise with a did-you-mean hint.

    A registered name only: a composed name is resolved by :func:`bench.factory.resolve`.
    """
    discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def broken_modules() -> dict[str, str]:
    """Modules and entry points that failed to import -> the error (their methods are unavailable)."""
    discover()
    return dict(_BROKEN)
