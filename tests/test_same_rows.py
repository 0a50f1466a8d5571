"""Behaviour unchanged: the old methods' rows (status, matrix, per-pair rTRE) on the embedded sample and on the
real anhir-mini pairs equal the references stored in studies/reference (made before the third round's changes).
A wanted change of behaviour updates a reference (``python studies/same_rows.py --set NAME --update``) and says
why in its commit; anything else that moves a row fails here, before the change lands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "same_rows.py"
OLD_METHODS = "identity,preprocessed,learned,sift,surf,iterative,cascade"


def _same_rows(name: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--set", name, "--methods", OLD_METHODS],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].endswith(": 0 differ"), proc.stdout[-2000:]


@pytest.mark.slow
def test_sample_rows_equal_the_reference(tmp_path):
    _same_rows("sample", tmp_path)


@pytest.mark.slow
@pytest.mark.realdata
def test_anhir_mini_rows_equal_the_reference(anhir_mini, tmp_path):
    _same_rows("anhir-mini", tmp_path)
