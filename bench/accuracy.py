"""Accuracy of every ASQ/POST scheme on digits, as the ASQ paper's Table 4 does for CIFAR-10.

Trains the zoo ResNet-20 in float with a fixed recipe, then compiles and fine-tunes
it (QAT) with each scheme at each bit width and several seeds, and writes a markdown
table of mean ± std test accuracy next to the float baseline.

    python bench/accuracy.py                         # full table (~10-20 min on 2 cores)
    python bench/accuracy.py --data digits-hard --seeds 5 --out bench/results/accuracy_hard.md
    python bench/accuracy.py --seeds 1 --bits 4 --qat-epochs 1 --float-epochs 2   # smoke run

Every scheme runs with the same seeds (calibration order, adapter initialisation, QAT
data order), so each seed pairs a scheme's accuracy with LSQ's at the same bits; the
paired differences' mean and its 95 % t-interval say whether a gap is more than
seed noise. On plain digits every scheme sits within noise of float; ``digits-hard``
(16x16 warped, occluded, noisy digits; float ~90 %) is where they separate.

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
from qcompiler.data import load_data
from qcompiler.passes import SCHEMES as PIPELINES
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import resnet20

# The ASQ paper's schemes, with their pipelines from the one place that names them.
SCHEMES: dict[str, str] = {name: PIPELINES[name] for name in ("LSQ", "LSQ+POT", "LSQ+POST", "ASQ", "ASQ+POST")}
POWER_GRID_BITS = (3, 4)  # a 2-bit power grid is just {0, ±alpha}: not reported, as in the paper


def run(args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    torch.set_num_threads(args.threads)
    data = load_data(args.data)
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


def t_quantile(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # scikit-learn's dependency, already installed

    return float(t.ppf(0.975, df))


def paired(results: dict[tuple[str, int], list[float]], a: str, b: str, bits: int) -> tuple[float, float] | None:
    """Mean of ``a - b`` over seeds at ``bits`` and the half-width of its 95 % interval."""
    if (a, bits) not in results or (b, bits) not in results or len(results[(a, bits)]) < 2:
        return None
    diffs = [x - y for x, y in zip(results[(a, bits)], results[(b, bits)])]
    return statistics.mean(diffs), t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5


def paired_table(results: dict[tuple[str, int], list[float]], bits: list[int]) -> str:
    """Each scheme minus LSQ at the same bits, per seed: mean and 95 % interval."""
    cols = sorted(bits, reverse=True)
    lines = ["| scheme − LSQ (paired by seed) | " + " | ".join(f"{b}-bit" for b in cols) + " |", "|---|" + "---|" * len(cols)]
    for scheme in SCHEMES:
        if scheme == "LSQ":
            continue
        cells = []
        for b in cols:
            d = paired(results, scheme, "LSQ", b)
            cells.append("–" if d is None else f"{d[0]:+.2f} [{d[0] - d[1]:+.2f}, {d[0] + d[1]:+.2f}]")
        if any(c != "–" for c in cells):
            lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(results: dict[tuple[str, int], list[float]]) -> list[str]:
    """The papers' orderings, each judged on its paired 95 % interval."""
    out = []
    for a, b, bits, claim in (("ASQ", "LSQ", 2, "ASQ > LSQ at 2 bits"), ("LSQ+POST", "LSQ+POT", 3, "POST >= POT at 3 bits"),
                              ("ASQ+POST", "LSQ", 3, "ASQ+POST > LSQ at 3 bits")):
        d = paired(results, a, b, bits)
        if d is None:
            continue
        lo, hi = d[0] - d[1], d[0] + d[1]
        verdict = "holds (interval above 0)" if lo > 0 else "reversed (interval below 0)" if hi < 0 else "inside seed noise (interval spans 0)"
        out.append(f"- {claim}: {a} − {b} = {d[0]:+.2f} points, 95 % interval [{lo:+.2f}, {hi:+.2f}]: {verdict}")
    return out


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
    p.add_argument("--data", default="digits", help="digits or digits-hard")
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
    checks = targets(results) if args.data == "digits" else []  # the issue-3 targets are stated for plain digits
    lines = [md, ""] + [f"- {'MET ' if ok else 'MISSED'} {name} ({delta})" for name, ok, delta in checks]
    if args.seeds > 1:
        lines += ["", paired_table(results, args.bits), ""] + claims(results)
    report = "\n".join(lines)
    print("\n" + report)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        cmd = "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        results_header.write(
            args.out, f"ASQ / POST accuracy on {args.data} (ResNet-20)",
            f"Run time {time.perf_counter() - start:.0f} s; test accuracy in %, mean ± std over "
            f"{args.seeds} seeds; first/last layers at 8 bits.\n\n{report}\n",
            cmd=cmd.strip(), threads=args.threads,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
