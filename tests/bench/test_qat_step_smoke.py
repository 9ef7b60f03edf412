"""Smoke test of bench/qat_step.py at a tiny size: every model row has a finite ratio.

The 1.3x target is not asserted here (timings on a shared machine are noisy);
``python bench/qat_step.py --check`` checks it.
"""

from __future__ import annotations

import math
import re
import statistics

import pytest

from qcompiler import kernels

from bench_scripts import load_bench


def test_ratios_are_taken_within_rounds_so_drift_cancels():
    """Per-round ratios: the machine slowing down 4x over the run leaves the ratio at 1.25."""
    drift = [1.0, 1.5, 2.0, 3.0, 4.0]
    times = {"float": [d * 0.2 for d in drift], "model": [d * 0.25 for d in drift[::-1]][::-1]}
    ratios = load_bench("qat_step").round_ratios(times)
    assert ratios["model"] == pytest.approx(1.25)
    assert ratios["float"] == 1.0
    # the machine slows down in the last two rounds and the model hits a hiccup in round 3:
    # a ratio of separate medians would say 5x, the per-round median says 1.25x
    noisy = {"float": [1.0, 1.0, 1.0, 4.0, 4.0], "model": [1.25, 1.25, 5.0, 5.0, 5.0]}
    assert statistics.median(noisy["model"]) / statistics.median(noisy["float"]) == 5.0
    assert load_bench("qat_step").round_ratios(noisy)["model"] == pytest.approx(1.25)


def test_ratio_interval_brackets_the_median_and_reflects_spread():
    bench = load_bench("qat_step")
    steady = {"float": [1.0] * 9, "model": [1.2] * 9}
    assert bench.ratio_interval(steady, "model") == (1.2, 1.2)
    ratios = [1.1, 1.15, 1.2, 1.22, 1.25, 1.28, 1.3, 1.35, 1.5]
    noisy = {"float": [2.0] * 9, "model": [2.0 * r for r in ratios]}
    low, high = bench.ratio_interval(noisy, "model")
    assert low < bench.round_ratios(noisy)["model"] < high
    assert 1.1 <= low and high <= 1.5
    assert bench.ratio_interval(noisy, "model") == (low, high)  # seeded: the same interval every run


def test_qat_step_bench_runs_and_reports_ratios(capsys):
    module = load_bench("qat_step")
    assert module.main(["--repeats", "2", "--size", "32", "--batch", "2", "--threads", "1", "--no-memory"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(float|LSQ 4-bit|ASQ\+POST 4-bit|ASQ\+POST, eager)\s+[0-9.]+\s+([0-9.]+)\s+[0-9.]+-[0-9.]+$",
                           out, re.MULTILINE))
    expected = {"float", "LSQ 4-bit", "ASQ+POST 4-bit"} | ({"ASQ+POST, eager"} if kernels.fused() else set())
    assert set(rows) == expected
    assert all(math.isfinite(float(r)) and float(r) > 0 for r in rows.values())
    assert re.search(r"^target: ASQ\+POST 4-bit <= 1\.3x float: (MET|MISSED) \([0-9.]+x; 90% interval [0-9.]+-[0-9.]+\)$",
                     out, re.MULTILINE)
