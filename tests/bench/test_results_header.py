"""bench/results_header.py: the machine line every results file starts with, and the AVX2 narrowing.

A speed target must hold on AVX2 and AVX-512 machines alike; on an AVX-512 machine the
benches check the other one by limiting every library in a child process. Limiting only
ATen's kernels times AVX-512 convolutions beside AVX2 elementwise code, which is no machine.
"""

from __future__ import annotations

import sys

import torch

from bench_scripts import load_bench

REPORT = """
import os, sys, torch
with torch.no_grad():  # a convolution oneDNN runs
    torch.nn.functional.conv2d(torch.ones(16, 64, 16, 16), torch.ones(64, 64, 3, 3))
print(torch.backends.cpu.get_cpu_capability(), *(os.environ.get(k) for k in sys.argv[1:]))
"""


def test_narrowed_runs_the_script_with_every_library_limited(tmp_path, capfd):
    header = load_bench("results_header")
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    names = list(header.NARROWED["avx2"])
    assert set(names) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}
    assert header.narrowed("avx2", script, names) == 0
    capability, *values = capfd.readouterr().out.split()
    assert capability in ("AVX2", "DEFAULT")  # an AVX2 machine or better is narrowed to AVX2; older ones have less
    assert values == [header.NARROWED["avx2"][k] for k in names]


def test_narrowed_is_a_no_op_once_narrowed(monkeypatch, tmp_path):
    header = load_bench("results_header")
    for k, v in header.NARROWED["avx2"].items():
        monkeypatch.setenv(k, v)
    assert header.narrowed("avx2", tmp_path / "never_run.py", []) is None  # the child itself goes on


def test_instruction_set_names_torch_and_onednn_and_what_narrowed_them(monkeypatch):
    header = load_bench("results_header")
    for k in header.NARROWED["avx2"]:
        monkeypatch.delenv(k, raising=False)
    native = header.instruction_set()
    assert native.startswith(torch.backends.cpu.get_cpu_capability() + " (oneDNN: ")
    assert "set by" not in native
    for k, v in header.NARROWED["avx2"].items():
        monkeypatch.setenv(k, v)
    narrowed = header.instruction_set()
    assert "set by ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2" in narrowed
    if "AVX-512" in native:  # the child process's oneDNN saw the limit
        assert "oneDNN: Intel AVX2" in narrowed


def test_qat_step_isa_flag_reruns_itself_narrowed(monkeypatch):
    header, calls = load_bench("results_header"), []
    monkeypatch.setattr(header, "narrowed", lambda *a: calls.append(a) or 3)
    monkeypatch.setitem(sys.modules, "results_header", header)  # what the bench imports
    assert load_bench("qat_step").main(["--isa", "avx2", "--repeats", "1"]) == 3  # the child's status
    (isa, script, argv), = calls
    assert isa == "avx2" and script.name == "qat_step.py" and argv == ["--isa", "avx2", "--repeats", "1"]
