"""Accuracy of every ASQ/POST scheme on digits, as the ASQ paper's Table 4 does for CIFAR-10.

Trains the zoo ResNet-20 in float with a fixed recipe, then compiles and fine-tunes
it (QAT) with each scheme at each bit width and several seeds, and writes a markdown
table of mean ± std test accuracy next to the float baseline.

    python bench/accuracy.py                         # full table (~10-20 min on 2 cores)
    python bench/accuracy.py --seeds 1 --bits 4 --qat-epochs 1 --float-epochs 2   # smoke run

Targets (issue 3): ASQ+POST 4-bit >= float - 0.3; 3-bit >= float - 0.8; ASQ 2-bit >=
float - 2.5 and >= LSQ 2-bit. The script prints whether each is met. A second
baseline row fine-tunes the float model with the QAT recipe but no quantization, so
the table shows how much of QAT's result is just the extra epochs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import qcompiler
from qcompiler.data import load_digits
from qcompiler.passes import SCHEMES as PIPELINES
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import resnet20

# The ASQ paper's schemes, with their pipelines from the one place that names them.
SCHEMES: dict[str, str] = {name: PIPELINES[name] for name in ("LSQ", "LSQ+POT", "LSQ+POST", "ASQ", "ASQ+POST")}
POWER_GRID_BITS = (3, 4)  # a 2-bit power grid is just {0, ±alpha}: not reported, as in the paper


def run(args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    torch.set_num_threads(args.threads)
    data = load_digits()
    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=data.num_classes, width=args.width)
    start = time.perf_counter()
    train(model, data, TrainConfig(epochs=args.float_epochs, lr=0.1, seed=0), progress=False)
    float_acc = evaluate(model, data)
    print(f"float ResNet-20 (width {args.width}): {float_acc:.2f} % after {args.float_epochs} epochs "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    # The same fine-tuning without quantization: separates what QAT's extra epochs
    # buy from what quantization costs.
    tuned = []
    for seed in range(args.seeds):
        m = copy.deepcopy(model)
        train(m, data, TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, seed=seed), progress=False)
        tuned.append(evaluate(m, data))
    print(f"float + {args.qat_epochs} fine-tuning epochs: {_fmt(tuned)}", flush=True)

    results: dict[tuple[str, int], list[float]] = {("float fine-tuned", 32): tuned}
    for scheme in args.schemes:
        for bits in args.bits:
            if "PO" in scheme and bits not in POWER_GRID_BITS:
                continue
            accs = []
            for seed in range(args.seeds):
                spec = qcompiler.QuantSpec(passes=SCHEMES[scheme], weight_bits=bits, act_bits=bits, seed=seed)
                compiled = qcompiler.compile(model, spec, calib_data=data)
                train(compiled.module, data, TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, seed=seed), progress=False)
                accs.append(evaluate(compiled.module, data))
            results[(scheme, bits)] = accs
            print(f"{scheme:9s} {bits}-bit: {_fmt(accs)}", flush=True)
    results[("float", 32)] = [float_acc]
    return results


def _fmt(accs: list[float]) -> str:
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.2f} ± {sd:.2f}"


def table(results: dict[tuple[str, int], list[float]], bits: list[int]) -> str:
    float_acc = results[("float", 32)][0]
    cols = sorted(bits, reverse=True)
    lines = ["| scheme | " + " | ".join(f"{b}-bit" for b in cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append("| float | " + " | ".join(f"{float_acc:.2f}" for _ in cols) + " |")
    tuned = _fmt(results[("float fine-tuned", 32)])
    lines.append("| float, fine-tuned like QAT (no quantization) | " + " | ".join(tuned for _ in cols) + " |")
    for scheme in SCHEMES:
        cells = [(_fmt(results[(scheme, b)]) if (scheme, b) in results else "–") for b in cols]
        if any(c != "–" for c in cells):
            lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[tuple[str, int], list[float]]) -> list[tuple[str, bool, str]]:
    f = results[("float", 32)][0]
    mean = {k: statistics.mean(v) for k, v in results.items()}
    checks = []
    if ("ASQ+POST", 4) in mean:
        checks.append(("ASQ+POST 4-bit >= float - 0.3", mean[("ASQ+POST", 4)] >= f - 0.3, f"{mean[('ASQ+POST', 4)] - f:+.2f}"))
    if ("ASQ+POST", 3) in mean:
        checks.append(("ASQ+POST 3-bit >= float - 0.8", mean[("ASQ+POST", 3)] >= f - 0.8, f"{mean[('ASQ+POST', 3)] - f:+.2f}"))
    if ("ASQ", 2) in mean:
        checks.append(("ASQ 2-bit >= float - 2.5", mean[("ASQ", 2)] >= f - 2.5, f"{mean[('ASQ', 2)] - f:+.2f}"))
    if ("ASQ", 2) in mean and ("LSQ", 2) in mean:
        checks.append(("ASQ 2-bit >= LSQ 2-bit", mean[("ASQ", 2)] >= mean[("LSQ", 2)], f"{mean[('ASQ', 2)] - mean[('LSQ', 2)]:+.2f}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default=",".join(SCHEMES), type=lambda s: s.split(","))
    p.add_argument("--bits", default="4,3,2", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--float-epochs", type=int, default=15)
    p.add_argument("--qat-epochs", type=int, default=6)
    p.add_argument("--qat-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    md = table(results, args.bits)
    checks = targets(results)
    lines = [md, ""] + [f"- {'MET ' if ok else 'MISSED'} {name} ({delta})" for name, ok, delta in checks]
    report = "\n".join(lines)
    print("\n" + report)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        cmd = "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        results_header.write(
            args.out, "ASQ / POST accuracy on digits (ResNet-20)",
            f"Run time {time.perf_counter() - start:.0f} s; test accuracy in %, mean ± std over "
            f"{args.seeds} seeds; first/last layers at 8 bits.\n\n{report}\n",
            cmd=cmd.strip(), threads=args.threads,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
