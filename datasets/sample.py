"""The embedded sample dataset: generated pairs with exact landmarks, no download.

:func:`sample_table` generates :data:`SAMPLE_PAIRS` pairs with :func:`bench.datasets.synthetic.write_dataset`
(all tissues x all stains, balanced) on first use into a cache folder, in the ANHIR layout, and returns
the path of its ``dataset.csv``. Later calls reuse it. The folder name carries the generator version and a
digest of the seed, pair count and configuration, so a change to any of them makes a new folder instead
of reusing stale images. Generation writes into a temporary folder beside the final one and renames it
into place only when complete, so an interrupted run never leaves a half dataset (a concurrent run that
finishes first wins; the other discards its copy).

Cache location, first match wins: the ``cache_dir`` argument, ``$HISTREG_BENCH_CACHE``,
``~/.cache/histreg-bench``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from bench.datasets.synthetic import GENERATOR_VERSION, GeneratorConfig, write_dataset

SAMPLE_SEED = 2019
SAMPLE_PAIRS = 24
SAMPLE_CONFIG = GeneratorConfig()
CACHE_ENV = "HISTREG_BENCH_CACHE"
MANIFEST = "sample.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$HISTREG_BENCH_CACHE``, else ``~/.cache/histreg-bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "histreg-bench"


def sample_manifest() -> dict:
    """What defines the sample: generator version, seed, pair count, configuration (JSON-ready)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": SAMPLE_SEED,
        "n_pairs": SAMPLE_PAIRS,
        "config": dataclasses.asdict(SAMPLE_CONFIG),
    }


def sample_key() -> str:
    """Name of the sample's folder in the cache, e.g. ``sample-v1-0123456789ab``."""
    text = json.dumps(sample_manifest(), sort_keys=True)
    return f"sample-v{GENERATOR_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def sample_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the sample lives (whether or not it has been generated yet)."""
    return cache_root(cache_dir) / sample_key()


def sample_table(cache_dir: str | Path | None = None, *, refresh: bool = False) -> Path:
    """Return the embedded sample's ``dataset.csv``, generating it first if needed.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Cache folder (see :func:`cache_root`); the sample goes into a subfolder named by :func:`sample_key`.
    refresh : bool
        Regenerate even if a complete sample is already there.

    Returns
    -------
    Path
        The pair table, readable by :func:`bench.datasets.anhir.load_table`.
    """
    final = sample_dir(cache_dir)
    table = final / "dataset.csv"
    if table.is_file() and not refresh:
        return table
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the sample is ordinary shared data
    try:
        write_dataset(tmp, SAMPLE_PAIRS, SAMPLE_SEED, SAMPLE_CONFIG)
        (tmp / MANIFEST).write_text(json.dumps(sample_manifest(), indent=2) + "\n")
        if refresh and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / "sample")
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not table.is_file():  # not a concurrent run that finished first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return table


if __name__ == "__main__":
    print(sample_table())
