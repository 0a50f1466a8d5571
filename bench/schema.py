"""The results schema, declared once: the columns of ``results.csv``, their kinds, the statuses and the
schema version. The store writes it, the runner fills it, the report and the importer read it.

>>> Status("ok").scored_by_method
True
>>> Status.TIMEOUT.caused_by_run
True
>>> "quality" in COLUMNS and "time_source" in COLUMNS
True
"""

from __future__ import annotations

from enum import StrEnum

SCHEMA_VERSION = 2  # 2: quality and time_source columns
RESULTS = "results.csv"
MANIFEST = "run.json"
WARPED = "warped-landmarks"


class Status(StrEnum):
    """What happened to one (pair, method)."""

    OK = "ok"  # the method returned a matrix; scored when target landmarks exist
    FAILED = "failed"  # bad input, a crash, or the method reported failure (see ``error``)
    TIMEOUT = "timeout"  # the call ran past ``--timeout``
    UNSCORED = "unscored"  # ok, but no target landmarks (registered and exported only)

    @property
    def scored_by_method(self) -> bool:
        """The method produced its own answer (ok or unscored)."""
        return self in (Status.OK, Status.UNSCORED)

    @property
    def caused_by_run(self) -> bool:
        """Timeouts are retried on rerun by default (crashes and interrupts are recorded as failed with
        ``error`` starting with one of :data:`RUN_FAULT_PREFIXES`)."""
        return self is Status.TIMEOUT


STATUSES = tuple(s.value for s in Status)

# ``error`` of a ``failed`` row whose call never ended normally: the worker process died (a signal, an
# ``os._exit``, the memory killer) or the method called ``sys.exit``. Such failures are the run's, like
# timeouts: a rerun retries them (a method that reported failure, or a bad input, is not retried).
CRASHED = "crashed:"
RUN_FAULT_PREFIXES = (CRASHED,)


def caused_by_run(status: str, error: str = "") -> bool:
    """True for rows a rerun retries by default: timeouts and crashes.

    >>> caused_by_run("timeout"), caused_by_run("failed", "crashed: killed by signal SIGSEGV")
    (True, True)
    >>> caused_by_run("failed", "method reported failure: 3 inliers"), caused_by_run("ok")
    (False, False)
    """
    if status == Status.TIMEOUT.value:
        return True
    return status == Status.FAILED.value and str(error).startswith(RUN_FAULT_PREFIXES)
FAILURE_STATUSES = (Status.FAILED.value, Status.TIMEOUT.value)

# Where ``time_s`` came from: the harness's own clock, or the figure a tool reported (imported submissions).
TIME_MEASURED = "measured"
TIME_REPORTED = "reported"

COLUMNS = (
    "pair_id",
    "tissue",
    "method",
    "method_version",
    "status",
    "error",
    "n_landmarks",
    "rtre_median",
    "rtre_mean",
    "rtre_max",
    "rtre_min",
    "rtre_std",
    "ire_median",
    "robustness",
    "success",
    "quality",
    "time_s",
    "time_cpu_s",
    "time_source",
    "time_preprocess_s",
    "preprocess_cached",
    "device",
    "params",
    "matrix",
    "diagnostics",
    "fallback",
    "source_image",
    "target_image",
    "source_landmarks",
    "target_landmarks",
    "diagonal",
)
NUMERIC_COLUMNS = (
    "n_landmarks",
    "rtre_median",
    "rtre_mean",
    "rtre_max",
    "rtre_min",
    "rtre_std",
    "ire_median",
    "robustness",
    "quality",
    "time_s",
    "time_cpu_s",
    "time_preprocess_s",
    "diagonal",
)
BOOL_COLUMNS = ("success", "fallback", "preprocess_cached")
JSON_COLUMNS = ("params", "matrix", "diagnostics")
