"""``qcompiler.compile``: the one call from a float model to a compiled model."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from . import distributed
from .atomic import staged_folder
from .data import Dataset
from .errors import DataError, PipelineError, QCompileError, SpecError
from .frontend import trace
from .modelio import check_finite, non_finite
from .passes import REGISTRY, PassContext, PassManager, plan
from .passes.manager import NoChangeWarning
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

    ``ours`` is a glob pattern or a tuple of them (a plain file name matches itself).
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise QCompileError(f"{what} {str(path)!r} is a file; give a folder path")
    patterns = (ours,) if isinstance(ours, str) else ours
    for f in path.iterdir():
        mine = any(f.match(p) for p in patterns)
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

    def write_report(self, out_dir: str | Path, calib_data: object = None, program=None, **options):
        """Write the HTML report (``index.html`` and PNG figures) into ``out_dir``; see
        :func:`qcompiler.html_report.write_html_report`. The write is atomic.

        >>> compiled.write_report("runs/report", calib_data=data, program=compiled.lower())  # doctest: +SKIP
        """
        from .html_report import write_html_report  # matplotlib loads only when a report is drawn

        return write_html_report(self, out_dir, calib_data=calib_data, program=program, **options)

    @classmethod
    def load(cls, out_dir: str | Path, *, trust: bool = False) -> Compiled:
        """Read back what :meth:`save` wrote, records included.

        ``module.pt`` is a pickled ``GraphModule`` (its generated code travels with it),
        and unpickling runs code from the file: a tampered folder could run anything.
        So loading needs ``trust=True``, to be given only for folders you wrote.

        >>> c = Compiled.load("runs/resnet20-lsq4", trust=True)  # doctest: +SKIP
        """
        out = Path(out_dir)
        if not trust:
            raise QCompileError(
                f"Compiled.load({str(out)!r}) would unpickle module.pt, which runs code from the file; "
                "pass trust=True if you wrote this folder yourself"
            )
        if not out.is_dir():
            raise QCompileError(f"compiled folder {str(out)!r} does not exist; give the --out folder of a qcompile run")
        module = _load_trusted(out / "module.pt", fx.GraphModule)
        records = _load_trusted(out / "records.pt", dict)
        for node in module.graph.nodes:
            node.meta.update(records.get(node.name, {}))
        use_exact_eval(module)  # a module saved before the deployed numerics existed gets them too
        try:
            spec = QuantSpec.from_dict(json.loads((out / "spec.json").read_text()))
        except (OSError, ValueError) as e:
            raise QCompileError(f"{str(out / 'spec.json')!r} is missing or corrupt ({e}); save the model again") from None
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
        check_finite_state(self.module)
        self.freeze()
        with staged_folder(out) as tmp:
            torch.save(self.module, tmp / "module.pt")
            # Pickling a GraphModule drops node.meta; the records travel beside it.
            records = {n.name: ir.records(n) for n in self.module.graph.nodes if ir.records(n)}
            torch.save(records, tmp / "records.pt")
            (tmp / "spec.json").write_text(json.dumps(self.spec.to_dict(), indent=2) + "\n")
            (tmp / "report.txt").write_text(self.report.text() + "\n")
            for name, write in (artifacts or {}).items():
                assert name in ARTIFACT_FILES, name
                write(tmp / name)
        return out


def _load_trusted(path: Path, kind: type):
    try:
        obj = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise QCompileError(f"{str(path)!r} is missing; the folder is not a complete qcompile output") from None
    except Exception as e:  # a damaged pickle raises anything
        raise QCompileError(f"{str(path)!r} is truncated or corrupt ({type(e).__name__}); save the model again") from None
    if not isinstance(obj, kind):
        raise QCompileError(f"{str(path)!r} holds a {type(obj).__name__}, not a {kind.__name__}; save the model again")
    return obj


def check_finite_state(module: nn.Module) -> None:
    """Never save NaN or Inf: a diverged QAT run must fail loudly, not produce a broken model."""
    found = non_finite(module)
    if found:
        raise QCompileError(
            f"the compiled model's {found[0]!r} holds NaN or infinite values (QAT diverged?); nothing was saved; "
            "lower --lr or check the data for extreme values"
        )


def check_applicable(gm: fx.GraphModule, passes: Sequence, force: bool) -> None:
    """A pass asked for on a model without the layers it works on is a mistake (a wrong pipeline or model)."""
    for p in passes:
        kinds = type(p).needs_layers
        if kinds and not any(isinstance(m, kinds) for m in gm.modules()):
            what = " or ".join(k.__name__ for k in kinds)
            message = f"pass {p.name!r} works on {what} layers and this model has none"
            if not force:
                raise PipelineError(f"{message}; remove it from the passes, or force it (--force, force=True)")
            warnings.warn(f"{message}; it will change nothing", NoChangeWarning, stacklevel=3)


def check_overrides(gm: fx.GraphModule, spec: QuantSpec) -> None:
    """An override that matches no layer is almost always a typo: say so."""
    layers = ir.compute_layers(gm)
    for o in spec.overrides:
        if not any(o.matches(n.name, str(n.target)) for n in layers):
            names = ", ".join(n.name for n in layers[:4])
            raise SpecError(f"override pattern {o.pattern!r} matches no layer; patterns match node names ({names}, ...) or module paths")


def calibration_batches(
    calib_data: object, limit: int, seed: int = 0, ranks: distributed.Ranks = distributed.LOCAL
) -> list[torch.Tensor]:
    """Up to ``limit`` input batches from a Dataset, a tensor or an iterable of batches.

    A Dataset is the whole data set, so in a distributed compile the ranks share its
    first ``limit`` batches (at least one each) and together see what one process
    would; tensors and iterables are taken to be this rank's share already.
    """
    if calib_data is None:
        return []
    if isinstance(calib_data, Dataset):
        loader = calib_data.loader("train", batch_size=CALIB_BATCH_SIZE, shuffle=True, seed=seed)
        if ranks.distributed:
            first = itertools.islice(loader, max(limit, ranks.size))
            calib_data = distributed.shard(list(first), ranks)
        else:
            calib_data = loader
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
    for i, b in enumerate(batches[1:], start=2):
        if b.shape[1:] != batches[0].shape[1:] or b.dtype != batches[0].dtype:
            raise DataError(
                f"calibration batch {i} holds samples of shape {tuple(b.shape[1:])} ({b.dtype}), batch 1 of "
                f"{tuple(batches[0].shape[1:])} ({batches[0].dtype}); give batches of one sample shape and dtype"
            )
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
    force: bool = False,
    process_group: object = None,
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
        force: run passes that have nothing to work on in this model (adder passes on
            a model without adder layers) with a warning instead of refusing them.
        process_group: the ranks that compile together, each on its own share of
            ``calib_data``, reducing what calibration measures so that every rank's
            module is identical (:mod:`qcompiler.distributed`). ``None``: the default
            group when ``torch.distributed`` is initialised; ``False``: this process
            alone. Every rank of the group must call ``compile``.

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
    elif not isinstance(spec, QuantSpec):
        raise SpecError(
            f"spec must be a QuantSpec, a path to a .json/.toml spec or None, got {type(spec).__name__}; "
            "for a dict use QuantSpec.from_dict(...)"
        )
    if not isinstance(model, nn.Module):
        raise QCompileError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_finite(model, "the model")
    ranks = distributed.ranks(process_group)
    batches = calibration_batches(calib_data, spec.calib_batches, spec.seed, ranks)
    if example_inputs is None:
        if not batches:
            raise DataError("give example_inputs= or calib_data= so the model can be traced")
        # One sample is enough: records drop the batch dimension, and shape
        # propagation runs a real forward pass whose cost grows with the batch.
        example_inputs = (batches[0][:1],)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ctx = PassContext(spec=spec, example_inputs=tuple(example_inputs), calib_batches=batches, progress=progress, ranks=ranks)
    passes = plan(spec.passes, spec, ctx.provided(), REGISTRY)  # every check before any work

    start = time.perf_counter()
    gm = trace(model, ctx.example_inputs, spec.leaf_modules)
    trace_seconds = time.perf_counter() - start
    # Passes derive weight quantizers and adder groups from the weights: rank 0's, as DDP would use.
    distributed.broadcast_module(gm, ranks)
    check_overrides(gm, spec)
    check_applicable(gm, passes, force)
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
    distributed.check_identical(gm, ranks)
    report = build_report(gm, runs, trace_seconds, spec)
    warn_about_float(report, spec)
    return Compiled(gm, spec, report)


class FloatLayerWarning(UserWarning):
    """Layers with weights stayed in float, or no layer reached the requested width."""


def warn_about_float(report: CompileReport, spec: QuantSpec) -> None:
    """A "4-bit" compile must not hide that some (or all) weight layers are not at 4 bits."""
    left = [r for r in report.layers if r.float_reason]
    if left:
        names = ", ".join(f"{r.name} ({r.float_reason})" for r in left[:3])
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        warnings.warn(f"{len(left)} layer(s) with weights stay in float: {names}{more}; see the layer table",
                      FloatLayerWarning, stacklevel=3)
    requested = {spec.weight_bits, spec.act_bits}
    reached = [r for r in report.layers if r.weight_bits in requested or r.act_bits in requested]
    if report.layers and not reached:
        warnings.warn(f"no layer is at the requested W{spec.weight_bits}A{spec.act_bits}: every quantized layer is "
                      "pinned, overridden or in float; see the layer table", FloatLayerWarning, stacklevel=3)
