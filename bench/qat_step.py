"""Time of one QAT training step, compiled models against the float model, in one run.

One step = forward + backward + SGD update of the zoo ResNet-18 at 64x64, batch 16.
The three models are timed in interleaved rounds (so machine noise hits all of them
alike); each model's ratio to float is the median over rounds of its time over the
float model's time in the same round.

    python bench/qat_step.py [--repeats 30] [--threads N] [--check] [--out FILE [--append]]

Target (issue 3): ASQ+POST 4-bit <= 1.3x float. With the fused kernels built
(qcompiler.kernels), an "ASQ+POST, eager" row times the same model on the eager
quantizers in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import qcompiler
from qcompiler import kernels
from qcompiler.zoo import resnet18

TARGET = 1.3


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


def round_ratios(times: dict[str, list[float]], baseline: str = "float") -> dict[str, float]:
    """Each model's median over rounds of (its time / the baseline's time in the same round).

    Slow drift of a shared machine hits both times of a round alike and cancels,
    where a ratio of medians would let it land on one model.

    >>> round_ratios({"float": [1.0, 2.0, 4.0], "q": [1.5, 3.0, 6.0]})["q"]
    1.5
    """
    return {name: statistics.median(t / f for t, f in zip(ts, times[baseline])) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    p.add_argument("--out", help="also write the table, headed by the command and machine, to this file")
    p.add_argument("--append", action="store_true", help="add to --out instead of replacing it (a second thread count)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    model = resnet18(in_channels=3, num_classes=10)
    calib = torch.randn(32, 3, args.size, args.size)
    models = {
        "float": model,
        "LSQ 4-bit": qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=calib).module,
        "ASQ+POST 4-bit": qcompiler.compile(model, qcompiler.QuantSpec(passes="asq,post"), calib_data=calib).module,
    }
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
    ok = ratios["ASQ+POST 4-bit"] <= TARGET
    text = "\n".join([
        f"ResNet-18, {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s), "
        f"{args.repeats} interleaved rounds; ratio = median over rounds of (model / float in that round)",
        f"{'model':18s} {'ms/step':>8s} {'x float':>8s}",
        *(f"{name:18s} {statistics.median(ts) * 1e3:8.1f} {ratios[name]:8.2f}" for name, ts in times.items()),
        f"target: ASQ+POST 4-bit <= {TARGET}x float: {'MET' if ok else 'MISSED'} ({ratios['ASQ+POST 4-bit']:.2f}x)",
    ])
    print(text)
    if args.out:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        fused = "fused kernels built" if kernels.fused() is not None else "no fused kernels (eager quantizers only)"
        if args.append and Path(args.out).exists():
            with open(args.out, "a") as f:
                f.write(f"\n{results_header.header(threads=args.threads)}\n```\n{text}\n```\n")
        else:
            results_header.write(args.out, "QAT step time (bench/qat_step.py)",
                                 f"{fused}; target: ASQ+POST 4-bit <= {TARGET}x float.\n\n```\n{text}\n```",
                                 threads=args.threads)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
