"""Pipeline planning and the pass manager.

``plan`` turns the user's pass names into an ordered list of pass instances and
checks it before any work is done: unknown names, conflicts and missing
prerequisites are one clear error each. ``PassManager.run`` then runs the plan and,
after every pass, lints and recompiles the graph, optionally verifies that it still
runs, times the pass and writes an IR dump.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from ..dump import write_dump
from ..errors import PassError, PipelineError, QCompileError
from ..nn.modes import training_mode
from ..spec import QuantSpec
from ..verify import verify_graph
from .base import CALIBRATION_DATA, Pass, PassContext


# Facts of passes that quantize activations; joins then need quantizing too.
QUANTIZING_FACTS = frozenset({"act-quant", "adder-quant"})


class NoChangeWarning(UserWarning):
    """A transform pass the user asked for changed nothing (e.g. adder passes, no adder layer)."""


@dataclass(frozen=True)
class PassRun:
    """What running one pass did, for reports."""

    name: str
    seconds: float
    modified: bool
    dump: Path | None
    pass_type: type[Pass]  # whose ``report_section`` the report asks


def _valid_names(registry: dict[str, type[Pass]]) -> str:
    return ", ".join(sorted(registry))


def plan(
    names: Sequence[str],
    spec: QuantSpec,
    provided: set[str],
    registry: dict[str, type[Pass]],
) -> list[Pass]:
    """Validate ``names`` and return the pass instances in the order they run."""
    seen: set[str] = set()
    for n in names:
        if n not in registry:
            raise PipelineError(f"unknown pass {n!r}; valid passes: {_valid_names(registry)}")
        if n in seen:
            raise PipelineError(f"pass {n!r} is listed twice; list each pass once")
        seen.add(n)
    chosen = list(names)
    if spec.pin_first_last and "pin-first-last" in registry and "pin-first-last" not in seen:
        chosen.insert(0, "pin-first-last")
    quantizes = any(registry[n].produces & QUANTIZING_FACTS for n in chosen)
    if spec.quantize_joins and quantizes and "quantize-joins" in registry and "quantize-joins" not in seen:
        chosen.append("quantize-joins")
    # products of two activations (attention) go on grids whenever activations do
    if spec.quantize_matmuls and quantizes and "quantize-matmuls" in registry and "quantize-matmuls" not in seen:
        chosen.append("quantize-matmuls")
    # each quantized layer's output mean moved back to float's, when there is data to measure it on
    corrects = any("weight-quant" in registry[n].produces for n in chosen)
    if spec.bias_correction and corrects and CALIBRATION_DATA in provided and "bias-correction" in registry \
            and "bias-correction" not in seen:
        chosen.append("bias-correction")
    if "freeze" in registry and "freeze" not in seen:
        chosen.append("freeze")
    for i, a in enumerate(chosen):
        for b in chosen[i + 1 :]:
            if b in registry[a].conflicts or a in registry[b].conflicts:
                raise PipelineError(f"passes {a!r} and {b!r} conflict ({registry[a].purpose}); keep one of them")
    ordered = sorted(chosen, key=lambda n: registry[n].stage)  # stable: user order within a stage

    # Walk the plan, inserting analyses that a later pass needs.
    have, result = set(provided), []
    for n in ordered:
        if registry[n].analysis and registry[n].produces <= have:
            continue  # already inserted for an earlier pass
        for fact in sorted(registry[n].requires - have):
            providers = [name for name, cls in sorted(registry.items()) if fact in cls.produces]
            provider = providers[0] if providers else None
            if fact == CALIBRATION_DATA:
                raise PipelineError(f"pass {n!r} needs calibration data; give --data (CLI) or calib_data= (API)")
            if provider is None or not registry[provider].analysis:
                one_of = " or ".join(repr(p) for p in providers)
                hint = f"add {one_of} before it, e.g. --passes {providers[-1]},{n}" if providers else "no pass produces it"
                raise PipelineError(f"pass {n!r} needs {fact!r} from an earlier pass; {hint}")
            missing = registry[provider].requires - have
            if CALIBRATION_DATA in missing:
                raise PipelineError(
                    f"pass {n!r} needs {provider!r}, which needs calibration data; give --data (CLI) or calib_data= (API)"
                )
            if missing:
                raise PipelineError(f"pass {n!r} needs {provider!r}, which needs {', '.join(sorted(missing))}; add the passes producing it")
            result.append(registry[provider].from_spec(spec))
            have |= registry[provider].produces
        result.append(registry[n].from_spec(spec))
        have |= registry[n].produces
    return result


class PassManager:
    """Runs planned passes with linting, verification, timing and IR dumps.

    Example:
        >>> from qcompiler.passes import REGISTRY
        >>> from qcompiler.spec import QuantSpec
        >>> spec = QuantSpec(passes=("lsq",))
        >>> [p.name for p in plan(spec.passes, spec, {"calibration-data"}, REGISTRY)]
        ['pin-first-last', 'observe', 'lsq', 'quantize-matmuls', 'quantize-joins', 'bias-correction', 'freeze']
    """

    def __init__(self, passes: Sequence[Pass], dump_dir: Path | None = None, verify: bool = False) -> None:
        self.passes = list(passes)
        self.dump_dir = dump_dir
        self.verify = verify

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRun]]:
        runs: list[PassRun] = []
        if self.dump_dir is not None:
            write_dump(gm, self.dump_dir, 0, "input", "traced input, before any pass")
        for i, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
                if self.verify:
                    verify_graph(gm)
                    _verify_runs(gm, ctx)
            except QCompileError:
                raise
            except Exception as e:
                before = ", ".join(r.name for r in runs) or "none"
                # fx appends the failing node's source on more lines; the user gets one (--debug shows all)
                reason = (str(e).strip().splitlines() or [""])[0]
                raise PassError(f"error in pass {p.name!r} after passes [{before}]: {type(e).__name__}: {reason}") from e
            seconds = time.perf_counter() - start
            if not result.modified and not p.analysis and not p.quiet_when_unchanged:
                warnings.warn(f"pass {p.name!r} found nothing to change in this model ({p.purpose})", NoChangeWarning, stacklevel=2)
            dump = None
            if self.dump_dir is not None:
                title = f"after pass {i}: {p.name} ({p.purpose}); modified={result.modified}"
                dump = write_dump(gm, self.dump_dir, i, p.name, title)
            runs.append(PassRun(p.name, seconds, result.modified, dump, type(p)))
        return gm, runs


def _verify_runs(gm: fx.GraphModule, ctx: PassContext) -> None:
    """The graph must still run on the example inputs and give finite outputs."""
    with training_mode(gm, False), torch.no_grad():
        out = gm(*ctx.example_inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all():
            raise AssertionError("graph produces non-finite values on the example inputs")
