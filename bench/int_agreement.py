"""Agreement of the integer programs with the float64 fake-quant modules over the whole zoo.

Every zoo model (narrow widths, as ``tests/small_models.py``) is trained briefly (8 epochs, lr 0.1) on the
digits train split (``qcompiler.train.train``, float, a few epochs: random models have
degenerate ranges), then compiled per scheme at 4 and 8 bits with the train split as
calibration data, lowered, and compared on the 450 test images: per activation quantizer
the fraction of identical codes and the largest difference, and the fraction of inputs
whose predicted class agrees. The bar: every layer >= 99.9 % identical, no code off by
more than 1, classes agree on >= 99.5 %, and no accumulator past the width its instruction
declares ("overflows": layers where one did, which ``program.run`` refuses). ``conv1d_net``
reads each 8x8 image as 64 samples.

Four of ``bench/foreign_models.py``'s architectures lower too and are in the default set: ``unet``
(``ConvTranspose2d`` upsampling, skip concats), ``densenet`` (every layer reads the concatenation of
all before it), and ``mobilenetv3`` and ``efficientnet`` (hardswish / SiLU, sigmoid-gated
squeeze-excitation), these two with ``lookup-activations`` after every scheme (tables for the
functions, integer multiplies for the gates), at their default widths. ``vit`` stops at attention
and layer norm.

Run: ``PYTHONPATH=. python bench/int_agreement.py [--epochs 8] [--models resnet20,...,unet]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import qcompiler
from qcompiler.data import Dataset, load_digits
from qcompiler.train import TrainConfig, train
from qcompiler.zoo import ZOO

import foreign_models  # bench/, beside this file

WIDTHS: dict[str, dict[str, object]] = {  # the narrow widths of tests/small_models.py
    "resnet20": {"width": 8, "in_channels": 1},
    "adder_resnet20": {"width": 8, "in_channels": 1},
    "resnet18": {"width": 8, "in_channels": 1, "num_classes": 10},
    "resnet50": {"width": 8, "in_channels": 1, "num_classes": 10},
    "mobilenetv2": {"width_mult": 0.5, "in_channels": 1},
    "plain_cnn": {"width": 8},
    "conv1d_net": {"width": 8},
}
SCHEMES = ["lsq", "lsq,pot", "lsq,post", "asq", "asq,post"]
ADDER_SCHEMES = ["outlier-clamp,adder-groups"]  # the adder redistribution


FOREIGN = ("unet", "densenet", "mobilenetv3", "efficientnet")  # foreign_models.py architectures the program lowers
TABLES = ("mobilenetv3", "efficientnet")  # ... with lookup-activations (hardswish, SiLU, gates)


def build(name: str) -> torch.nn.Module:
    if name in FOREIGN:
        return foreign_models.build(name, in_channels=1, num_classes=10)
    return ZOO[name](**WIDTHS[name])


def digits_for(name: str) -> Dataset:
    d = load_digits()
    if name != "conv1d_net":
        return d
    return Dataset(d.x_train.reshape(-1, 1, 64), d.y_train, d.x_test.reshape(-1, 1, 64), d.y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--models", default=",".join([*ZOO, *FOREIGN]))
    ap.add_argument("--bits", default="4,8")
    args = ap.parse_args()
    start = time.time()
    print(f"CPU: {platform.machine()}, torch cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"models trained {args.epochs} epochs on digits (float), calibrated on the train split, "
          f"compared on the 450 test images\n")
    print("| model | scheme | bits | float acc | worst layer | identical | max diff | classes agree | overflows | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for name in args.models.split(","):
        data = digits_for(name)
        torch.manual_seed(0)
        model = build(name)
        train(model, data, TrainConfig(epochs=args.epochs, lr=0.1), progress=False)
        model.eval()
        with torch.no_grad():
            acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
        schemes = ADDER_SCHEMES if name.startswith("adder") else SCHEMES
        for scheme in (f"{s},lookup-activations" for s in schemes) if name in TABLES else schemes:
            for bits in (int(b) for b in args.bits.split(",")):
                torch.manual_seed(0)
                compiled = qcompiler.compile(copy.deepcopy(model),
                                             qcompiler.QuantSpec(passes=scheme, weight_bits=bits, act_bits=bits),
                                             calib_data=data)
                report = compiled.lower().verify(compiled, data.x_test.numpy())
                worst = min(report.layers, key=lambda la: (la.untied_identical, la.identical, -la.max_diff))
                max_diff = max(la.max_diff for la in report.layers)
                ok = report.ok(identical=0.999, max_diff=1, classes=0.995)
                failures += not ok
                print(f"| {name} | {scheme} | {bits} | {acc:.3f} | {worst.name} | {worst.identical:.5f} | {max_diff} | "
                      f"{report.classes_agree:.4f} | {len(report.overflows)} | {'yes' if ok else 'NO'} |", flush=True)
    print(f"\n{failures} configuration(s) below the bar; {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
