"""``qcompiler.compile``: the one call from a float model to a compiled model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .data import Dataset
from .errors import DataError, QCompileError, SpecError
from .frontend import trace
from .passes import REGISTRY, PassContext, PassManager, plan
from . import ir
from .nn.exact import use_exact_eval
from .passes.freeze import freeze
from .verify import verify_graph
from .report import CompileReport, build_report
from .spec import QuantSpec

CALIB_BATCH_SIZE = 64
SAVED_FILES = ("module.pt", "records.pt", "spec.json", "report.txt")
# Backend products that ``save`` may write beside them (``artifacts=``).
ARTIFACT_FILES = ("program.npz", "model.onnx")


def check_replaceable(path: Path, ours: tuple[str, ...] | str, what: str) -> None:
    """Refuse to replace a folder that holds anything but our own outputs.

    ``ours`` is a tuple of file names or a glob pattern.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise QCompileError(f"{what} {str(path)!r} is a file; give a folder path")
    for f in path.iterdir():
        mine = f.match(ours) if isinstance(ours, str) else f.name in ours
        if not (f.is_file() and mine):
            raise QCompileError(f"{what} {str(path)!r} exists and holds other files ({f.name}); choose a new folder")


@dataclass
class Compiled:
    """A compiled model: the fake-quant GraphModule, its spec and its report.

    ``module`` trains (QAT) and evaluates like the deployed model; its graph carries
    every quantization record (see :mod:`qcompiler.ir`).
    """

    module: fx.GraphModule
    spec: QuantSpec
    report: CompileReport

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)

    def freeze(self) -> None:
        """Write the current steps, weight codes and adapters into the records, and check them.

        Training moves weights, steps and adapters; saving, reporting and the
        backends call this first so none of them reads a stale value.
        """
        freeze(self.module)
        verify_graph(self.module, final=True)

    def lower(self):
        """The integer program of this model (:mod:`qcompiler.runtime`); freezes and verifies first.

        >>> program = compiled.lower()  # doctest: +SKIP
        >>> logits = program.run(x.numpy())  # doctest: +SKIP
        """
        from .runtime import lower  # the backend imports this module's peers

        return lower(self)

    def export_onnx(self, path: str | Path, format: str = "custom") -> Path:  # noqa: A002 - the issue's name
        """Write this model as ONNX (:mod:`qcompiler.runtime.onnx_export`); freezes and verifies first.

        ``format`` is ``"custom"`` (our ``qcompiler`` ops, every scheme) or ``"qdq"``
        (standard QuantizeLinear/DequantizeLinear, uniform schemes). The write is atomic.

        >>> compiled.export_onnx("model.onnx")  # doctest: +SKIP
        """
        from .runtime.onnx_export import export_onnx

        return export_onnx(self, path, format)

    def verify_onnx(self, path: str | Path, x: torch.Tensor, batch_size: int = 64):
        """Run the exported file in onnxruntime and this module on ``x``: max |diff| over the output range, classes.

        >>> compiled.verify_onnx("model.onnx", data.x_test).ok()  # doctest: +SKIP
        True
        """
        from .runtime.onnx_export import onnx_parity

        self.freeze()
        return onnx_parity(self, path, x, batch_size)

    @classmethod
    def load(cls, out_dir: str | Path) -> Compiled:
        """Read back what :meth:`save` wrote, records included (unpickles: trusted files only)."""
        out = Path(out_dir)
        module = torch.load(out / "module.pt", weights_only=False)
        records = torch.load(out / "records.pt", weights_only=False)
        for node in module.graph.nodes:
            node.meta.update(records.get(node.name, {}))
        use_exact_eval(module)  # a module saved before the deployed numerics existed gets them too
        spec = QuantSpec.from_dict(json.loads((out / "spec.json").read_text()))
        # No pass ran in this process: the rebuilt report has layers but no pass sections.
        return cls(module, spec, build_report(module, [], 0.0, spec))

    def save(self, out_dir: str | Path, artifacts: dict[str, Callable[[Path], object]] | None = None) -> Path:
        """Write ``module.pt``, ``records.pt``, ``spec.json`` and ``report.txt`` into ``out_dir``.

        ``artifacts`` maps more file names (``program.npz``, ``model.onnx``) to
        functions that write that file. Everything is written to a temporary folder
        first and moved into place, so a failure never leaves a half-written output.
        """
        out = Path(out_dir)
        check_replaceable(out, SAVED_FILES + ARTIFACT_FILES, "output folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.freeze()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            torch.save(self.module, tmp / "module.pt")
            # Pickling a GraphModule drops node.meta; the records travel beside it.
            records = {n.name: ir.records(n) for n in self.module.graph.nodes if ir.records(n)}
            torch.save(records, tmp / "records.pt")
            (tmp / "spec.json").write_text(json.dumps(self.spec.to_dict(), indent=2) + "\n")
            (tmp / "report.txt").write_text(self.report.text() + "\n")
            for name, write in (artifacts or {}).items():
                assert name in ARTIFACT_FILES, name
                write(tmp / name)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def check_overrides(gm: fx.GraphModule, spec: QuantSpec) -> None:
    """An override that matches no layer is almost always a typo: say so."""
    layers = ir.compute_layers(gm)
    for o in spec.overrides:
        if not any(o.matches(n.name, str(n.target)) for n in layers):
            names = ", ".join(n.name for n in layers[:4])
            raise SpecError(f"override pattern {o.pattern!r} matches no layer; patterns match node names ({names}, ...) or module paths")


def calibration_batches(calib_data: object, limit: int, seed: int = 0) -> list[torch.Tensor]:
    """Up to ``limit`` input batches from a Dataset, a tensor or an iterable of batches."""
    if calib_data is None:
        return []
    if isinstance(calib_data, Dataset):
        calib_data = calib_data.loader("train", batch_size=CALIB_BATCH_SIZE, shuffle=True, seed=seed)
    if isinstance(calib_data, torch.Tensor):
        batches = list(calib_data.split(CALIB_BATCH_SIZE))[:limit]
    elif isinstance(calib_data, Iterable):
        batches = []
        for item in calib_data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise DataError(f"calibration data yields {type(x).__name__}, not tensors; yield tensors or (x, y) pairs")
            batches.append(x)
            if len(batches) >= limit:
                break
    else:
        raise DataError(f"calib_data of type {type(calib_data).__name__} is not supported; give a tensor, a Dataset or an iterable of batches")
    if not batches or batches[0].numel() == 0:
        raise DataError("calibration data is empty; give at least one batch")
    return batches


def compile(  # noqa: A001 - the natural name for the entry point
    model: nn.Module,
    spec: QuantSpec | str | Path | None = None,
    *,
    calib_data: object = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    dump_ir: str | Path | None = None,
    verify: bool | None = None,
    progress: bool = False,
) -> Compiled:
    """Compile a float ``model`` into a fake-quant model; the model itself is not modified.

    Args:
        model: the trained float model.
        spec: a :class:`QuantSpec`, a path to a JSON/TOML spec, or ``None`` (LSQ 4-bit).
        calib_data: a :class:`~qcompiler.data.Dataset`, a tensor, or an iterable of
            batches (tensors or ``(x, y)`` pairs); calibration passes read it.
        example_inputs: inputs used for tracing and shape propagation; defaults to
            the first calibration batch.
        dump_ir: folder for the per-pass IR dumps (text and DOT).
        verify: check the IR rules and run the graph after each pass (outputs finite);
            ``None`` reads the ``QCOMPILER_VERIFY`` environment variable (the tests set it).

    Example:
        >>> import qcompiler
        >>> from qcompiler.data import load_digits
        >>> from qcompiler.zoo import plain_cnn
        >>> c = qcompiler.compile(plain_cnn(), QuantSpec(passes="lsq", weight_bits=4, act_bits=4),
        ...                       calib_data=load_digits())
        >>> c.report.layers[1].weight_bits, c.report.layers[0].weight_bits
        (4, 8)
    """
    if spec is None:
        spec = QuantSpec()
    elif isinstance(spec, (str, Path)):
        spec = QuantSpec.load(spec)
    batches = calibration_batches(calib_data, spec.calib_batches, spec.seed)
    if example_inputs is None:
        if not batches:
            raise DataError("give example_inputs= or calib_data= so the model can be traced")
        # One sample is enough: records drop the batch dimension, and shape
        # propagation runs a real forward pass whose cost grows with the batch.
        example_inputs = (batches[0][:1],)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ctx = PassContext(spec=spec, example_inputs=tuple(example_inputs), calib_batches=batches, progress=progress)
    passes = plan(spec.passes, spec, ctx.provided(), REGISTRY)  # every check before any work

    start = time.perf_counter()
    gm = trace(model, ctx.example_inputs, spec.leaf_modules)
    trace_seconds = time.perf_counter() - start
    check_overrides(gm, spec)
    if verify is None:
        verify = os.environ.get("QCOMPILER_VERIFY", "") not in ("", "0")
    manager = PassManager(passes, dump_dir=Path(dump_ir) if dump_ir is not None else None, verify=verify)
    # eval-mode batch norm and pooling as the ONNX file computes them, before the passes so that
    # calibration sees the numerics a rerun would; again after, to link each batch norm to the
    # quantized layer that folds it
    use_exact_eval(gm)
    gm, runs = manager.run(gm, ctx)
    use_exact_eval(gm)
    gm.eval()
    verify_graph(gm, final=True)
    return Compiled(gm, spec, build_report(gm, runs, trace_seconds, spec))
