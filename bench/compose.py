"""Composed methods: fallback chains and refinements of registered methods, declared by an expression.

An expression names registered methods joined by two operators (``docs/compose.md``)::

    expr   := chain ( "|" chain )*      fallback: run the alternatives in order, keep the first accepted result
    chain  := term ( ">" term )*        refinement: each step runs on the pair as aligned by the steps before it
    term   := NAME | "(" expr ")"

``>`` binds tighter than ``|``: ``learned>iterative|sift|preprocessed`` is ``(learned>iterative)|sift|preprocessed``.
There are no commas, so an expression is one item of ``--methods`` (``--methods 'sift|iterative,sift'``); quote
it in a shell. Spaces are ignored; the canonical form (the method's name in every row) has none and keeps
parentheses only where precedence needs them (``(sift|surf)>iterative``). ``(a|b)|c`` is ``a|b|c`` and
``(a>b)>c`` is ``a>b>c``.

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
from bench.method import Context, Estimate, ImageView, Method, RegistrationFailed
from bench.timing import CallTimeout, timed

COMPOSE_VERSION = "1"
OPERATORS = "|>()"
# Quality (bench.quality.alignment_quality) a fallback alternative's result needs to be accepted. Chosen on
# generated data (benchmarks/cascade_study.py, docs/compose.md).
DEFAULT_ACCEPT = 1.3
_OWN_PARAMS = ("accept", "refuse_below")


class CompositionError(registry.UnknownMethodError):
    """A composition expression that cannot be built (syntax, unknown member, unsuitable member)."""


# ----------------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class Node:
    """A parsed expression: ``op`` is ``"name"`` (a leaf), ``"|"`` (fallback) or ``">"`` (refinement)."""

    op: str
    name: str = ""
    children: tuple[Node, ...] = ()

    def label(self) -> str:
        """The canonical text: no spaces, parentheses only where precedence needs them."""
        if self.op == "name":
            return self.name
        if self.op == "|":
            return "|".join(c.label() for c in self.children)
        return ">".join(f"({c.label()})" if c.op == "|" else c.label() for c in self.children)

    def leaves(self) -> list[str]:
        """Member method names, in order of first appearance, without repeats."""
        if self.op == "name":
            return [self.name]
        return list(dict.fromkeys(n for c in self.children for n in c.leaves()))

    def versioned(self, versions: dict[str, str]) -> str:
        """:meth:`label` with each leaf as ``name@version``."""
        if self.op == "name":
            return f"{self.name}@{versions[self.name]}"
        if self.op == "|":
            return "|".join(c.versioned(versions) for c in self.children)
        return ">".join(f"({c.versioned(versions)})" if c.op == "|" else c.versioned(versions) for c in self.children)


_TOKEN = re.compile(r"\s*(?:([|>()])|([^\s|>()]+))")


def is_expression(text: str) -> bool:
    """True when ``text`` uses a composition operator (``|``, ``>``, parentheses)."""
    return any(ch in text for ch in OPERATORS)


def parse(text: str) -> Node:
    """Parse an expression into a :class:`Node` tree (precedence: ``>`` before ``|``).

    >>> parse("learned>iterative|sift|preprocessed").label()
    'learned>iterative|sift|preprocessed'
    >>> [c.label() for c in parse("learned>iterative|sift").children]
    ['learned>iterative', 'sift']
    >>> parse("(sift | surf) > iterative").label()
    '(sift|surf)>iterative'
    >>> parse("(a|b)|c").label(), parse("a>(b>c)").label()
    ('a|b|c', 'a>b>c')
    """
    tokens: list[tuple[str, int]] = []
    pos = 0
    text = str(text)
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        tokens.append((m.group(1) or m.group(2), m.start(1) if m.group(1) else m.start(2)))
        pos = m.end()
    if not tokens:
        raise CompositionError(f"empty composition expression {text!r}")
    i = 0

    def where(k: int) -> str:
        return f"at position {tokens[k][1]}" if k < len(tokens) else "at the end"

    def fail(k: int, what: str) -> CompositionError:
        return CompositionError(f"bad composition expression {text!r}: {what} {where(k)} "
                                f"(syntax: NAME, A|B fallback, A>B refinement, parentheses; see docs/compose.md)")

    def expr() -> Node:
        nonlocal i
        parts = [chain()]
        while i < len(tokens) and tokens[i][0] == "|":
            i += 1
            parts.append(chain())
        return _flat("|", parts)

    def chain() -> Node:
        nonlocal i
        parts = [term()]
        while i < len(tokens) and tokens[i][0] == ">":
            i += 1
            parts.append(term())
        return _flat(">", parts)

    def term() -> Node:
        nonlocal i
        if i >= len(tokens):
            raise fail(i, "a method name is missing")
        tok = tokens[i][0]
        if tok == "(":
            i += 1
            inner = expr()
            if i >= len(tokens) or tokens[i][0] != ")":
                raise fail(i, "')' expected")
            i += 1
            return inner
        if tok in "|>)":
            raise fail(i, f"a method name is missing before {tok!r}")
        if "," in tok:
            raise fail(i, "commas separate methods in --methods and cannot appear inside an expression")
        i += 1
        return Node("name", tok)

    tree = expr()
    if i < len(tokens):
        raise fail(i, f"unexpected {tokens[i][0]!r}")
    return tree


def _flat(op: str, parts: list[Node]) -> Node:
    if len(parts) == 1:
        return parts[0]
    children: list[Node] = []
    for p in parts:
        children.extend(p.children if p.op == op else (p,))
    return Node(op, children=tuple(children))


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
        return Outcome(est.matrix, record, diagnostics=dict(est.diagnostics))

    def _refine(self, node: Node, fixed: ImageView, moving: ImageView, ctx: Context) -> Outcome:
        total = np.eye(3)
        current = moving
        steps: list[dict[str, Any]] = []
        diagnostics: dict[str, Any] = {}
        for k, child in enumerate(node.children):
            if k > 0:
                current = imaging.warp_view(moving, total, fixed.shape)
            out = self.run(child, fixed, current, ctx)
            steps.append(out.record)
            if out.matrix is None:
                record = {"member": node.label(), "status": "failed", "steps": steps,
                          "reason": f"step {child.label()} failed"}
                return Outcome(None, record, f"{node.label()}: step {out.reason}")
            diagnostics[child.label()] = out.diagnostics
            total = out.matrix @ total
        record = {"member": node.label(), "status": "ok", "steps": steps,
                  "time_s": sum(s.get("time_s", 0.0) for s in steps)}
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
            q = timed(lambda m=out.matrix: quality.alignment_quality(fixed, moving, m))
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
            return Outcome(decided.matrix, record, quality=decided.quality,
                           diagnostics={"decided": label, **decided.diagnostics})
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
        return Outcome(best.matrix, record, quality=best.quality, diagnostics={"decided": label, **best.diagnostics})


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


class Composite(Method):
    """A method made of registered methods by an expression (module docstring, ``docs/compose.md``).

    Subclasses set ``expression`` (and may set ``name`` and ``defaults``: default values of the composite's
    parameters, e.g. ``{"accept": 1.4, "sift": "detect_size=384"}``); the class then gets its members,
    ``Params``, ``version``, ``devices`` and ``requires`` from them. :func:`composite_class` makes one for any
    expression, named by the expression itself.
    """

    expression: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    tree: ClassVar[Node]
    member_classes: ClassVar[dict[str, type[Method]]] = {}
    uses_preprocessing = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.expression:
            raise TypeError(f"{cls.__qualname__}: a Composite needs an expression")
        cls.tree = parse(cls.expression)
        if not cls.name:
            cls.name = cls.tree.label()
        members: dict[str, type[Method]] = {}
        for leaf in cls.tree.leaves():
            if leaf == cls.name:
                raise CompositionError(f"{cls.name!r} cannot be a member of itself")
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
        cls.member_classes = members
        fields = [(n, float, dataclasses.field(default=float(cls.defaults.get(n, d))))
                  for n, d in (("accept", DEFAULT_ACCEPT), ("refuse_below", 0.0))]
        seen = dict.fromkeys(_OWN_PARAMS, "the composite's own parameter")
        for leaf in members:
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
                              f"'param=value;...' string per member ({', '.join(members)}).")
        cls.version = f"{COMPOSE_VERSION}[{cls.tree.versioned({n: m.version for n, m in members.items()})}]"
        devices = ["cpu"] + [d for m in members.values() for d in m.devices]
        cls.devices = tuple(dict.fromkeys(devices))
        cls.requires = tuple(dict.fromkeys(r for m in members.values() for r in m.requires))
        if not cls.description:
            cls.description = f"Composition {cls.name}: {describe(cls.tree)}."

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
        return Estimate(out.matrix, diagnostics)


def _leaf_times(record: dict[str, Any]) -> list[float]:
    """Every leaf's measured time in a record tree."""
    subs = record.get("alternatives") or record.get("steps")
    if subs is None:
        return [record.get("time_s", 0.0)]
    return [t for r in subs for t in _leaf_times(r)]


def describe(node: Node) -> str:
    """A short English description of an expression."""
    if node.op == "name":
        return node.name
    if node.op == "|":
        return "first accepted of " + ", ".join(f"({describe(c)})" if c.op != "name" else c.name
                                                for c in node.children)
    return " refined by ".join(f"({describe(c)})" if c.op != "name" else c.name for c in node.children)


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
        _CLASSES[canonical] = type(canonical, (Composite,), {
            "expression": canonical, "__module__": __name__, "__qualname__": f"Composite[{canonical}]"})
    return _CLASSES[canonical]


__all__ = ["Composite", "CompositionError", "DEFAULT_ACCEPT", "composite_class", "is_expression", "parse"]
