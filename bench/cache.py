"""On-disk cache of prepared pairs, so a second run (or another method) skips the preprocessing.

A pair's key is the SHA-256 of: both image files' *content*, the stage's parameters, ``STAGE_VERSION``,
the stage's code and library versions (:func:`bench.preprocess.fingerprint.stage_fingerprint`) and the
``full`` flag. A changed file, parameter, stage version, line of the stage's code or library version
therefore misses and recomputes (a forgotten ``STAGE_VERSION`` bump cannot serve a pair prepared by older
code); stale entries are never read, only left behind until ``clear()``.

Each entry is two files under ``<folder>/<key[:2]>/``: ``<key>.npz`` (the colour images, masks and the
pre-transform; on a close flip call also the other mirror state's moving view and pre-transform, ``alt_*``,
restored as :attr:`bench.preprocess.PreparedPair.alternative`) and ``<key>.json`` (scales, shapes, diagnostics and what the key was made of), each
written to a temporary file and renamed into place (atomic on one file system), the json last: an entry
without its json is invisible. The float images are not stored: they are recomputed from the stored
colour images and masks by the same code that made them (:func:`bench.preprocess.view_from`), which
keeps an entry at about 3 bytes per working pixel per image.

``folder`` defaults to ``preprocess/`` under the project's one cache folder
(:func:`bench.cachedir.cache_root`: ``$HISTREG_BENCH_CACHE``, else ``$XDG_CACHE_HOME/histreg-bench``,
else ``~/.cache/histreg-bench``); the embedded sample lives beside it. ``python -m bench cache clear``
empties both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.cachedir import cache_root
from bench.preprocess import (
    STAGE_VERSION,
    PreparedPair,
    PreprocessParams,
    params_dict,
    prepare_pair,
    stage_fingerprint,
    view_from,
)

_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256 of the content, per process


def default_folder() -> Path:
    """The preprocessing cache's folder when none is given: ``<cache_root()>/preprocess``."""
    return cache_root() / "preprocess"


def folder_size(folder: str | Path) -> tuple[int, int]:
    """``(bytes, files)`` under a folder (0, 0 when absent)."""
    total = files = 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            total += path.stat().st_size
            files += 1
    return total, files


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (memoised per process while size and mtime stay the same)."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def cache_key(source: str | Path, target: str | Path, params: PreprocessParams, full: bool) -> str:
    """The entry key: SHA-256 over both files' content, the parameters, the stage version, the stage's code and
    libraries, and ``full``."""
    record = {
        "source": content_digest(source),
        "target": content_digest(target),
        "params": params_dict(params),
        "stage_version": STAGE_VERSION,
        "stage_code": stage_fingerprint(),
        "full": bool(full),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file object)`` to a temporary file beside ``path``, then rename it there."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PreprocessCache:
    """Prepared pairs on disk, keyed by content and parameters.

    Parameters
    ----------
    folder : where entries live (None: :func:`default_folder`)
    enabled : False: ``get`` always misses and ``put`` does nothing (``get_or_prepare`` just prepares)
    """

    def __init__(self, folder: str | Path | None = None, enabled: bool = True) -> None:
        self.folder = Path(folder) if folder else default_folder()
        self.enabled = enabled

    def _paths(self, key: str) -> tuple[Path, Path]:
        sub = self.folder / key[:2]
        return sub / f"{key}.npz", sub / f"{key}.json"

    def get(self, source, target, params: PreprocessParams, full: bool) -> PreparedPair | None:
        """The cached pair, or None (disabled, absent, or unreadable: an unreadable entry is removed)."""
        if not self.enabled:
            return None
        key = cache_key(source, target, params, full)
        npz, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                raise ValueError("key mismatch")
            with np.load(npz) as data:
                arrays = {k: data[k] for k in data.files}
            return _unpack(meta, arrays, params)
        except Exception:  # noqa: BLE001 - a damaged entry (truncated zip, bad json...) is a miss
            npz.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None

    def put(self, source, target, params: PreprocessParams, full: bool, prepared: PreparedPair) -> None:
        """Store a prepared pair (atomic; the json, written last, makes the entry visible)."""
        if not self.enabled:
            return
        key = cache_key(source, target, params, full)
        npz, meta_path = self._paths(key)
        npz.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta = _pack(prepared)
        meta.update(key=key, source=str(source), target=str(target), params=params_dict(params),
                    stage_version=STAGE_VERSION, stage_code=stage_fingerprint(), full=bool(full))
        _atomic_write(npz, lambda fh: np.savez(fh, **arrays))
        _atomic_write(meta_path, lambda fh: fh.write(json.dumps(meta, default=_json_default).encode()))

    def get_or_prepare(self, source, target, params: PreprocessParams | None = None,
                       full: bool = True) -> tuple[PreparedPair, bool]:
        """``(prepared pair, True)`` from the cache, else ``(prepare_pair(...), False)`` stored for next time."""
        params = params or PreprocessParams()
        hit = self.get(source, target, params, full)
        if hit is not None:
            return hit, True
        prepared = prepare_pair(source, target, params, full=full)
        try:
            self.put(source, target, params, full, prepared)
        except OSError:
            pass  # a read-only or full disk costs speed, never the result
        return prepared, False

    def clear(self) -> int:
        """Remove every entry (and stray temporary files); returns the number of entries removed."""
        if not self.folder.exists():
            return 0
        n = 0
        for sub in self.folder.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for f in sub.iterdir():
                if f.suffix == ".json" and not f.name.startswith("."):
                    n += 1
                if f.suffix in (".json", ".npz", ".tmp"):
                    f.unlink(missing_ok=True)
            if not any(sub.iterdir()):
                sub.rmdir()
        return n


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the cache's json")


def _pack(p: PreparedPair) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {"source_pre": np.asarray(p.source_pre, np.float64)}
    views = [("fixed", p.fixed), ("moving", p.moving)]
    if p.alternative is not None:  # the other mirror state: its moving view and pre-transform (same fixed)
        arrays["alt_source_pre"] = np.asarray(p.alternative.source_pre, np.float64)
        views.append(("alt_moving", p.alternative.moving))
    for role, view in views:
        arrays[f"{role}_rgb"] = view.rgb
        arrays[f"{role}_mask"] = np.packbits(view.mask, axis=None)
        if view.valid is not None:
            arrays[f"{role}_valid"] = np.packbits(view.valid, axis=None)
    meta = {
        "source_scale": list(p.source_scale),
        "target_scale": list(p.target_scale),
        "source_shape": list(p.source_shape),
        "target_shape": list(p.target_shape),
        "diagnostics": p.diagnostics,
    }
    if p.alternative is not None:
        meta["alternative_diagnostics"] = p.alternative.diagnostics
    return arrays, meta


def _unpack(meta: dict[str, Any], arrays: dict[str, np.ndarray], params: PreprocessParams) -> PreparedPair:
    diag = dict(meta["diagnostics"])
    views = {}
    roles = ["fixed", "moving"] + (["alt_moving"] if "alt_source_pre" in arrays else [])
    for role in roles:
        rgb = arrays[f"{role}_rgb"]
        h, w = rgb.shape[:2]
        mask = np.unpackbits(arrays[f"{role}_mask"], count=h * w).reshape(h, w).view(bool)
        valid = arrays.get(f"{role}_valid")
        if valid is not None:
            valid = np.unpackbits(valid, count=h * w).reshape(h, w).view(bool)
        glass = diag.get(f"glass_level_{role.removeprefix('alt_')}", 0.0)
        views[role] = view_from(rgb, mask, glass, params, valid)
    common = {
        "source_scale": tuple(meta["source_scale"]),
        "target_scale": tuple(meta["target_scale"]),
        "source_shape": tuple(meta["source_shape"]),
        "target_shape": tuple(meta["target_shape"]),
    }
    alternative = None
    if "alt_moving" in views:
        alternative = PreparedPair(fixed=views["fixed"], moving=views["alt_moving"],
                                   source_pre=arrays["alt_source_pre"],
                                   diagnostics={**meta["alternative_diagnostics"], "cache_hit": True}, **common)
    return PreparedPair(
        fixed=views["fixed"],
        moving=views["moving"],
        source_pre=arrays["source_pre"],
        diagnostics={**diag, "cache_hit": True},
        alternative=alternative,
        **common,
    )
