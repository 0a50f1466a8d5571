"""The project's one cache folder, and the one environment variable that moves it.

The embedded sample (:mod:`bench.datasets.sample`) and the preprocessing cache (:mod:`bench.cache`, in
``preprocess/`` below it) both live here. First match wins: a ``cache_dir`` given by the caller,
``$HISTREG_BENCH_CACHE``, ``$XDG_CACHE_HOME/histreg-bench``, ``~/.cache/histreg-bench``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HISTREG_BENCH_CACHE"  # the one variable naming the cache folder


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$HISTREG_BENCH_CACHE``, else ``$XDG_CACHE_HOME/histreg-bench``,
    else ``~/.cache/histreg-bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "histreg-bench"
