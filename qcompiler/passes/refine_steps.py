"""``refine-steps``: each activation step chosen for the layers that read it, kept where the output agrees.

A step fitted to the tensor's own squared error weighs every feature alike, but the
layer reading it does not: its weights amplify some input features and ignore others.
After every quantizer is in place (and before bias correction):

  1. run the first ``REFINE_BATCHES`` calibration batches through the float model inside
     the graph, keeping each candidate quantizer's input (its first samples, up to
     ``INPUT_BYTES`` per quantizer: memory stays bounded on large models) and the
     network's output;
  2. for each activation quantizer read by quantized conv / linear layers, in graph
     order: try its step times each of ``FACTORS`` and take the one with the least squared
     error of those layers' outputs (float weights, float input as the reference);
  3. keep it only if the quantized network's output on the same batches gets closer to
     float's, else put the step back; record either way (``qc.refine``).

Errors are summed over the ranks before any choice, so every rank decides alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx

from .. import ir
from ..distributed import all_reduce_values
from ..nn.modes import training_mode
from ..nn.qat import float_forward
from .base import CALIBRATION_DATA, STAGE_CORRECT, Pass, PassContext, PassResult
from .calibrate import run_calibration, sample_keeper
from .rewrite import MULTIPLY_LAYERS

REFINE_BATCHES = 8  # calibration batches the errors are measured on (the default calib_batches)
INPUT_BYTES = 8 << 20  # float input kept per candidate quantizer
FACTORS = torch.linspace(0.6, 1.4, 33).tolist()  # step multipliers tried
UNCHANGED = FACTORS.index(1.0)  # exactly among them: the step as it is


def _readers(gm: fx.GraphModule, q: fx.Node) -> list[fx.Node]:
    """The quantized multiply layers reading quantizer ``q`` as their only input."""
    out = []
    for u in q.users:
        info = u.meta.get(ir.LAYER)
        if (info is not None and info.kind in MULTIPLY_LAYERS and ir.WEIGHT in u.meta and u.op == "call_module"
                and len(u.args) == 1 and not u.kwargs and float_forward(gm.get_submodule(u.target)) is not None):
            out.append(u)
    return out


def _squared(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().sum())


class RefineSteps(Pass):
    name = "refine-steps"
    purpose = "scale each activation step to the least error of the layers reading it, kept where the output gets closer to float"
    stage = STAGE_CORRECT  # every quantizer in place; bias correction (same stage, planned after) sees the result
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"refined-steps"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        candidates = {q: r for q in gm.graph.nodes if ir.ACT in q.meta and ir.REFINE not in q.meta
                      and (r := _readers(gm, q))}
        if not candidates:
            return PassResult(gm, False)
        batches = ctx.calib_batches[:REFINE_BATCHES]
        inputs: dict[str, list[torch.Tensor]] = {q.name: [] for q in candidates}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        float_out: list[torch.Tensor] = []

        watched = {k: sample_keeper(v, INPUT_BYTES) for k, v in inputs.items()} | {output.name: float_out.append}
        run_calibration(gm, batches, watched, "refine-steps", ctx.progress, float_=True)

        def total(values: list[float]) -> list[float]:
            return all_reduce_values(values, dist.ReduceOp.SUM, ctx.ranks)

        def output_error() -> float:
            with training_mode(gm, False), torch.no_grad():
                return total([sum(_squared(_first(gm(x)), _first(y)) for x, y in zip(batches, float_out))])[0]

        current = output_error()
        for q, readers in candidates.items():
            quantizer = gm.get_submodule(q.target)
            layers = [gm.get_submodule(r.target) for r in readers]
            ops = [(layer, float_forward(layer)) for layer in layers]
            xs = inputs[q.name]
            with training_mode(gm, False), torch.no_grad():
                refs = [[op(layer, x) for layer, op in ops] for x in xs]
                start = quantizer.step.detach().clone()

                def layer_error(factor: float) -> float:
                    quantizer.step.copy_(start * factor)
                    return sum(_squared(op(layer, quantizer(x)), ref) for x, rs in zip(xs, refs)
                               for (layer, op), ref in zip(ops, rs))

                errors = total([layer_error(f) for f in FACTORS])
                base = errors[UNCHANGED]
                best = min(range(len(FACTORS)), key=lambda i: errors[i])
                quantizer.step.copy_(start * FACTORS[best])
            trial = output_error() if errors[best] < base else current
            if trial < current:
                current_before, current = current, trial
                q.meta[ir.REFINE] = ir.StepRefinement(factor=FACTORS[best], layer_error=errors[best] / max(base, 1e-30),
                                                      output_error=trial / max(current_before, 1e-30))
            else:
                with torch.no_grad():
                    quantizer.step.copy_(start)
                q.meta[ir.REFINE] = ir.StepRefinement(factor=1.0, layer_error=1.0, output_error=1.0)
        return PassResult(gm, any(r.meta[ir.REFINE].factor != 1.0 for r in candidates))


def _first(y) -> torch.Tensor:
    """A model's output tensor (the first, for a tuple or list of them)."""
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


__all__ = ["FACTORS", "INPUT_BYTES", "REFINE_BATCHES", "RefineSteps"]
