"""Integer interpreter speed against the float model's torch eval, in the same run.

``resnet20(in_channels=3)`` compiled with ``lsq`` 4-bit and ``adder_resnet20(in_channels=3)``
with the adder redistribution (``outlier-clamp,adder-groups``) 4-bit, both at the zoo's
default width on random calibration data; batch 64 of 3x32x32. Each round times the
float eval and the integer program of both models in a rotating order (the machine is
a noisy VM: a fixed order would charge one side for the other's cache and frequency
state); the ratios are of medians. Targets: int ResNet-20 <= 3x float, int adder
ResNet-20 <= 25x float. The integer program runs on the NumPy interpreter only (no
torch kernel anywhere in it); the float eval is torch with its default threads.

Run: ``PYTHONPATH=. python bench/interpreter_speed.py [--rounds 7]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

import qcompiler
from qcompiler.zoo import adder_resnet20, resnet20

TARGETS = {"resnet20": 3.0, "adder_resnet20": 25.0}


def build(name: str):
    torch.manual_seed(0)
    model = (resnet20 if name == "resnet20" else adder_resnet20)(in_channels=3).eval()
    passes = "lsq" if name == "resnet20" else "outlier-clamp,adder-groups"
    calib = torch.randn(256, 3, 32, 32)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4), calib_data=calib)
    return model, compiled.lower()


def blas() -> str:
    """NumPy's BLAS as threadpoolctl sees it (library, version, kernels, threads), if installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
    return ", ".join(f"{p['internal_api']} {p['version']} ({p.get('architecture', '?')} kernels, "
                     f"{p['num_threads']} threads)" for p in pools) or "none found"


def timed(fn) -> float:
    # NumPy's BLAS and torch's OpenMP threads spin for a while after their last call; on
    # two cores the spinners would eat the next timing, so let them go idle first
    time.sleep(0.5)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    x = torch.randn(64, 3, 32, 32)
    xn = x.numpy()
    jobs = {}
    for name in TARGETS:
        model, program = build(name)
        jobs[(name, "float")] = lambda m=model: m(x)
        jobs[(name, "int")] = lambda p=program: p.run(xn)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in jobs}
    keys = list(jobs)
    with torch.no_grad():
        for fn in jobs.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[k].append(timed(jobs[k]))
    print(f"CPU: {platform.processor() or platform.machine()}, torch cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"numpy {np.__version__}, torch {torch.__version__}")
    print(f"NumPy BLAS: {blas()}; integer program: NumPy interpreter only")
    print(f"batch 64 x 3x32x32, {args.rounds} rounds, median ms (min..max)\n")
    print("| model | float eval ms | int program ms | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for name, target in TARGETS.items():
        f, i = (statistics.median(times[(name, k)]) * 1e3 for k in ("float", "int"))
        lo_f, hi_f = min(times[(name, "float")]) * 1e3, max(times[(name, "float")]) * 1e3
        lo_i, hi_i = min(times[(name, "int")]) * 1e3, max(times[(name, "int")]) * 1e3
        print(f"| {name} | {f:.1f} ({lo_f:.1f}..{hi_f:.1f}) | {i:.1f} ({lo_i:.1f}..{hi_i:.1f}) | {i / f:.1f}x | "
              f"<= {target:g}x | {'yes' if i / f <= target else 'no'} |")


if __name__ == "__main__":
    main()
