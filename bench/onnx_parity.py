"""ONNX parity matrix: every zoo model x scheme x width, exported file against the fake-quant module.

Each zoo model (``in_channels=1``, small widths) is trained in float for a few epochs on
digits (random models have degenerate output ranges), then compiled (PTQ, calibrated on
the training split) with each scheme at 2, 4 and 8 bits, exported in the custom form
(and, for plain LSQ, the QDQ form) and run in onnxruntime on the 450 test images, the
file as written (:func:`qcompiler.runtime.onnx_export.onnx_parity`). Reported: max |diff|
as a fraction of the module's output range (target <= 1e-4) and class agreement
(target 100 %). ``conv1d_net`` reads each 8x8 image as a 64-sample sequence.

    python bench/onnx_parity.py                  # print the matrix
    python bench/onnx_parity.py --markdown PATH  # also write it as markdown
    python bench/onnx_parity.py --models resnet20,resnet18,resnet50  # a subset (run two at once)

A cell's ``f<k>`` counts the quantized layers that compute on dequantized floats because
they have no exact integer form (``qcompiler.float_layers`` in the file's metadata).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qcompiler  # noqa: E402
from qcompiler.data import Dataset, load_digits  # noqa: E402
from qcompiler.runtime.onnx_export import FLOAT_LAYERS, onnx_parity, to_onnx  # noqa: E402
from qcompiler.train import TrainConfig, train  # noqa: E402
from qcompiler.zoo import ZOO  # noqa: E402

WIDTHS = {"resnet20": {"width": 4}, "resnet18": {"width": 8}, "resnet50": {"width": 8},
          "mobilenetv2": {"width_mult": 0.25}, "plain_cnn": {"width": 8}, "conv1d_net": {"width": 8},
          "adder_resnet20": {"width": 4}}
SCHEMES = ["lsq", "lsq,pot", "lsq,post", "asq", "asq,post"]
ADDER_SCHEMES = ["outlier-clamp,adder-groups"]
BITS = (2, 4, 8)


def as_sequences(data: Dataset) -> Dataset:
    """Digits as (N, 1, 64) sequences, for the 1-D model."""
    import dataclasses

    return dataclasses.replace(data, x_train=data.x_train.flatten(2), x_test=data.x_test.flatten(2))


def cell(c, fmt: str, x: torch.Tensor) -> str:
    try:
        model = to_onnx(c.module, fmt)
        p = onnx_parity(c, model, x)
    except Exception as e:  # noqa: BLE001 - a cell reports its error, the matrix goes on
        return f"error: {type(e).__name__}: {str(e)[:80]}"
    flag = "" if p.ok() else (" *" if p.classes_agree == 1.0 else " **")
    floats = [q.value for q in model.metadata_props if q.key == FLOAT_LAYERS]
    count = f" f{len(floats[0].split(','))}" if floats else ""
    return f"{p.relative:.1e} / {100 * p.classes_agree:.1f} %{count}{flag}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    digits = load_digits()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; python bench/onnx_parity.py {' '.join(sys.argv[1:])}; "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch threads {torch.get_num_threads()}, onnxruntime {ort.__version__} (default threads)", flush=True)
    rows = ["| model | scheme | form | 2-bit | 4-bit | 8-bit |", "|---|---|---|---|---|---|"]
    t0 = time.time()
    for name in args.models.split(","):
        data = as_sequences(digits) if name == "conv1d_net" else digits
        torch.manual_seed(0)
        model = ZOO[name](in_channels=1, num_classes=10, **WIDTHS[name])
        train(model, data, TrainConfig(epochs=args.epochs, lr=0.05, seed=0), progress=False)
        schemes = ADDER_SCHEMES if name.startswith("adder") else SCHEMES
        for passes in schemes:
            forms = ["custom", "qdq"] if passes == "lsq" else ["custom"]
            cells = {f: [] for f in forms}
            for bits in BITS:
                torch.manual_seed(0)
                try:
                    c = qcompiler.compile(copy.deepcopy(model).eval(), qcompiler.QuantSpec(
                        passes=passes, weight_bits=bits, act_bits=bits), calib_data=data)
                    c.freeze()
                except Exception as e:  # noqa: BLE001
                    for f in forms:
                        cells[f].append(f"compile error: {type(e).__name__}")
                    continue
                for f in forms:
                    cells[f].append(cell(c, f, data.x_test))
            for f in forms:
                row = f"| {name} | {passes} | {f} | " + " | ".join(cells[f]) + " |"
                rows.append(row)
                print(row, flush=True)
    text = "\n".join(rows)
    note = (f"\nmax |diff| / output range, classes agree (450 digits test images); `*` misses the 1e-4 "
            f"target with classes intact, `**` classes differ. {time.time() - t0:.0f} s.\n")
    print(note)
    if args.markdown:
        args.markdown.write_text("# ONNX parity (bench/onnx_parity.py)\n\n" + text + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
