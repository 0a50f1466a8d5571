"""What the preprocessing stage's results depend on besides its inputs and parameters: its code and libraries.

``STAGE_VERSION`` is bumped by hand when the stage's output changes, and a hand can forget (a change to the
flip test's texture MI, or to image loading outside this package, changed prepared pairs without a bump). A
cache keyed by it could then serve a pair prepared by older code: a method's row would depend on what ran on
the machine before, not on the code that ran now. :func:`stage_fingerprint` removes that hidden state: it is
the SHA-256 of

- the source of every module of this package and of every ``bench`` module they import, directly or through
  each other (found by reading their import statements, so it does not depend on what a process imported
  before; ``bench/__init__.py``, which only re-exports, is not followed), and
- the versions of the libraries that compute the stage (numpy, OpenCV, and the image readers),

so any edit to that code, or another library version, misses the cache and recomputes. It is computed once
per process (about a millisecond per module).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "bench"
STAGE = "bench.preprocess"
# the distributions whose code computes a prepared pair (image decoding, resampling, masks, searches)
LIBRARIES = ("numpy", "opencv-contrib-python-headless", "opencv-contrib-python", "opencv-python-headless",
             "opencv-python", "tifffile", "imagecodecs", "pillow")

_ROOT = Path(__file__).resolve().parents[1]  # the bench package folder


def _module_file(name: str) -> Path | None:
    """The source file of a ``bench`` module (``bench.a.b`` -> ``bench/a/b.py`` or ``bench/a/b/__init__.py``)."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    base = _ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, name: str) -> set[str]:
    """The ``bench`` modules a module's import statements name (``from bench import x`` counts ``bench.x`` when
    that is a module; relative imports resolved against ``name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in out if _module_file(m) is not None}


def stage_modules() -> list[str]:
    """The ``bench`` modules the preprocessing stage runs, sorted: this package's modules and what they import
    from ``bench``, transitively."""
    todo = [f"{STAGE}.{p.stem}" if p.name != "__init__.py" else STAGE
            for p in sorted((_ROOT / "preprocess").glob("*.py"))]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is not None:
            todo.extend(_imported(path, name) - seen)
    return sorted(seen)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (absent ones left out)."""
    from bench.provenance import package_versions

    return package_versions(LIBRARIES)


@functools.cache
def stage_fingerprint() -> str:
    """SHA-256 of the stage's code (:func:`stage_modules`) and libraries (:func:`library_versions`)."""
    h = hashlib.sha256()
    for name in stage_modules():
        path = _module_file(name)
        assert path is not None
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist, version in sorted(library_versions().items()):
        h.update(f"{dist}=={version}\0".encode())
    return h.hexdigest()
