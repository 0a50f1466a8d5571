"""The shape of the package: no import cycle between its modules, and commands that need no torch import none.

The import graph is read from the source (``ast``), not by importing: every ``import`` and ``from ... import``
that names a module of the package counts, at module level and inside functions (a lazy import hides a cycle
from the interpreter, not from a reader). ``bench.methods`` and ``bench.datasets`` are read from the folders
``pyproject.toml`` installs them from.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package in the checkout at ``root``: installed name -> source file."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"bench": root / "bench"}
    folders.update({name: root / folder for name, folder in setup.get("package-dir", {}).items()})
    modules: dict[str, Path] = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file; ``from bench import registry`` is an
    import of ``bench.registry``, ``from bench import register`` one of ``bench``)."""
    modules = package_modules(root)

    def known(name: str) -> str | None:  # the module itself, else the package that holds the name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(filter(None, (known(alias.name) for alias in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    edges.update(filter(None, [known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules
                                               else known(base)]))
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle (``a -> b -> ... -> a``) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # a shortest way back to the group's first module, through the group only
        start = min(group)
        paths = {start: [start]}
        todo = [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    out.append([*paths[v], start])
                    todo = []
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    todo.append(w)
    return sorted(out)


def test_the_walk_sees_the_whole_package():
    graph = import_graph()
    assert {"bench", "bench.registry", "bench.compose", "bench.methods.cascade", "bench.datasets",
            "bench.report", "bench.learning.train"} <= set(graph)
    assert "bench.method" in graph["bench.registry"]
    assert "bench.registry" in graph["bench.plan"]  # `from bench import ..., registry`: the module
    assert "bench.methods" in graph["bench.registry"]  # an import inside a function counts


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


# ----------------------------------------------------------------------------------------------------
# commands that need no torch import none

_PROBE = """
import runpy, sys
sys.argv = ["bench", *sys.argv[1:]]
try:
    runpy.run_module("bench", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("exit", code, "torch", "torch" in sys.modules)
"""


def _command(*argv: str, cwd: Path) -> tuple[int, bool, str]:
    """Run ``python -m bench ARGV`` in a fresh interpreter: its exit status and whether torch got imported."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("exit "), f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    _, code, _, torch = last.split()
    return (0 if code == "None" else int(code)), torch == "True", proc.stdout + proc.stderr


def test_commands_without_torch_import_none(tmp_path, tiny_table):
    run, exported = tmp_path / "run", tmp_path / "export"
    code, _, out = _command("run", "--dataset", str(tiny_table), "--methods", "identity", "--limit", "1",
                            "--device", "cpu", "--no-cache", "--out", str(run), cwd=tmp_path)
    assert code == 0, out
    for argv in (["--help"], ["list"], ["list", "cascade"], ["list", "sift|iterative"], ["check", "identity"],
                 ["report", "--run", str(run), "--out", str(tmp_path / "report")],
                 ["export-anhir", "--run", str(run), "--method", "identity", "--out", str(exported)],
                 ["import-anhir", str(exported / "registration-results.csv"), "--run", str(run),
                  "--method", "outside"],
                 ["train", "--help"]):
        code, torch, out = _command(*argv, cwd=tmp_path)
        assert code == 0, f"{argv}: {out[-3000:]}"
        assert not torch, f"`python -m bench {' '.join(argv)}` imported torch"


def test_the_probe_sees_torch(tmp_path):
    """The positive control: a command that loads a module importing torch is seen doing so (so the test above
    can fail). ``check`` runs its checks in a child process, so the plugin is what the parent imports here."""
    pytest.importorskip("torch")
    (tmp_path / "torchy.py").write_text("import torch  # noqa: F401\n")
    code, torch, out = _command("list", "--plugin", "torchy.py", cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert torch
