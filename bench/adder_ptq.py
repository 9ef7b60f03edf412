"""AdderNet post-training quantization on digits: redistribution against one shared scale.

Trains the zoo's adder ResNet-20 in float with a fixed recipe, then quantizes it
without retraining at W8A8 ... W3A3 with (a) redistribution (``outlier-clamp,
adder-groups``: scale groups, lossless weight clamp, outlier clamp) and (b) a single
shared scale per layer (``adder-shared``), over several calibration seeds; then
fine-tunes the redistribution-quantized model for ``--qat-epochs`` epochs (the "+ QAT"
row: QAT through the adder layers' straight-through estimator); plus an ablation at 4
bits and a sweep of the outlier-clamp ``alpha``. Writes markdown tables of mean ± std
test accuracy.

    python bench/adder_ptq.py --out bench/results/adder_ptq.md
    python bench/adder_ptq.py --bits 4 --seeds 1 --float-epochs 1 --qat-epochs 1 --no-ablation   # smoke run

Targets (issue 4): redistribution drops <= 0.3 points at 8 bits, <= 0.6 at 6, <= 2.0 at
4 versus float, and beats the shared scale at 4 and 3 bits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import qcompiler
from qcompiler.data import load_digits
from qcompiler.passes import SCHEMES
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import adder_resnet20

# The whole network runs in integers: multiply layers (stem, 1x1 shortcuts, classifier)
# at 8 bits, residual adds on an 8-bit stream. The "float multiply" row keeps the
# multiply layers in float, as the AdderNet papers' tables do.
METHODS = {
    "redistribution": dict(passes=SCHEMES["adder-redistribution"]),
    "redistribution, multiply layers float": dict(passes=SCHEMES["adder-redistribution"], adder_multiply_bits=None),
    "shared scale": dict(passes=SCHEMES["adder-shared"]),
}
# Ablation at 4 bits: each row adds one ingredient of the method.
ABLATION = {
    "groups only": dict(passes="adder-groups", adder_weight_clamp=False),
    "+ weight clamp": dict(passes="adder-groups", adder_weight_clamp=True),
    "+ outlier clamp (full method)": dict(passes="outlier-clamp,adder-groups", adder_weight_clamp=True),
}
ALPHAS = (0.9985, 0.999, 0.9995, 1.0)
QAT_ROW = "redistribution + QAT"  # then fine-tuned with qcompiler.train.train


def _accs(model, data, seeds: int, qat: TrainConfig | None = None, **spec) -> list[float]:
    """Test accuracy per calibration seed; with ``qat``, after fine-tuning the quantized model with it."""
    out = []
    for seed in range(seeds):
        compiled = qcompiler.compile(model, qcompiler.QuantSpec(seed=seed, **spec), calib_data=data)
        if qat is not None:
            train(compiled.module, data, qat, progress=False)
        out.append(evaluate(compiled.module, data))
    return out


def _fmt(accs: list[float]) -> str:
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="8,6,5,4,3", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--qat-epochs", type=int, default=3, help="fine-tuning epochs of the + QAT row (0: leave it out)")
    p.add_argument("--qat-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--out", help="write the markdown tables here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    data = load_digits()
    torch.manual_seed(0)
    model = adder_resnet20(in_channels=1, num_classes=data.num_classes, width=args.width)
    train(model, data, TrainConfig(epochs=args.float_epochs, lr=args.lr, seed=0), progress=False)
    float_acc = evaluate(model, data)
    print(f"float adder ResNet-20 (width {args.width}): {float_acc:.2f} % after {args.float_epochs} epochs "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    main_rows: dict[str, dict[int, list[float]]] = {m: {} for m in METHODS}
    for bits in args.bits:
        for method, spec in METHODS.items():
            accs = _accs(model, data, args.seeds, weight_bits=bits, act_bits=bits, **spec)
            main_rows[method][bits] = accs
            print(f"W{bits}A{bits} {method:38s} {_fmt(accs)}", flush=True)
        if args.qat_epochs:
            qat = TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, seed=0)
            accs = _accs(model, data, args.seeds, qat=qat, weight_bits=bits, act_bits=bits, **METHODS["redistribution"])
            main_rows.setdefault(QAT_ROW, {})[bits] = accs
            print(f"W{bits}A{bits} {QAT_ROW:38s} {_fmt(accs)}", flush=True)

    lines = [f"Float adder ResNet-20: **{float_acc:.2f} %**.", "",
             "| method | " + " | ".join(f"W{b}A{b}" for b in args.bits) + " |",
             "|---|" + "---|" * len(args.bits)]
    for method in main_rows:
        lines.append(f"| {method} | " + " | ".join(_fmt(main_rows[method][b]) for b in args.bits) + " |")
    lines.append("| redistribution drop vs float | " + " | ".join(
        f"{float_acc - statistics.mean(main_rows['redistribution'][b]):+.2f}" for b in args.bits) + " |")

    if not args.no_ablation:
        lines += ["", "Ablation at W4A4:", "", "| variant | accuracy |", "|---|---|"]
        for name, spec in ABLATION.items():
            accs = _accs(model, data, args.seeds, weight_bits=4, act_bits=4, **spec)
            lines.append(f"| {name} | {_fmt(accs)} |")
            print(f"ablation {name:30s} {_fmt(accs)}", flush=True)
        lines += ["", "Outlier-clamp alpha at W4A4 (full method):", "", "| alpha | accuracy |", "|---|---|"]
        for alpha in ALPHAS:
            accs = _accs(model, data, args.seeds, weight_bits=4, act_bits=4, outlier_alpha=alpha, **METHODS["redistribution"])
            lines.append(f"| {alpha} | {_fmt(accs)} |")
            print(f"alpha {alpha:<8} {_fmt(accs)}", flush=True)

    lines += ["", "Targets:", ""]
    mean = {(m, b): statistics.mean(v) for m, rows in main_rows.items() for b, v in rows.items()}
    for bits, limit in ((8, 0.3), (6, 0.6), (4, 2.0)):
        if ("redistribution", bits) in mean:
            drop = float_acc - mean[("redistribution", bits)]
            lines.append(f"- {'MET ' if drop <= limit else 'MISSED'} redistribution drop at {bits} bits <= {limit} (drop {drop:.2f})")
    for bits in (4, 3):
        if ("redistribution", bits) in mean:
            gain = mean[("redistribution", bits)] - mean[("shared scale", bits)]
            lines.append(f"- {'MET ' if gain > 0 else 'MISSED'} redistribution beats the shared scale at {bits} bits ({gain:+.2f})")
    report = "\n".join(lines)
    total = time.perf_counter() - start
    print("\n" + report + f"\n\ntotal {total:.0f} s")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_header

        cmd = "python bench/adder_ptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        results_header.write(
            args.out, "AdderNet PTQ on digits (adder ResNet-20)",
            f"Run time {total:.0f} s; test accuracy in %, mean ± std over {args.seeds} calibration seeds. Adder layers are "
            f"quantized at the stated width; unless a row says otherwise the stem, 1x1 shortcuts and classifier "
            f"(multiply layers) are quantized at 8 bits and residual adds run on an 8-bit stream, so the whole "
            f"network computes in integers (the AdderNet papers keep the multiply layers float: the "
            f"'multiply layers float' row). The + QAT row fine-tunes the redistribution model for "
            f"{args.qat_epochs} epoch(s) through the adder layers' straight-through estimator.\n\n"
            f"{report}\n",
            cmd=cmd.strip(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
