"""Method names to method classes: a registered name, or a composed expression built on registered names.

The registry (:mod:`bench.registry`) is a plain lookup of registered names; this module sits above it and
above :mod:`bench.compose`: a name that uses a composition operator (:func:`bench.expression.is_expression`,
e.g. ``sift|iterative``, ``learned>iterative``) becomes its :class:`~bench.compose.Composite` class, any other
name is looked up. Every caller that takes a method name from the user (``--methods``, ``--set``, ``list
NAME``, ``check NAME``, a worker rebuilding a method) resolves it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import compose, registry
from bench.expression import is_expression
from bench.method import Method


def resolve(name: str) -> type[Method]:
    """The method class of ``name``: the registered class, else the composite of an expression.

    Raises :class:`bench.registry.UnknownMethodError` (a :class:`bench.expression.CompositionError` for an
    expression) with a did-you-mean hint.
    """
    registry.discover()
    if is_expression(name):  # a registered name never holds an operator (registry.register checks)
        return compose.composite_class(name)
    return registry.get(name)


@dataclass(frozen=True)
class Selection:
    chosen: list[type[Method]]
    skipped: dict[str, str]  # name -> reason


def select(spec: str) -> Selection:
    """Resolve a comma-separated list of names (each a method, an expression, or ``all``); names that resolve to
    one method (``a|b`` and ``(a | b)``: one canonical name) are chosen once.

    ``all`` takes every available registered *initial* (affine) method and lists the unavailable ones with their
    reasons (nonrigid stages follow an initial method: name them, or use :func:`then`); a named method that is
    unavailable is an error, since the user asked for it explicitly.
    """
    registry.discover()
    skipped: dict[str, str] = {}
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted:
        raise registry.UnknownMethodError("no method named: use --methods all or a comma-separated list")
    chosen: dict[str, type[Method]] = {}  # canonical name -> class: equivalent spellings are one method
    for n in wanted:
        if n == "all":  # every available affine method, in name order (the others listed with the reason)
            for name in registry.names():
                cls = registry.get(name)
                if cls.kind != "affine":  # nonrigid stages follow an initial method: by name, or --then NAME
                    continue
                reason = cls.unavailable_reason()
                if reason:
                    skipped[name] = reason
                else:
                    chosen.setdefault(cls.name, cls)
            skipped.update({m: f"failed to import: {err}" for m, err in registry.broken_modules().items()})
            continue
        cls = resolve(n)
        reason = cls.unavailable_reason()
        if reason:
            raise registry.UnknownMethodError(f"method {n!r} is unavailable here: {reason}")
        chosen.setdefault(cls.name, cls)
    return Selection(list(chosen.values()), skipped)


def then(chosen: list[type[Method]], stage: str) -> tuple[list[type[Method]], dict[str, str]]:
    """``--then STAGE``: every chosen initial method ``M`` also as ``M>STAGE`` (the stage started from M's
    result), after the chosen ones; returns the extended list and the methods that cannot be followed, with why.
    """
    stage_cls = resolve(stage)
    if stage_cls.kind != "nonrigid":
        raise registry.UnknownMethodError(f"--then {stage!r}: not a nonrigid method (kind {stage_cls.kind!r}); "
                                          f"refine with an expression instead, e.g. --methods 'sift>{stage}'")
    reason = stage_cls.unavailable_reason()
    if reason:
        raise registry.UnknownMethodError(f"--then {stage!r} is unavailable here: {reason}")
    out = {c.name: c for c in chosen}
    skipped: dict[str, str] = {}
    for cls in chosen:
        if cls.kind != "affine":
            continue
        if not cls.uses_preprocessing:
            skipped[f"{cls.name}>{stage}"] = (f"{cls.name} answers in original pixels, so a stage cannot start from "
                                              f"it (preprocessed>{stage} starts from the preprocessing alone)")
            continue
        follow = resolve(f"({cls.name})>{stage_cls.name}" if is_expression(cls.name) else f"{cls.name}>{stage_cls.name}")
        out.setdefault(follow.name, follow)
    return list(out.values()), skipped


__all__ = ["Selection", "resolve", "select", "then"]
