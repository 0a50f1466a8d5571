"""Composed methods: fallback chains and refinements of registered methods, declared by an expression.

An expression (``A|B`` fallback, ``A>B`` refinement, parentheses; ``docs/compose.md``) is parsed by
:mod:`bench.expression`; this module runs it. :func:`bench.factory.resolve` turns a composed name into its class
(:func:`composite_class`); a class may also declare one (``methods/cascade.py``). A composite's members are
looked up in the registry when first needed (its parameters, version, devices or availability are read, or it is
built), never while the class is made, so a composite can be declared in a method file the registry is still
importing.

**Fallback** ``a|b|c``: each alternative runs in turn on the same pair. Its result is *accepted* when it did not
raise :class:`~bench.method.RegistrationFailed` and its landmark-free quality
(:func:`bench.quality.alignment_quality`, the harness's own ``quality`` column) is at least ``accept``. The first
accepted result is returned; the rest do not run. When none is accepted, the result with the highest quality is
returned, unless that quality is below ``refuse_below`` (off by default), and when every alternative failed the
composite raises ``RegistrationFailed`` listing each one's reason.

**Refinement** ``a>b``: ``a`` runs on the pair; the moving view (image, mask, colour, field of view) is warped by
its working-frame matrix into the fixed frame; ``b`` runs on that; the matrices compose (``final = M_b @ M_a``,
and so on for longer chains, each warp made from the original moving view). A refinement fails when any step
fails.

Parameters of a composite (``--set 'EXPR.PARAM=VALUE'``): ``accept`` and ``refuse_below`` (above), and one string
per member method, named after it (characters other than letters, digits and ``_`` become ``_``), holding that
member's parameters as ``param=value;param=value``, e.g.
``--set 'sift|iterative.sift=ratio=0.8;gate=0.05'``. A member that appears twice gets the same parameters.

Members must answer in the working frame after the shared preprocessing: ``identity`` (no preprocessing, an
original-pixel identity) cannot be a member. Each call records in its diagnostics which member decided, and
for every member that ran its status, its time (measured inside the call), its quality and its own diagnostics;
the harness times the whole call, i.e. the sum of what ran plus the quality checks and warps.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bench import imaging, quality, registry
from bench.deformation import Deformation
from bench.expression import CompositionError, Node, describe, parse
from bench.method import Context, Estimate, ImageView, Method, RegistrationFailed
from bench.timing import CallTimeout, timed

COMPOSE_VERSION = "1"
# Quality (bench.quality.alignment_quality) a fallback alternative's result needs to be accepted. Chosen on
# generated data (docs/compose.md).
DEFAULT_ACCEPT = 1.3
_OWN_PARAMS = ("accept", "refuse_below")


# ----------------------------------------------------------------------------------------------------
# running


@dataclass
class Outcome:
    """What one node of the expression gave: a working-frame matrix (None: failed) and its record."""

    matrix: np.ndarray | None
    record: dict[str, Any]
    reason: str = ""
    quality: float | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    deformation: Deformation | None = None  # a nonrigid answer's field (with ``matrix``, see bench.deformation)
    start: np.ndarray | None = None  # the affine a nonrigid step started from (working frame)
    nonrigid_time_s: float | None = None  # that step's time


def _member_context(method: Method, ctx: Context) -> Context:
    return dataclasses.replace(ctx, device=method.device_for(ctx.device))


class _Runner:
    """Runs a parsed expression with built member instances and the composite's parameters."""

    def __init__(self, members: dict[str, Method], accept: float, refuse_below: float) -> None:
        self.members, self.accept, self.refuse_below = members, accept, refuse_below

    def run(self, node: Node, fixed: ImageView, moving: ImageView, ctx: Context) -> Outcome:
        if node.op == "name":
            return self._leaf(node.name, fixed, moving, ctx)
        if node.op == ">":
            return self._refine(node, fixed, moving, ctx)
        return self._fallback(node, fixed, moving, ctx)

    def _leaf(self, name: str, fixed: ImageView, moving: ImageView, ctx: Context) -> Outcome:
        method = self.members[name]
        mctx = _member_context(method, ctx)
        record: dict[str, Any] = {"member": name}
        try:
            out = timed(lambda: method.estimate(fixed, moving, mctx), device=mctx.device)
        except CallTimeout:
            raise
        except RegistrationFailed as exc:
            record.update(status="failed", reason=str(exc))
            return Outcome(None, record, f"{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a crashing member is a failed alternative, recorded as such
            record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            return Outcome(None, record, f"{name}: {type(exc).__name__}: {exc}")
        record["time_s"] = out.wall_s
        est: Estimate = out.value
        if est.frame != "working":
            reason = f"{name} answered in the {est.frame!r} frame; a member must answer in the working frame"
            record.update(status="error", reason=reason)
            return Outcome(None, record, reason)
        record["status"] = "ok"
        if est.deformation is not None:
            return Outcome(est.matrix, record, diagnostics=dict(est.diagnostics), deformation=est.deformation,
                           start=est.start, nonrigid_time_s=out.wall_s)
        return Outcome(est.matrix, record, diagnostics=dict(est.diagnostics))

    def _refine(self, node: Node, fixed: ImageView, moving: ImageView, ctx: Context) -> Outcome:
        total = np.eye(3)
        current = moving
        steps: list[dict[str, Any]] = []
        diagnostics: dict[str, Any] = {}
        last: Outcome | None = None
        for k, child in enumerate(node.children):
            if k > 0:
                current = imaging.warp_view(moving, total, fixed.shape)
            out = self.run(child, fixed, current, ctx)
            steps.append(out.record)
            if out.matrix is None:
                record = {"member": node.label(), "status": "failed", "steps": steps,
                          "reason": f"step {child.label()} failed"}
                return Outcome(None, record, f"{node.label()}: step {out.reason}")
            if out.deformation is not None and k < len(node.children) - 1:
                reason = (f"{node.label()}: {child.label()} answers with a deformation, so it must be the last "
                          f"step of a refinement")
                return Outcome(None, {"member": node.label(), "status": "error", "steps": steps,
                                      "reason": reason}, reason)
            diagnostics[child.label()] = out.diagnostics
            # a nonrigid last step: x -> (M_step total)^-1 (x + u(x)) on the fixed grid (bench.deformation);
            # it started from ``total`` composed with its own start, when it says one
            start = None if out.deformation is None else (
                total if out.start is None else out.start @ total)
            total = out.matrix @ total
            last = out
        record = {"member": node.label(), "status": "ok", "steps": steps,
                  "time_s": sum(s.get("time_s", 0.0) for s in steps)}
        if last is not None and last.deformation is not None:
            return Outcome(total, record, diagnostics=diagnostics, deformation=last.deformation, start=start,
                           nonrigid_time_s=last.nonrigid_time_s)
        return Outcome(total, record, diagnostics=diagnostics)

    def _fallback(self, node: Node, fixed: ImageView, moving: ImageView, ctx: Context) -> Outcome:
        tried: list[tuple[Outcome, str]] = []
        records: list[dict[str, Any]] = []
        decided: Outcome | None = None
        for child in node.children:
            out = self.run(child, fixed, moving, ctx)
            records.append(out.record)
            if out.matrix is None:
                continue
            q = timed(lambda o=out: quality.answer_quality(fixed, moving, o.matrix, o.deformation))
            out.quality = float(q.value)
            out.record.update(quality=round(out.quality, 4), quality_time_s=q.wall_s,
                              accepted=out.quality >= self.accept)
            tried.append((out, child.label()))
            if out.quality >= self.accept:
                decided = out
                break
        ran = [r["member"] for r in records]
        skipped = [c.label() for c in node.children if c.label() not in ran]
        base = {"member": node.label(), "alternatives": records, "not_run": skipped,
                "time_s": sum(r.get("time_s", 0.0) + r.get("quality_time_s", 0.0) for r in records)}
        if decided is not None:
            label = decided.record["member"]
            record = {**base, "status": "ok", "decided": label, "decision": "accepted", "quality": decided.quality}
            return dataclasses.replace(decided, record=record, diagnostics={"decided": label, **decided.diagnostics})
        if not tried:
            reasons = "; ".join(f"{r['member']}: {r.get('reason', r['status'])}" for r in records)
            return Outcome(None, {**base, "status": "failed", "reason": "every alternative failed"},
                           f"every alternative of {node.label()} failed ({reasons})")
        best, label = max(tried, key=lambda t: t[0].quality)
        if best.quality < self.refuse_below:
            qualities = ", ".join(f"{lab} {o.quality:.3f}" for o, lab in tried)
            reason = (f"no alternative of {node.label()} reached quality {self.refuse_below} "
                      f"(best {qualities}; failed: {[r['member'] for r in records if r['status'] != 'ok']})")
            return Outcome(None, {**base, "status": "failed", "reason": reason}, reason)
        record = {**base, "status": "ok", "decided": label, "decision": "best quality", "quality": best.quality}
        return dataclasses.replace(best, record=record, diagnostics={"decided": label, **best.diagnostics})


# ----------------------------------------------------------------------------------------------------
# the Method


def member_field(name: str) -> str:
    """The parameter name that holds a member's parameters: ``name`` with every character other than a
    letter, digit or ``_`` replaced by ``_`` (``my-method`` -> ``my_method``).

    >>> member_field("sift"), member_field("my-method")
    ('sift', 'my_method')
    """
    out = re.sub(r"\W", "_", name)
    return out if out.isidentifier() else f"m_{out}"


def parse_member_params(text: str, owner: str) -> dict[str, str]:
    """``"ratio=0.8;gate=0.05"`` -> ``{"ratio": "0.8", "gate": "0.05"}`` (empty text: no parameters).

    >>> parse_member_params("ratio=0.8; gate=0.05", "sift")
    {'ratio': '0.8', 'gate': '0.05'}
    """
    out: dict[str, str] = {}
    for item in str(text).split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{owner}: {item.strip()!r} is not PARAM=VALUE (member parameters are "
                             f"'param=value;param=value')")
        out[key.strip()] = value.strip()
    return out


class _FromMembers:
    """A class attribute of a :class:`Composite` computed from its member classes (``member_classes``,
    ``version``, ``devices``, ``requires``): the members are looked up in the registry on the first read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return (owner or type(obj))._resolved()[self.attr]


class Composite(Method):
    """A method made of registered methods by an expression (module docstring, ``docs/compose.md``).

    Subclasses set ``expression`` (and may set ``name`` and ``defaults``: default values of the composite's
    parameters, e.g. ``{"accept": 1.4, "sift": "detect_size=384"}``); the class then gets its ``Params`` from
    the expression, and its members, ``version``, ``devices`` and ``requires`` from the member classes, looked
    up in the registry on first use (:class:`CompositionError` then when a member is unknown or unsuitable).
    :func:`composite_class` makes one for any expression, named by the expression itself.
    """

    expression: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    tree: ClassVar[Node]
    uses_preprocessing = True
    member_classes = _FromMembers()
    version = _FromMembers()
    devices = _FromMembers()
    requires = _FromMembers()
    kind = _FromMembers()  # nonrigid when a member is (its answer may then carry a deformation)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.expression:
            raise TypeError(f"{cls.__qualname__}: a Composite needs an expression")
        derived = sorted(set(vars(cls)) & {"member_classes", "version", "devices", "requires", "Params"})
        if derived:
            raise TypeError(f"{cls.__qualname__}: {', '.join(derived)} of a Composite come from its members")
        cls.tree = parse(cls.expression)
        if not cls.name:
            cls.name = cls.tree.label()
        leaves = cls.tree.leaves()
        if cls.name in leaves:
            raise CompositionError(f"{cls.name!r} cannot be a member of itself")
        fields = [(n, float, dataclasses.field(default=float(cls.defaults.get(n, d))))
                  for n, d in (("accept", DEFAULT_ACCEPT), ("refuse_below", 0.0))]
        seen = dict.fromkeys(_OWN_PARAMS, "the composite's own parameter")
        for leaf in leaves:
            key = member_field(leaf)
            if key in seen:
                raise CompositionError(f"member {leaf!r}: its parameter name {key!r} clashes with {seen[key]}")
            seen[key] = f"member {leaf!r}"
            fields.append((key, str, dataclasses.field(default=str(cls.defaults.get(key, "")))))
        unknown = set(cls.defaults) - {f[0] for f in fields}
        if unknown:
            raise TypeError(f"{cls.__qualname__}.defaults: unknown parameters {sorted(unknown)}")
        cls.Params = dataclasses.make_dataclass("CompositeParams", fields, frozen=True)
        cls.Params.__module__ = cls.__module__
        cls.Params.__doc__ = (f"Parameters of the composite {cls.name!r}: accept, refuse_below, and one "
                              f"'param=value;...' string per member ({', '.join(leaves)}).")
        if not cls.description:
            cls.description = f"Composition {cls.name}: {describe(cls.tree)}."

    @classmethod
    def _resolved(cls) -> dict[str, Any]:
        """The attributes that come from the member classes, looked up in the registry once per class."""
        done = cls.__dict__.get("_from_members")
        if done is not None:
            return done
        if "tree" not in cls.__dict__:
            raise AttributeError(f"{cls.__qualname__} has no expression, hence no members")
        members: dict[str, type[Method]] = {}
        for leaf in cls.tree.leaves():
            try:
                member = registry.get(leaf)
            except registry.UnknownMethodError as exc:
                raise CompositionError(f"in composition {cls.tree.label()!r}: {exc}") from None
            if not member.uses_preprocessing:
                raise CompositionError(
                    f"{leaf!r} cannot be a member of a composition: it does not use the shared preprocessing and "
                    f"answers in original pixels, so its matrix cannot be warped, refined or compared with the "
                    f"others' (use 'preprocessed' for the preprocessing alone)")
            members[leaf] = member
        devices = ["cpu"] + [d for m in members.values() for d in m.devices]
        done = {
            "member_classes": members,
            "version": f"{COMPOSE_VERSION}[{cls.tree.versioned({n: m.version for n, m in members.items()})}]",
            "devices": tuple(dict.fromkeys(devices)),
            "requires": tuple(dict.fromkeys(r for m in members.values() for r in m.requires)),
            "kind": "nonrigid" if any(m.kind == "nonrigid" for m in members.values()) else "affine",
        }
        cls._from_members = done
        return done

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.members: dict[str, Method] = {}
        for leaf, member_cls in self.member_classes.items():
            values = parse_member_params(getattr(self.params, member_field(leaf)), f"{self.name}.{leaf}")
            self.members[leaf] = member_cls(**values)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reasons = [f"{n}: {r}" for n, m in cls.member_classes.items() if (r := m.unavailable_reason())]
        return "; ".join(reasons) or None

    def prepare(self, context: Context) -> None:
        for member in self.members.values():
            member.prepare(_member_context(member, context))

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        runner = _Runner(self.members, self.params.accept, self.params.refuse_below)
        out = runner.run(self.tree, fixed, moving, context)
        if out.matrix is None:
            raise RegistrationFailed(out.reason)
        record = out.record
        diagnostics = {
            "expression": self.tree.label(),
            "decided": record.get("decided", record["member"]),
            "decision": record.get("decision", "only"),
            "members": record.get("alternatives", [record]),
            "not_run": record.get("not_run", []),
            "time_members_s": sum(_leaf_times(record)),
            "member_diagnostics": out.diagnostics,
        }
        if out.deformation is not None:
            diagnostics["nonrigid_time_s"] = out.nonrigid_time_s
        return Estimate(out.matrix, diagnostics, deformation=out.deformation, start=out.start)


def _leaf_times(record: dict[str, Any]) -> list[float]:
    """Every leaf's measured time in a record tree."""
    subs = record.get("alternatives") or record.get("steps")
    if subs is None:
        return [record.get("time_s", 0.0)]
    return [t for r in subs for t in _leaf_times(r)]


_CLASSES: dict[str, type[Composite]] = {}


def composite_class(expression: str) -> type[Composite]:
    """The :class:`Composite` class of an expression (built once per canonical expression and process).

    Raises :class:`CompositionError` (an :class:`bench.registry.UnknownMethodError`) naming the problem.
    """
    tree = parse(expression)
    if tree.op == "name":
        raise CompositionError(f"{expression!r} is a single method, not a composition: name it without parentheses")
    canonical = tree.label()
    if canonical not in _CLASSES:
        cls = type(canonical, (Composite,), {
            "expression": canonical, "__module__": __name__, "__qualname__": f"Composite[{canonical}]"})
        cls._resolved()  # an unknown or unsuitable member is an error now, as the user names the expression
        _CLASSES[canonical] = cls
    return _CLASSES[canonical]


__all__ = ["COMPOSE_VERSION", "Composite", "DEFAULT_ACCEPT", "composite_class"]
