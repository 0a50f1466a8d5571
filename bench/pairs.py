"""Registration pairs, the pair table that lists them, and landmark files: what the harness reads and writes.

A :class:`Pair` is one task (source image registered onto target image, with optional landmarks). The pair
table is the harness's one input format, adopted from ANHIR (``dataset.csv`` / ``dataset_medium.csv``): an
unnamed index column, ``Source image``, ``Source landmarks``, ``Target image``, ``Target landmarks``,
``Image diagonal [pixels]``, ``Image size [pixels]`` (``"(h, w)"`` of the target) and ``status``. Paths are
relative to the table's folder or to any extra data root (images and landmarks are often unpacked into
separate roots); a pair's tissue is named by the folder layout ``<tissue>_<n>/scale-<p>pc/<image>``.
Landmark files are ImageJ CSVs: header ``,X,Y``, a 1-based index column, pixels, origin top-left.

Dataset adapters (:mod:`bench.datasets`) write tables and landmarks in this format; the plan, the workers,
the store and the report read them through this module.

Problems with one row never stop the others: they are kept on the :class:`Pair` as ``problem`` and end as
that pair's ``failed`` row with a one-line message naming the file and the fault.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COL_SOURCE_IMAGE = "Source image"
COL_SOURCE_LANDMARKS = "Source landmarks"
COL_TARGET_IMAGE = "Target image"
COL_TARGET_LANDMARKS = "Target landmarks"
COL_DIAGONAL = "Image diagonal [pixels]"
COL_SIZE = "Image size [pixels]"
COL_STATUS = "status"
TABLE_HEADER = ("", COL_SOURCE_IMAGE, COL_SOURCE_LANDMARKS, COL_TARGET_IMAGE, COL_TARGET_LANDMARKS,
                COL_DIAGONAL, COL_SIZE, COL_STATUS)  # the pair table's columns as written, index first
REQUIRED_COLUMNS = (COL_SOURCE_IMAGE, COL_TARGET_IMAGE)
KNOWN_COLUMNS = (
    COL_SOURCE_IMAGE,
    COL_SOURCE_LANDMARKS,
    COL_TARGET_IMAGE,
    COL_TARGET_LANDMARKS,
    COL_DIAGONAL,
    COL_SIZE,
    COL_STATUS,
)


class DatasetError(ValueError):
    """The table as a whole cannot be used (unreadable, missing required columns)."""


def one_line(text: object) -> str:
    """``text`` on one line, each run of whitespace one space: the one form of a pair id (:func:`load_table`
    reads ids through it) and how the results store writes a text cell (:mod:`bench.record`), so the ids a run
    plans are the ids it stores, and a resume recognises them.

    >>> one_line(" a  b\\nc\\t")
    'a b c'
    """
    return " ".join(str(text).split())


class LandmarkError(ValueError):
    """A landmark file is unreadable or malformed. ``reason``: the fault without the file's name (and, like
    the message, never the file's content); ``malformed``: the file was read but is not a landmark table."""

    def __init__(self, message: str, reason: str = "", malformed: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.malformed = malformed


def _malformed(path: Path, reason: str) -> LandmarkError:
    return LandmarkError(f"{path}: {reason}", reason, malformed=True)


@dataclass(frozen=True)
class Pair:
    """One registration task: the source (moving) image is registered onto the target (fixed) one."""

    pair_id: str
    tissue: str
    source_image: Path
    target_image: Path
    source_landmarks: Path | None = None
    target_landmarks: Path | None = None
    diagonal: float | None = None  # of the target image, from the table
    target_size: tuple[int, int] | None = None  # (h, w) of the target, from the table
    status: str = ""  # training / evaluation
    problem: str | None = None  # a row-level fault found while reading the table

    @property
    def scorable(self) -> bool:
        return self.source_landmarks is not None and self.target_landmarks is not None


def tissue_from_path(path: str | Path) -> str:
    """The tissue name from an ANHIR path ``<tissue>_<n>/scale-<p>pc/<stain>.jpg``.

    >>> tissue_from_path("lung-lesion_3/scale-5pc/29-041-Izd2-w35-He-les3.jpg")
    'lung-lesion'
    >>> tissue_from_path("mammary-gland_2/scale-25pc/s1.jpg")
    'mammary-gland'
    >>> tissue_from_path("foo.jpg")
    'unknown'
    """
    parts = Path(str(path)).parts
    for part in parts[:-1]:
        if part.startswith("scale-"):
            continue
        return re.sub(r"_\d+$", "", part)
    return "unknown"


def parse_size(text: str) -> tuple[int, int]:
    """Parse ANHIR's ``"(h, w)"`` size string.

    >>> parse_size("(787, 1164)")
    (787, 1164)
    >>> parse_size("787x1164")
    Traceback (most recent call last):
    ...
    ValueError: bad image size '787x1164': expected "(height, width)"
    """
    m = re.fullmatch(r"\s*[\(\[]\s*(\d+)\s*,\s*(\d+)\s*[\)\]]\s*", str(text))
    if not m:
        raise ValueError(f'bad image size {text!r}: expected "(height, width)"')
    h, w = int(m.group(1)), int(m.group(2))
    if h <= 0 or w <= 0:
        raise ValueError(f"bad image size {text!r}: sides must be positive")
    return h, w


def read_landmarks(path: str | Path, *, allow_negative: bool = False) -> np.ndarray:
    """Read an ANHIR landmark CSV (header ``,X,Y``) as an ``(N, 2)`` float64 array of ``(x, y)``.

    Raises :class:`LandmarkError` with a one-line message naming the file and the fault. Annotated
    landmarks lie inside their image, so negative coordinates are an error unless ``allow_negative``
    (warped landmarks may legitimately fall outside the target after a poor registration).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise LandmarkError(f"{path}: landmark file not found", "landmark file not found") from None
    except UnicodeDecodeError:
        raise _malformed(path, "not UTF-8 text") from None
    except csv.Error as exc:
        raise _malformed(path, f"not CSV ({exc})") from None
    except OSError as exc:
        reason = f"cannot read landmark file ({exc.strerror or type(exc).__name__})"
        raise LandmarkError(f"{path}: {reason}", reason) from None
    # messages name the fault, never the file's content: the file may be anything (an imported table can name
    # any path), and a message lands in results.csv
    if not rows:
        raise _malformed(path, "landmark file is empty")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2 or header[-2:] != ["X", "Y"]:
        raise _malformed(path, "bad landmark header: expected ',X,Y' on the first line")
    pts = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            x, y = float(row[-2]), float(row[-1])
        except (ValueError, IndexError):
            raise _malformed(path, f"line {line_no}: cannot read coordinates (not two numbers in the last "
                                   "two columns)") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise _malformed(path, f"line {line_no}: non-finite coordinate ({x}, {y})")
        if (x < 0 or y < 0) and not allow_negative:
            raise _malformed(path, f"line {line_no}: negative coordinate ({x}, {y})")
        pts.append((x, y))
    if not pts:
        raise _malformed(path, "no landmarks in file")
    return np.asarray(pts, dtype=np.float64)


def write_landmarks(path: str | Path, points: np.ndarray) -> None:
    """Write ``(N, 2)`` points as an ANHIR landmark CSV (``,X,Y`` with a 1-based index)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "X", "Y"])
        for i, (x, y) in enumerate(pts, start=1):
            w.writerow([i, repr(float(x)), repr(float(y))])


def _resolve(rel: str, roots: list[Path]) -> Path:
    """First existing ``root/rel`` (or ``rel`` itself if absolute); else the first candidate."""
    p = Path(rel)
    if p.is_absolute():
        return p
    candidates = [r / p for r in roots]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_table(table: str | Path, data_roots: list[str | Path] | tuple = ()) -> list[Pair]:
    """Read an ANHIR pair table into :class:`Pair` objects.

    Paths resolve against the table's folder, then each of ``data_roots`` (first existing wins).
    Raises :class:`DatasetError` when the table itself is unusable; row-level faults go to
    ``Pair.problem`` instead.
    """
    table = Path(table)
    roots = [table.parent.resolve(), *(Path(r).resolve() for r in data_roots)]
    try:
        with table.open(newline="", encoding="utf-8-sig") as fh:  # a BOM is not part of the first cell
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DatasetError(f"{table}: pair table not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{table}: cannot read pair table ({exc})") from None
    if not rows:
        raise DatasetError(f"{table}: pair table is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{table}: missing column(s) {', '.join(repr(m) for m in missing)}; found {header}"
        )
    has_index = header[0] == "" or header[0].lower() in ("index", "unnamed: 0")
    col = {name: i for i, name in enumerate(header)}
    pairs: list[Pair] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        row = row + [""] * (len(header) - len(row))
        # the id as the results store writes it (one line, whitespace runs as one space): planned = stored
        pair_id = one_line(row[0]) if has_index else str(line_no - 2)
        if pair_id in seen:
            same = "" if pair_id == row[0].strip() else " (ids are compared with each whitespace run as one space)"
            raise DatasetError(f"{table}: line {line_no}: duplicate pair index {pair_id!r}{same}")
        seen.add(pair_id)

        def cell(name: str, row=row) -> str:
            return row[col[name]].strip() if name in col else ""

        problems = []
        src, tgt = cell(COL_SOURCE_IMAGE), cell(COL_TARGET_IMAGE)
        if not src or not tgt:
            problems.append(f"{table}: line {line_no}: empty image path")
        src_lnd, tgt_lnd = cell(COL_SOURCE_LANDMARKS), cell(COL_TARGET_LANDMARKS)
        size = None
        if cell(COL_SIZE):
            try:
                size = parse_size(cell(COL_SIZE))
            except ValueError as exc:
                problems.append(f"{table}: line {line_no}: {exc}")
        diagonal = None
        if cell(COL_DIAGONAL):
            try:
                diagonal = float(cell(COL_DIAGONAL))
                if not (math.isfinite(diagonal) and diagonal > 0):
                    raise ValueError
            except ValueError:
                problems.append(f"{table}: line {line_no}: bad image diagonal {cell(COL_DIAGONAL)!r}")
                diagonal = None
        if diagonal is None and size is not None:
            diagonal = math.hypot(*size)
        pairs.append(
            Pair(
                pair_id=pair_id,
                tissue=tissue_from_path(tgt or src),
                source_image=_resolve(src, roots),
                target_image=_resolve(tgt, roots),
                source_landmarks=_resolve(src_lnd, roots) if src_lnd else None,
                target_landmarks=_resolve(tgt_lnd, roots) if tgt_lnd else None,
                diagonal=diagonal,
                target_size=size,
                status=cell(COL_STATUS),
                problem="; ".join(problems) or None,
            )
        )
    if not pairs:
        raise DatasetError(f"{table}: pair table has no rows")
    return pairs
