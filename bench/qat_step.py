"""Time of one QAT training step, compiled models against the float model, in one run.

One step = forward + backward + SGD update of the zoo ResNet-18 at 64x64, batch 16.
The three models are timed in interleaved rounds (so machine noise hits all of them
alike); each model's ratio to float is the median over rounds of its time over the
float model's time in the same round.

    python bench/qat_step.py [--repeats 30] [--threads N] [--isa avx2] [--check] [--no-memory] [--out FILE [--append]]

Target (issue 3): ASQ+POST 4-bit <= 1.3x float. With the fused kernels built
(qcompiler.kernels), an "ASQ+POST, eager" row times the same model on the eager
quantizers in the same rounds.

``--isa avx2`` runs the bench as an AVX2 machine would on an AVX-512 one: torch's own
kernels (and the fused kernels, built for them), oneDNN's convolutions and MKL all limited to
AVX2 (bench/results_header.py, ``NARROWED``), in a child process; the header says what oneDNN used.

Peak memory (issue 16, target <= 1.3x float): each model's step runs in a fresh process;
after two warm-up steps the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``)
and the step's memory is the peak over three steps minus the resident size before them:
activations saved for backward, gradients and the quantizers' temporaries.

It is measured twice. "Held": glibc's mmap threshold is pinned at its initial 128 KiB
(``mallopt(M_MMAP_THRESHOLD)``), so every tensor block is its own mapping and is returned
when freed: the peak RSS is the peak of what the step holds; the target applies to this.
"glibc default": glibc raises that threshold after the first large free, so tensors then
come from the heap and freed blocks stay resident behind live ones; the peak then
includes that retention, which depends on the order of frees and moves by tens of MiB
between identical runs (float 62-90 MiB measured on one machine).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompiler
from qcompiler import kernels
from qcompiler.zoo import resnet18

TARGET = 1.3
MEMORY_TARGET = 1.3


def _step_fn(model, x, y, fused: bool = True):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> float:
        with contextlib.nullcontext() if fused else kernels.disabled():
            t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t

    return step


def _build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet18(in_channels=3, num_classes=10)
    if name == "float":
        return model
    calib = torch.randn(32, 3, size, size)
    passes = {"LSQ 4-bit": "lsq", "ASQ+POST 4-bit": "asq,post"}[name]
    return qcompiler.compile(model, qcompiler.QuantSpec(passes=passes), calib_data=calib).module


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also stops the dynamic raise
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


def _step_memory(name: str, size: int, batch: int, threads: int, held: bool = True) -> int:
    """Bytes a training step adds at its peak over what is resident before it (run in a fresh process).

    ``held``: pin glibc's mmap threshold first, so freed tensors leave the RSS (see the module doc).
    """
    if held:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    torch.set_num_threads(threads)
    model = _build(name, size)
    torch.manual_seed(1)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    step = _step_fn(model, x, y)
    step(), step()  # momentum buffers exist, the allocator has seen the step's sizes
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        step()
    return (_status_kib("VmHWM") - base) * 1024


def memory_ratios(size: int, batch: int, threads: int, held: bool = True) -> dict[str, tuple[int, float]]:
    """Peak step memory of each model and its ratio to float's, each measured in a fresh interpreter.

    A subprocess per model, not multiprocessing: a spawned worker must import this file by
    name, which fails when it was loaded under another (the smoke test), and then hangs.
    """
    peaks = {}
    for name in ("float", "LSQ 4-bit", "ASQ+POST 4-bit"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", name, "--size", str(size),
               "--batch", str(batch), "--threads", str(threads)] + ([] if held else ["--glibc-default"])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[name] = int(out.strip().splitlines()[-1])
    return {name: (b, b / peaks["float"]) for name, b in peaks.items()}


def round_ratios(times: dict[str, list[float]], baseline: str = "float") -> dict[str, float]:
    """Each model's median over rounds of (its time / the baseline's time in the same round).

    Slow drift of a shared machine hits both times of a round alike and cancels,
    where a ratio of medians would let it land on one model.

    >>> round_ratios({"float": [1.0, 2.0, 4.0], "q": [1.5, 3.0, 6.0]})["q"]
    1.5
    """
    return {name: statistics.median(t / f for t, f in zip(ts, times[baseline])) for name, ts in times.items()}


def ratio_interval(times: dict[str, list[float]], name: str, baseline: str = "float", level: float = 0.9,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for :func:`round_ratios`' median: rounds resampled with replacement.

    How far the median would move in another run on this machine: the ratio sits near
    the target, so the table shows how sure the verdict is (the verdict itself stays the median).

    >>> ratio_interval({"float": [1.0] * 5, "q": [1.2] * 5}, "q")
    (1.2, 1.2)
    """
    ratios = [t / f for t, f in zip(times[name], times[baseline])]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1 - tail) * (resamples - 1))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--isa", choices=["avx2"],
                   help="run as a machine with this instruction set would (torch, oneDNN, MKL and the kernels)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of memory_ratios
    p.add_argument("--glibc-default", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the table, headed by the command and machine, to this file")
    p.add_argument("--append", action="store_true", help="add to --out instead of replacing it (a second thread count)")
    args = p.parse_args(argv)
    if args.isa:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        status = results_header.narrowed(args.isa, Path(__file__).resolve(), sys.argv[1:] if argv is None else argv)
        if status is not None:
            return status
    if args.memory_of:
        print(_step_memory(args.memory_of, args.size, args.batch, args.threads, held=not args.glibc_default))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    models = {name: _build(name, args.size) for name in ("float", "LSQ 4-bit", "ASQ+POST 4-bit")}
    steps = {name: _step_fn(m, x, y) for name, m in models.items()}
    if kernels.fused() is not None:  # what the fused kernels buy, measured in the same rounds
        eager = copy.deepcopy(models["ASQ+POST 4-bit"])
        steps["ASQ+POST, eager"] = _step_fn(eager, x, y, fused=False)
    for step in steps.values():  # warm-up
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            times[name].append(steps[name]())
    # Ratios within each round (the models ran back to back there), then the median:
    # slow drift of this shared machine cancels out instead of landing on one model.
    ratios = round_ratios(times)
    intervals = {name: ratio_interval(times, name) for name in times}
    ok = ratios["ASQ+POST 4-bit"] <= TARGET
    low, high = intervals["ASQ+POST 4-bit"]
    lines = [
        f"ResNet-18, {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s), "
        f"{args.repeats} interleaved rounds; ratio = median over rounds of (model / float in that round), "
        "with a 90% bootstrap interval over rounds",
        f"{'model':18s} {'ms/step':>8s} {'x float':>8s} {'90% interval':>13s}",
        *(f"{name:18s} {statistics.median(ts) * 1e3:8.1f} {ratios[name]:8.2f} "
          f"{intervals[name][0]:6.2f}-{intervals[name][1]:.2f}" for name, ts in times.items()),
        f"target: ASQ+POST 4-bit <= {TARGET}x float: {'MET' if ok else 'MISSED'} ({ratios['ASQ+POST 4-bit']:.2f}x; "
        f"90% interval {low:.2f}-{high:.2f})",
    ]
    if not args.no_memory:
        memory = memory_ratios(args.size, args.batch, args.threads)
        default = memory_ratios(args.size, args.batch, args.threads, held=False)
        lines += ["", "peak memory of a training step over what is resident before it (fresh process per model)",
                  f"{'model':18s} {'held MiB':>9s} {'x float':>8s}   {'glibc default MiB':>17s} {'x float':>8s}"]
        lines += [f"{name:18s} {b / 2**20:9.1f} {r:8.2f}   {default[name][0] / 2**20:17.1f} {default[name][1]:8.2f}"
                  for name, (b, r) in memory.items()]
        worst = max(r for _, r in memory.values())
        mem_ok = worst <= MEMORY_TARGET
        lines.append(f"target: every model <= {MEMORY_TARGET}x float's step memory (held): "
                     f"{'MET' if mem_ok else 'MISSED'} ({worst:.2f}x)")
        ok = ok and mem_ok
    text = "\n".join(lines)
    print(text)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        fused = "fused kernels built" if kernels.fused() is not None else "no fused kernels (eager quantizers only)"
        if args.append and Path(args.out).exists():
            with open(args.out, "a") as f:
                f.write(f"\n{results_header.header(threads=args.threads)}\n```\n{text}\n```\n")
        else:
            results_header.write(args.out, "QAT step time and memory (bench/qat_step.py)",
                                 f"{fused}; targets: ASQ+POST 4-bit <= {TARGET}x float's step time; every model "
                                 f"<= {MEMORY_TARGET}x float's step memory.\n\n```\n{text}\n```",
                                 threads=args.threads)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
