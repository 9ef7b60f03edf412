"""Smoke test of bench/compile_time.py: it runs and reports a finite, positive ratio.

The 0.25 target is not asserted here (timings on a shared machine are noisy);
``python bench/compile_time.py --check`` checks it.
"""

from __future__ import annotations

import math
import re

from bench_scripts import load_bench

NUM = r"([0-9]+(?:\.[0-9]+)?)"
# model  input  qcompiler ms  (trace / passes)  torch.ao ms  (prepare / convert)  ratio  target  result
ROW = re.compile(
    rf"^resnet20\s+1x3x32x32\s+{NUM}\s+\({NUM} / {NUM}\)\s+{NUM}\s+\({NUM} / {NUM}\)\s+{NUM}\s+<= \S+\s+(PASS|MISS)$",
    re.MULTILINE,
)


def test_compile_time_resnet20_reports_a_finite_positive_ratio(capsys):
    bench = load_bench("compile_time")
    status = bench.main(["--models", "resnet20", "--repeats", "1"])
    out = capsys.readouterr().out
    assert status == 0  # without --check it never fails on the target

    rows = ROW.findall(out)
    assert len(rows) == 1, out
    qc_ms, trace_ms, passes_ms, ao_ms, prepare_ms, convert_ms, ratio = map(float, rows[0][:7])
    assert math.isfinite(ratio) and ratio > 0, out
    assert qc_ms > 0 and trace_ms > 0 and ao_ms > 0 and prepare_ms > 0 and convert_ms > 0, out
    assert passes_ms >= 0, out
    assert math.isclose(ratio, qc_ms / ao_ms, rel_tol=0.02, abs_tol=0.002), out
    assert re.search(r"excluded: [^)]*\bobserve\b", out), out  # with bias-correction and the join passes
    assert "threads 1" in out, out
    # the calibration-included ratio, next to torch.ao observing the same batches
    calib = re.search(rf"^resnet20\s+{NUM} \(\+{NUM}\)\s+{NUM} \(\+{NUM}\)\s+{NUM}$", out, re.MULTILINE)
    assert calib, out
    qc_all, qc_calib, ao_all, ao_observe, ratio_all = map(float, calib.groups())
    assert qc_calib > 0 and ao_observe > 0, out
    assert math.isclose(qc_all, qc_ms + qc_calib, rel_tol=0.01, abs_tol=0.2), out
    assert math.isclose(ao_all, ao_ms + ao_observe, rel_tol=0.01, abs_tol=0.2), out
    assert math.isclose(ratio_all, qc_all / ao_all, rel_tol=0.02, abs_tol=0.002), out


def test_compile_time_writes_its_results_file_with_the_machine(tmp_path):
    bench = load_bench("compile_time")
    out = tmp_path / "compile_time.md"
    assert bench.main(["--models", "resnet20", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Compile time")
    for field in ("Command: `python", "UTC", "commit ", "Machine: ", "instruction set ", "torch threads 1", "ratio with calibration"):
        assert field in text, field
