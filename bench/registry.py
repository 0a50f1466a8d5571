"""The method registry: methods register by name on import; the registry finds them.

Every module in the ``bench.methods`` package (the project's ``methods/`` folder) is imported on first
use, and each registers its class with :func:`register`. Extra modules can be loaded with
``--plugin my.module`` or through the ``bench.methods`` entry-point group of another installed package.
Optional heavy dependencies (torch, mahotas ...) must be imported inside the method, not at module
level, so a missing one makes the method *unavailable* instead of breaking the registry.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass

from bench.method import Method

_REGISTRY: dict[str, type[Method]] = {}
_BROKEN: dict[str, str] = {}  # module name -> import error, shown as unavailable
_DISCOVERED = False


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a Method subclass")
    name = cls.name
    if not name or name != name.strip().lower() or "," in name or " " in name:
        raise ValueError(f"{cls.__qualname__}: method name must be a non-empty lower-case word, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def discover(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in methods (once), entry-point plugins and the given plugin modules."""
    global _DISCOVERED
    if not _DISCOVERED:
        import bench.methods as pkg

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            _import(f"{pkg.__name__}.{info.name}")
        for ep in importlib.metadata.entry_points(group="bench.methods"):
            _import(ep.value)
        _DISCOVERED = True
    for mod in plugins:
        importlib.import_module(mod)  # a plugin the user names must import: let the error show


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken method file must not break the registry
        _BROKEN[module] = f"{type(exc).__name__}: {exc}"


def names() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``; unknown names raise with a did-you-mean hint."""
    discover()
    if name not in _REGISTRY and any(ch in name for ch in "|>()"):
        from bench import compose  # a composition expression, e.g. "sift|iterative" (docs/compose.md)

        return compose.composite_class(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


@dataclass(frozen=True)
class Selection:
    chosen: list[type[Method]]
    skipped: dict[str, str]  # name -> reason


def select(spec: str) -> Selection:
    """Resolve ``all`` or a comma-separated list of names.

    ``all`` takes every available method and lists the others with their reasons; a named method that is
    unavailable is an error, since the user asked for it explicitly.
    """
    discover()
    skipped: dict[str, str] = {}
    if spec.strip() == "all":
        chosen = []
        for n in sorted(_REGISTRY):
            reason = _REGISTRY[n].unavailable_reason()
            if reason:
                skipped[n] = reason
            else:
                chosen.append(_REGISTRY[n])
        skipped.update({m: f"failed to import: {err}" for m, err in _BROKEN.items()})
        return Selection(chosen, skipped)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted:
        raise UnknownMethodError("no method named: use --methods all or a comma-separated list")
    chosen = []
    for n in dict.fromkeys(wanted):
        cls = get(n)
        reason = cls.unavailable_reason()
        if reason:
            raise UnknownMethodError(f"method {n!r} is unavailable here: {reason}")
        chosen.append(cls)
    return Selection(chosen, skipped)


def broken_modules() -> dict[str, str]:
    discover()
    return dict(_BROKEN)
