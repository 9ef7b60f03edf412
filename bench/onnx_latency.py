"""onnxruntime latency of our exports against the float model's, and their file sizes.

ResNet-20 (3x32x32, the zoo's default width 16), calibrated on random inputs (latency
and size do not depend on accuracy). One process, one ``SessionOptions`` for every
session (default graph optimizations, ``--threads`` intra-op threads, 1 by default), batch 1 and 64.
Each timed round runs every model once in a rotating order, so a load change on a
shared machine hits all of them alike; the number is the median over rounds of the
per-run time. The float reference is ``torch.onnx.export`` of the float model (batch
norm folded by the exporter's constant folding).

Targets (issue #14): the 4-bit ASQ+POST custom export <= 2x the float model, the
8-bit LSQ QDQ export <= 1.0x; the 4-bit custom export <= 0.15x the float file's bytes.

    python bench/onnx_latency.py                  # print the table
    python bench/onnx_latency.py --markdown PATH  # also write it as markdown
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qcompiler  # noqa: E402
from qcompiler.runtime.onnx_export import to_onnx  # noqa: E402
from qcompiler.zoo import resnet20  # noqa: E402

EXPORTS = {  # name: (passes, bits, ONNX form)
    "custom asq+post 4-bit": ("asq,post", 4, "custom"),
    "custom lsq 4-bit": ("lsq", 4, "custom"),
    "qdq lsq 8-bit": ("lsq", 8, "qdq"),
}
TARGETS = {"custom asq+post 4-bit": 2.0, "qdq lsq 8-bit": 1.0}
SIZE_TARGET = 0.15


def float_model(model: torch.nn.Module) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(1, 3, 32, 32), f, dynamo=False, input_names=["x"],
                          output_names=["output"], dynamic_axes={"x": {0: "N"}, "output": {0: "N"}})
    return f.getvalue()


def exports() -> dict[str, bytes]:
    torch.manual_seed(0)
    calib = torch.randn(128, 3, 32, 32)
    files = {"float": float_model(resnet20())}
    for name, (passes, bits, fmt) in EXPORTS.items():
        torch.manual_seed(0)
        c = qcompiler.compile(resnet20(), qcompiler.QuantSpec(passes=passes, weight_bits=bits, act_bits=bits),
                              calib_data=calib)
        c.freeze()
        files[name] = to_onnx(c.module, fmt).SerializeToString(deterministic=True)
    return files


def latency(files: dict[str, bytes], batch: int, threads: int, rounds: int, runs: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean time (seconds) of ``runs`` calls, models in rotating order."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sessions = {k: ort.InferenceSession(v, opts, providers=["CPUExecutionProvider"]) for k, v in files.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    calls = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
    for call in calls.values():  # warm-up
        for _ in range(3):
            call()
    names, times = list(calls), {k: [] for k in calls}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(runs):
                calls[k]()
            times[k].append((time.perf_counter() - t) / runs)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # one intra-op thread by default: on a small shared machine onnxruntime's default pool (one
    # thread per core, spinning) made every model 2-4x slower and the timings noisy
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--append", action="store_true", help="add the table to the markdown file")
    args = ap.parse_args()
    files = exports()
    lines = [f"machine: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} cores visible to torch, "
             f"onnxruntime {ort.__version__}, intra-op threads {args.threads or 'default'}, "
             f"median of {args.rounds} rotating rounds", ""]
    lines += ["| export | bytes | x float | batch 1 ms | x float | batch 64 ms | x float | target |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    result = {b: latency(files, b, args.threads, args.rounds, 20 if b == 1 else 2) for b in (1, 64)}
    ok = True
    for k, data in files.items():
        size = len(data) / len(files["float"])
        r1, r64 = result[1][k] / result[1]["float"], result[64][k] / result[64]["float"]
        target = TARGETS.get(k)
        met = target is None or (r1 <= target and r64 <= target)
        ok &= met
        note = f"<= {target}x: {'met' if met else 'MISSED'}" if target else ""
        if k == "custom asq+post 4-bit" or k == "custom lsq 4-bit":
            note += f"; size <= {SIZE_TARGET}x: {'met' if size <= SIZE_TARGET else 'MISSED'}"
        lines.append(f"| {k} | {len(data)} | {size:.3f} | {1e3 * result[1][k]:.3f} | {r1:.2f} | "
                     f"{1e3 * result[64][k]:.2f} | {r64:.2f} | {note} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        old = args.markdown.read_text() if args.append and args.markdown.exists() else "# ONNX latency and size (bench/onnx_latency.py)\n"
        args.markdown.write_text(old + "\n" + text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
