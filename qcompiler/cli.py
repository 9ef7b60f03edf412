"""``qcompile``: the command line front of :func:`qcompiler.compile`.

    qcompile model.pt --passes asq,post --bits 4 --data digits --train-epochs 3 --out runs/m

Every problem with the input is one line on stderr (``qcompile: error: ...``) and
exit status 2, with no traceback (``--debug`` shows it) and no partial output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from .atomic import staged_folder
from .api import ARTIFACT_FILES, SAVED_FILES, check_replaceable
from .errors import DataError, QCompileError, SpecError
from .spec import INITS, QuantSpec, check_bits, parse_pass_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other error
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


BUILT_IN_DATA = ("digits", "digits-hard")
DUMP_FILES = "[0-9][0-9]_*.*"  # what --dump-ir writes: 00_input.txt, 01_pin-first-last.dot, ...


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description="Compile a float PyTorch model into a low-bit model.")
    p.add_argument("model", help="float model: a qcompiler checkpoint, a state_dict (with --arch), or a pickle (with --allow-pickle)")
    p.add_argument("--arch", help="architecture of a state_dict, as package.module:factory (e.g. qcompiler.zoo:resnet20)")
    p.add_argument("--arch-kwargs", default="{}", help='JSON keyword arguments for --arch, e.g. \'{"in_channels": 1}\'')
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a whole pickled module (runs code from the file)")
    p.add_argument("--spec", help="QuantSpec file (.json or .toml); flags below override it")
    p.add_argument("--passes", help="comma-separated pass names, e.g. lsq or asq,post")
    p.add_argument("--bits", type=int, help="bit width of weights and activations")
    p.add_argument("--weight-bits", type=int, help="bit width of weights (overrides --bits)")
    p.add_argument("--act-bits", type=int, help="bit width of activations (overrides --bits)")
    p.add_argument("--no-pin", action="store_true", help="do not hold the first and last layers at 8 bits")
    p.add_argument("--residual-bits", type=int, help="bit width of the residual stream: residual adds and concats (default: 8)")
    p.add_argument("--asymmetric-acts", action="store_true",
                   help="give activations with a thin negative tail (hardswish, SiLU, GELU outputs) an asymmetric grid "
                        "with a zero point where that loses less than the signed or unsigned one")
    p.add_argument("--per-channel-joins", action="store_true",
                   help="one step per channel for a residual add's operand that is a batch norm's output "
                        "(the join's requantization carries the per-channel scales)")
    p.add_argument("--init", choices=list(INITS),
                   help="how steps and clips start: mse (least squared error on the calibration data; default), "
                        "percentile (99.99th of |x|), lsq (LSQ's 2 mean|x| / sqrt(p), a QAT start) or max (no clipping)")
    p.add_argument("--float-multiply", action="store_true",
                   help="adder pipelines: keep the multiply layers (stem, 1x1 shortcuts, classifier) in float, as the AdderNet papers' tables do")
    p.add_argument("--leaf", action="append", default=[], help="package.module:Class the tracer keeps opaque (repeatable)")
    p.add_argument("--data", default="digits", help="digits or digits-hard (built in; digits-hard: 16x16 warped, occluded, noisy digits) or a .npz file with x and y (default: digits)")
    p.add_argument("--train-epochs", type=int, default=0, help="QAT epochs after compiling (default: 0)")
    p.add_argument("--lr", type=float, default=0.01, help="QAT learning rate (default: 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="QAT batch size (default: 64)")
    p.add_argument("--seed", type=int, help="seed for calibration order, ASQ adapter initialisation and QAT (default: 0)")
    p.add_argument("--emit", action="append", default=[], choices=["int", "onnx"],
                   help="also produce a backend form (repeatable): int = the integer program (program.npz in --out; "
                        "prints its costs), onnx = model.onnx in --out")
    p.add_argument("--onnx-format", default="custom", choices=["custom", "qdq"],
                   help="custom: our qcompiler ops with standard-op function bodies (every scheme, default); "
                        "qdq: QuantizeLinear/DequantizeLinear for onnxruntime's int8 kernels (uniform schemes)")
    p.add_argument("--verify-onnx", action="store_true",
                   help="export, run the file in onnxruntime and the fake-quant module on the test set, print their agreement")
    p.add_argument("--verify-int", action="store_true",
                   help="run the integer program and the fake-quant module on the test set and print their agreement per layer")
    p.add_argument("--out", help="folder to write the compiled module, spec and report into")
    p.add_argument("--dump-ir", help="folder for the IR dump after every pass (text and DOT)")
    p.add_argument("--report", help="folder for an HTML report: per-layer histograms of weights and activations with "
                                    "the chosen levels, ASQ's beta, the bit map, float regions, costs (with --emit int)")
    p.add_argument("--force", action="store_true",
                   help="run passes that have nothing to work on in this model (e.g. adder passes without adder layers) instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="verify the graph after every pass and show tracebacks")
    return p


def _spec_from_args(args: argparse.Namespace) -> QuantSpec:
    spec = QuantSpec.load(args.spec) if args.spec else QuantSpec()
    changes: dict[str, object] = {}
    if args.passes is not None:
        changes["passes"] = parse_pass_names(args.passes)
    if args.bits is not None:
        check_bits(args.bits, "--bits")
        changes["weight_bits"] = changes["act_bits"] = args.bits
    if args.weight_bits is not None:
        changes["weight_bits"] = check_bits(args.weight_bits, "--weight-bits")
    if args.act_bits is not None:
        changes["act_bits"] = check_bits(args.act_bits, "--act-bits")
    if args.no_pin:
        changes["pin_first_last"] = False
    if args.residual_bits is not None:
        changes["residual_bits"] = check_bits(args.residual_bits, "--residual-bits")
    if args.asymmetric_acts:
        changes["asymmetric_acts"] = True
    if args.per_channel_joins:
        changes["per_channel_joins"] = True
    if args.init is not None:
        changes["init"] = args.init
    if args.float_multiply:
        changes["adder_multiply_bits"] = None
    if args.leaf:
        changes["leaf_modules"] = tuple(args.leaf)
    if args.seed is not None:
        changes["seed"] = args.seed
    return spec.replace(**changes) if changes else spec


def _check_writable(path: str, flag: str) -> None:
    """Fail before any work if ``path`` (a folder to create) cannot be written."""
    p = Path(path)
    if p.is_symlink():
        raise QCompileError(f"{flag} {path!r} is a symbolic link; give the real folder ({os.path.realpath(p)!r}) or a new one")
    if p.exists() and not p.is_dir():
        raise QCompileError(f"{flag} {path!r} is a file; give a folder path")
    parent = p if p.exists() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QCompileError(f"{flag} {path!r} lies under the file {str(parent)!r}; give a folder path")
    if not os.access(parent, os.W_OK):
        raise QCompileError(f"{flag} {path!r} is not writable; choose a folder you can write to")


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies under it (both resolved, so ``a/../b`` and links count)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _check_paths(args: argparse.Namespace) -> None:
    """Outputs never replace, hold or nest inside an input or each other."""
    from .html_report import REPORT_FILES  # the report's own files; matplotlib is not imported here

    for flag, value in (("MODEL", args.model), ("--spec", args.spec), ("--data", args.data),
                        ("--out", args.out), ("--dump-ir", args.dump_ir), ("--report", args.report)):
        if value is not None and not value.strip():
            raise QCompileError(f"{flag} is an empty path; give a file or folder name")
    inputs = [("the model", args.model)]
    inputs += [("the spec", args.spec)] if args.spec else []
    inputs += [("the data", args.data)] if args.data and args.data not in BUILT_IN_DATA else []
    ours = {"--out": SAVED_FILES + ARTIFACT_FILES, "--dump-ir": DUMP_FILES, "--report": REPORT_FILES}
    outputs = [(flag, value) for flag, value in (("--out", args.out), ("--dump-ir", args.dump_ir),
                                                 ("--report", args.report)) if value]
    for flag, out in outputs:
        _check_writable(out, flag)
        for what, src in inputs:
            if _within(Path(src), Path(out)):
                raise QCompileError(f"{flag} {out!r} holds {what} {src!r}, which writing it would destroy; choose another folder")
    for i, (flag, out) in enumerate(outputs):
        for other_flag, other in outputs[i + 1:]:
            if _within(Path(out), Path(other)) or _within(Path(other), Path(out)):
                raise QCompileError(f"{flag} {out!r} and {other_flag} {other!r} overlap; give them separate folders")
    for flag, out in outputs:
        check_replaceable(Path(out), ours[flag], flag)
        if Path(out).is_dir() and any(Path(out).iterdir()):
            warnings.warn(f"{flag} {out!r} holds an earlier run's output; it will be replaced")


def _check_training_flags(args: argparse.Namespace) -> None:
    from .train import check_hyperparameters

    check_hyperparameters({"epochs": "--train-epochs", "lr": "--lr", "batch_size": "--batch-size"},
                          epochs=args.train_epochs, lr=args.lr, batch_size=args.batch_size)


def check_labels(module, data) -> None:
    """Labels must index the model's outputs: checked on the traced model, before any training."""
    import torch

    with torch.no_grad():
        out = module(data.x_test[:1])
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return  # not a classifier: accuracy is not reported against these labels
    classes = out.shape[1]
    top = int(max(data.y_train.max(), data.y_test.max()))
    if top >= classes:
        raise DataError(f"the data has labels up to {top} but the model has {classes} outputs; "
                        f"give data with labels 0..{classes - 1} or a model with {top + 1} outputs")


def run(args: argparse.Namespace) -> int:
    # Imported here: data loading pulls in scikit-learn, which argument errors never need.
    from .data import fit_to_model, load_data
    from .modelio import load_model

    spec = _spec_from_args(args)
    _check_paths(args)
    _check_training_flags(args)
    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as e:
        raise SpecError(f"--arch-kwargs is not valid JSON ({e}); write e.g. '{{\"in_channels\": 1}}'") from None
    if not isinstance(arch_kwargs, dict):
        raise SpecError("--arch-kwargs must be a JSON object, e.g. '{\"in_channels\": 1}'")

    data = load_data(args.data)
    model = load_model(args.model, args.arch, arch_kwargs, allow_pickle=args.allow_pickle)
    data = fit_to_model(data, model)
    progress = not args.quiet and sys.stderr.isatty()

    # Staged beside the destination and moved in only when everything else succeeded.
    with staged_folder(Path(args.dump_ir)) if args.dump_ir else contextlib.nullcontext() as dump_tmp:
        _compile_train_report(args, spec, data, model, dump_tmp, progress)
    return 0


def _applied(compiled) -> str:
    """What the compile actually did, from the report (not from the flags asked)."""
    layers = compiled.report.layers
    quantized = [r for r in layers if r.weight_bits is not None or r.act_bits is not None]
    if not quantized:
        return "no layer quantized"
    widths = sorted({(r.weight_bits, r.act_bits) for r in quantized if not r.pinned}, key=str)
    pinned = sorted({(r.weight_bits, r.act_bits) for r in quantized if r.pinned}, key=str)
    fmt = lambda wa: f"W{wa[0] if wa[0] is not None else '(float)'}A{wa[1] if wa[1] is not None else '(float)'}"  # noqa: E731
    text = ", ".join(fmt(wa) for wa in widths) or "-"
    if pinned:
        text += f"; first/last at {', '.join(fmt(wa) for wa in pinned)}"
    floats = len(layers) - len(quantized)
    return text + (f"; {floats} layer(s) in float" if floats else "")


def _compile_train_report(args, spec, data, model, dump_tmp, progress) -> None:
    from . import compile as qcompile_model
    from .train import TrainConfig, evaluate, train

    compiled = qcompile_model(
        model, spec, calib_data=data, dump_ir=dump_tmp, verify=args.debug, progress=progress, force=args.force
    )
    check_labels(compiled.module, data)
    float_acc = evaluate(model, data)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} ({n_params / 1e6:.3f} M params); data: {args.data} "
          f"({len(data.y_train)} train / {len(data.y_test)} test)")
    print(f"passes: {','.join(spec.passes)}; {_applied(compiled)}\n")
    print(compiled.report.text() + "\n")  # layers, passes, and each pass's own section
    print(f"float accuracy:           {float_acc:6.2f} %")
    print(f"quantized, before QAT:    {evaluate(compiled.module, data):6.2f} %")
    if args.train_epochs:
        config = TrainConfig(epochs=args.train_epochs, lr=args.lr, batch_size=args.batch_size, seed=spec.seed)
        train(compiled.module, data, config, progress=progress)
        acc = evaluate(compiled.module, data)
        print(f"quantized, after {args.train_epochs} QAT epoch(s): {acc:6.2f} %  ({acc - float_acc:+.2f} vs float)")
        compiled.freeze()
    if args.dump_ir:
        print(f"IR dumps: {args.dump_ir}")
    artifacts = {}
    program = None
    if "int" in args.emit or args.verify_int:
        program = compiled.lower()
        x = data.x_test.numpy()
        if "int" in args.emit:
            print("\nInteger program (costs per test sample):")
            print(program.costs(x[:1]).text())
            artifacts["program.npz"] = program.save
        if args.verify_int:
            print("\nInteger program vs fake-quant module (float64), test set:")
            print(program.verify(compiled, x).text())
    if "onnx" in args.emit or args.verify_onnx:
        onnx_tmp = Path(tempfile.mkdtemp(prefix="qcompile-onnx-")) / "model.onnx"
        try:
            compiled.export_onnx(onnx_tmp, format=args.onnx_format)
            if args.verify_onnx:
                print("\n" + compiled.verify_onnx(onnx_tmp, data.x_test).text())
            if "onnx" in args.emit:
                artifacts["model.onnx"] = lambda path, src=onnx_tmp.read_bytes(): path.write_bytes(src)
                print(f"\nONNX ({args.onnx_format} form): {onnx_tmp.stat().st_size} bytes")
        finally:
            shutil.rmtree(onnx_tmp.parent, ignore_errors=True)
    if args.out:
        compiled.save(args.out, artifacts)
        print(f"wrote {args.out}/ ({', '.join([*SAVED_FILES, *artifacts])})")
    if args.report:
        page = compiled.write_report(args.report, calib_data=data, program=program, progress=progress)
        print(f"report: {page.page} ({len(page.figures)} figures)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, *rest, **kw) -> None:
        print(f"qcompile: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        return run(args)
    except QCompileError as e:
        if args.debug:
            raise
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a vanished folder, a permission change mid-run
        if args.debug:
            raise
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"qcompile: error: cannot read or write{where}: {e.strerror or e}; free space or choose another "
              "folder (nothing was written)", file=sys.stderr)
        return 2
    except Exception as e:  # our bug, not the user's: say so in one line
        if args.debug:
            raise
        reason = (str(e).strip().splitlines() or [""])[0]
        print(f"qcompile: internal error: {type(e).__name__}: {reason}; rerun with --debug for the traceback "
              "and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
