"""The results store of one run folder: ``results.csv``, ``warped-landmarks/`` and ``run.json``.

Rows are appended one (pair, method) at a time and flushed to disk, so killing a run loses at most the
calls in flight; the same command resumes from the (pair, method) keys already stored.

**One writer per folder.** Whatever writes a run folder (``bench run``, ``bench import-anhir``) holds its
lock while it writes::

    store = ResultStore(folder)
    with store.lock("import-anhir"):      # raises FolderInUse naming the other process, at once
        store.append(rows)
        store.write_warped(method, pair_id, points)

The lock is an advisory ``flock`` on ``<folder>/.lock`` (the kernel drops it when its process ends, so a
lock left by a killed run is recovered with no manual step); the file also names the holder (pid, command)
for the refusal message. Taking the lock also repairs a half-written last line left by a killed writer.

**Rows are checked when read**, by the record's one reader (:func:`bench.record.read_rows`, which the report
uses too): a line that is not a result row (another tool's crash, a hand edit), or a second row for one
(pair, method), raises :class:`StoreError` naming its line. Rows are written as :class:`bench.record.Row`
values, each through :meth:`bench.record.Row.cells`.

**File names**: pair ids and method names become file names through :func:`safe_name` (unchanged when
they are plain; percent-encoded otherwise), so nothing is written outside the folder and two names never
share a file; :func:`warped_path` is the one place that maps (folder, method, pair id) to a file.

>>> safe_name("12"), safe_name("../../x"), safe_name("a/b"), safe_name("sift|iterative")
('12', '%2E.%2F..%2Fx', 'a%2Fb', 'sift%7Citerative')
>>> warped_path("run", "sift", "a/b").as_posix()
'run/warped-landmarks/sift/a%2Fb.csv'
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bench import record
from bench.pairs import write_landmarks
from bench.record import COLUMNS, MANIFEST, RESULTS, WARPED, RecordError, Row, jsonable

__all__ = ["FolderInUse", "ResultStore", "StoreError", "bounded", "safe_name", "warped_path"]

LOCK = ".lock"
_MAX_NAME = 150  # bytes of an encoded name before it is shortened with a hash


class StoreError(RecordError):
    """The folder cannot be used as a run folder (junk rows, foreign header, unreadable manifest)."""


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock."""


def safe_name(name: str) -> str:
    """A file name for ``name`` that stays in its folder and is unique: plain names unchanged.

    Letters, digits, ``-``, ``_`` and ``.`` are kept (a leading dot is encoded); anything else is
    percent-encoded, so the mapping is one-to-one. Very long names keep a prefix and a hash (``~`` marks
    them; it never appears otherwise).

    >>> safe_name(".hidden"), safe_name(""), safe_name("x" * 200)[-17:]
    ('%2Ehidden', '~', '~aa20c23e32018340')
    """
    text = quote(str(name), safe="-_.").replace("~", "%7E")
    if text.startswith("."):  # never ".", ".." or a hidden file
        text = "%2E" + text[1:]
    if not text:
        return "~"
    return bounded(text, name)


def bounded(text: str, name: str, limit: int = _MAX_NAME) -> str:
    """``text`` (a file name made from ``name``) within ``limit`` characters: a longer one keeps a prefix and
    ``~`` plus a hash of ``name``, so names that share a prefix still get their own files. Every file name made
    from a method name or a pair id is bounded so (a 300-member chain's name is thousands of characters).

    >>> bounded("sift", "sift"), len(bounded("a" * 400, "a" * 400)), bounded("a" * 400, "a" * 400)[-17:]
    ('sift', 150, '~abd5e54be3f59d8e')
    """
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(str(name).encode()).hexdigest()[:16]
    return f"{text[:limit - 17]}~{digest}"


def warped_path(folder: str | Path, method: str, pair_id: str) -> Path:
    """The warped-landmarks file of (method, pair) in a run folder."""
    return Path(folder) / WARPED / safe_name(method) / f"{safe_name(pair_id)}.csv"


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"process {info.get('pid', '?')} ({info.get('purpose', '?')}: {info.get('command', '?')})"


class ResultStore:
    """Append-only access to one run folder (write only while holding :meth:`lock`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.results = self.folder / RESULTS
        self.manifest = self.folder / MANIFEST
        self._lock_fd: int | None = None

    # -- the writer's lock -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, purpose: str = "bench run") -> Iterator[ResultStore]:
        """Hold the folder's lock for the block; :class:`FolderInUse` at once when another process has it."""
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"{self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by {_holder(path)}: wait for it to end, "
                              "or use another --out") from None
        try:
            info = {"pid": os.getpid(), "purpose": purpose, "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self._lock_fd = fd
            self._repair()
            yield self
        finally:
            self._lock_fd = None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"{self.folder}: write only while holding ResultStore.lock()")

    def _repair(self) -> None:
        """Cut a half-written last line left by a killed run; refuse a foreign header."""
        if not self.results.exists():
            return
        data = self.results.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.results.open("r+b") as fh:
                fh.truncate(keep)
        if self.results.stat().st_size > 0:
            with self.results.open(newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
            try:
                record.check_header(header, self.results)
            except RecordError as exc:
                raise StoreError(f"{exc} (or use a new --out folder)") from None

    # -- reading ---------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, str]]:
        """Every stored row as written (strings), checked by :func:`bench.record.read_rows`: junk lines and
        repeated (pair, method) keys raise :class:`StoreError`."""
        try:
            return record.read_rows(self.results)
        except RecordError as exc:
            raise StoreError(f"{exc} (or use a new --out folder)") from None

    def read_manifest(self) -> dict[str, Any] | None:
        """The folder's manifest (None when it has none), checked by :func:`bench.record.read_manifest`."""
        try:
            return record.read_manifest(self.manifest)
        except RecordError as exc:
            raise StoreError(f"{exc} (use a new --out folder)") from None

    # -- writing (under the lock) ----------------------------------------------------------------
    def append(self, rows: Iterable[Row]) -> None:
        self._require_lock()
        rows = list(rows)
        if not rows:
            return
        new = not self.results.exists() or self.results.stat().st_size == 0
        with self.results.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(COLUMNS)
            for row in rows:
                w.writerow(row.cells())
            fh.flush()
            os.fsync(fh.fileno())

    def drop(self, keys: set[tuple[str, str]]) -> int:
        """Remove the rows of ``keys`` (to run them again); the file is replaced atomically. Returns how many."""
        self._require_lock()
        rows = self.rows()
        keep = [r for r in rows if (r["pair_id"], r["method"]) not in keys]
        if len(keep) == len(rows):
            return 0
        tmp = self.results.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for r in keep:
                w.writerow([r[c] for c in COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.results)
        return len(rows) - len(keep)

    def write_warped(self, method: str, pair_id: str, points: np.ndarray) -> Path:
        self._require_lock()
        path = warped_path(self.folder, method, pair_id)
        write_landmarks(path, points)
        return path

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._require_lock()
        tmp = self.manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(manifest), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.manifest)
