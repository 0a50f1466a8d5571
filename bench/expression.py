"""Composition expressions: the syntax of composed method names, parsed into a tree.

An expression names methods joined by two operators (``docs/compose.md``; what they do: :mod:`bench.compose`)::

    expr   := chain ( "|" chain )*      fallback: run the alternatives in order, keep the first accepted result
    chain  := term ( ">" term )*        refinement: each step runs on the pair as aligned by the steps before it
    term   := NAME | "(" expr ")"

``>`` binds tighter than ``|``: ``learned>iterative|sift|preprocessed`` is ``(learned>iterative)|sift|preprocessed``.
There are no commas, so an expression is one item of ``--methods`` (``--methods 'sift|iterative,sift'``); quote
it in a shell. Spaces are ignored; the canonical form (the method's name in every row) has none and keeps
parentheses only where precedence needs them (``(sift|surf)>iterative``). ``(a|b)|c`` is ``a|b|c`` and
``(a>b)>c`` is ``a>b>c``.

This module only reads text: it looks no name up (the registry does, :mod:`bench.factory` decides which).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.registry import UnknownMethodError

OPERATORS = "|>()"
MAX_DEPTH = 32  # parentheses nested deeper than this are refused (the parser recurses once per level)


class CompositionError(UnknownMethodError):
    """A composition expression that cannot be built (syntax, unknown member, unsuitable member)."""


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
    """True when ``text`` uses a composition operator (``|``, ``>``, parentheses): the one syntax test that
    tells a composed name from a method name (a registered name never holds one of them).

    >>> is_expression("sift|iterative"), is_expression("(sift)"), is_expression("sift")
    (True, True, False)
    """
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
    i = depth = 0

    def where(k: int) -> str:
        return f"at position {tokens[k][1]}" if k < len(tokens) else "at the end"

    shown = text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"

    def fail(k: int, what: str) -> CompositionError:
        return CompositionError(f"bad composition expression {shown!r}: {what} {where(k)} "
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
        nonlocal i, depth
        if i >= len(tokens):
            raise fail(i, "a method name is missing")
        tok = tokens[i][0]
        if tok == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise fail(i, f"parentheses nested deeper than {MAX_DEPTH}")
            i += 1
            inner = expr()
            if i >= len(tokens) or tokens[i][0] != ")":
                raise fail(i, "')' expected")
            i += 1
            depth -= 1
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


def describe(node: Node) -> str:
    """A short English description of an expression.

    >>> describe(parse("sift|learned>iterative"))
    'first accepted of sift, (learned refined by iterative)'
    """
    if node.op == "name":
        return node.name
    if node.op == "|":
        return "first accepted of " + ", ".join(f"({describe(c)})" if c.op != "name" else c.name
                                                for c in node.children)
    return " refined by ".join(f"({describe(c)})" if c.op != "name" else c.name for c in node.children)


__all__ = ["CompositionError", "Node", "OPERATORS", "describe", "is_expression", "parse"]
