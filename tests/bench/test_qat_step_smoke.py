"""Smoke test of bench/qat_step.py at a tiny size: every model row has a finite ratio.

The 1.3x target is not asserted here (timings on a shared machine are noisy);
``python bench/qat_step.py --check`` checks it.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

from qcompiler import kernels

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qat_step.py"


def test_qat_step_bench_runs_and_reports_ratios(capsys):
    # imported by its own name from bench/ on sys.path: the memory measurement's spawned
    # processes unpickle its functions by module name (a file-location import under another
    # name made each worker fail to find it, and the pool wait forever)
    sys.path.insert(0, str(BENCH.parent))
    try:
        module = importlib.import_module(BENCH.stem)
        assert module.main(["--repeats", "2", "--size", "32", "--batch", "2", "--threads", "1"]) == 0
    finally:
        sys.path.remove(str(BENCH.parent))
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(float|LSQ 4-bit|ASQ\+POST 4-bit|ASQ\+POST, eager)\s+[0-9.]+\s+([0-9.]+)$", out, re.MULTILINE))
    expected = {"float", "LSQ 4-bit", "ASQ+POST 4-bit"} | ({"ASQ+POST, eager"} if kernels.fused() else set())
    assert set(rows) == expected
    assert float(rows["float"]) == 1.0
    assert all(math.isfinite(float(r)) and float(r) > 0 for r in rows.values())
    assert re.search(r"^target: ASQ\+POST 4-bit <= 1\.3x float: (MET|MISSED)", out, re.MULTILINE)
