"""``bias-correction``: take out the mean shift that quantization adds to each layer's output.

Rounding and clipping errors do not average out over a channel: a clipped tail, a
weight channel whose codes happen to round up, a ReLU output whose small values land
on zero all move the mean of a layer's output, and a later layer (or the logits)
sees that shift as a systematic error. Empirical bias correction (Nagel et al., "Data-
Free Quantization Through Weight Equalization and Bias Correction", 2019, measured
here on the calibration data instead of derived from batch-norm statistics) moves it
back, once every quantizer is in place:

  1. run the calibration batches through the graph in float (quantizer nodes pass
     their input on, quantized layers compute with their float weights) and keep the
     mean of every quantized conv / linear output per output channel;
  2. run the quantized graph on the batches at once, node by node (as many as fit in
     :data:`LOCKSTEP_BYTES` of live activations, the float means then taken over the
     same ones: all of them unless the model is large); at each such
     layer take the same mean, and add the difference (float minus quantized) to the
     layer's bias, or, for a layer without one, subtract it from the running mean of
     the batch norm that alone reads the layer, before the nodes after it run; later
     layers are so measured with the earlier corrections in place, and each corrects
     what is left (one pass over the graph, however deep);
  3. record the shift on the layer (``qc.bias``).

Only parameters change, so the freeze records, the integer program and the ONNX
files carry the correction (a batch norm's running mean is folded into the layer's
bias there). A layer with neither a bias nor such a batch norm, or whose module or
batch norm is called at several sites, keeps its output as it is. In a distributed
compile the means are summed over the ranks first, so every rank shifts alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .. import ir
from ..distributed import all_reduce_values
from ..nn.exact import bn_link
from .base import CALIBRATION_DATA, STAGE_CORRECT, Pass, PassContext, PassResult
from .calibrate import Lockstep, run_calibration
from .rewrite import MULTIPLY_LAYERS, call_sites


def _reduced_means(sums: dict[str, torch.Tensor], counts: dict[str, int], ranks) -> dict[str, torch.Tensor]:
    """``sums / counts`` per name, both summed over the ranks first."""
    names = sorted(sums)
    flat = [v for n in names for v in [*sums[n].tolist(), float(counts[n])]]
    flat = iter(all_reduce_values(flat, dist.ReduceOp.SUM, ranks))
    means = {}
    for n in names:
        total = torch.tensor([next(flat) for _ in range(sums[n].numel())], dtype=torch.float64)
        means[n] = total / max(next(flat), 1.0)
    return means


def _channel_sum(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    y = y.detach().double().movedim(axis, 0).flatten(1)
    return y.sum(1), y.shape[1]


LOCKSTEP_BYTES = 2 << 30  # activations the quantized run may hold for all its batches at once


def float_channel_means(gm: fx.GraphModule, ctx: PassContext, watched: dict[str, int]) -> tuple[dict[str, torch.Tensor], int]:
    """Per-channel output means of the ``watched`` layers (name -> channel axis) in the float
    model (all ranks' together), and how many calibration batches they cover: the first
    ones, as many as the quantized run can hold at once within :data:`LOCKSTEP_BYTES`
    (at least one), so that both sides measure the same images."""
    sums: dict[str, list[torch.Tensor]] = {n: [] for n in watched}
    counts: dict[str, list[int]] = {n: [] for n in watched}

    def watcher(name: str, axis: int):
        def add(y: torch.Tensor) -> None:
            total, count = _channel_sum(y, axis)
            sums[name].append(total)
            counts[name].append(count)
        return add

    peak = run_calibration(gm, ctx.calib_batches, {n: watcher(n, axis) for n, axis in watched.items()},
                           "bias-correction (float)", ctx.progress, float_=True)
    batches = max(1, min(len(ctx.calib_batches), LOCKSTEP_BYTES // max(peak, 1)))
    means = _reduced_means({n: sum(v[:batches]) for n, v in sums.items() if v},
                           {n: sum(v[:batches]) for n, v in counts.items() if v}, ctx.ranks)
    return means, batches


def correction_target(gm: fx.GraphModule, layer: fx.Node) -> tuple[str, nn.Module, fx.Node | None] | None:
    """Where ``layer``'s output shift can go: ``("bias", layer module, None)``, ``("batch-norm",
    batch norm, its node)`` for the batch norm that alone reads it, or None.

    None too for a layer already linked to its batch norm (:func:`qcompiler.nn.exact.bn_link`,
    which compile does after the passes): its eval output has the batch norm folded in, so
    its quantized and float outputs are not on one scale here."""
    module = gm.get_submodule(layer.target)
    if len(call_sites(layer)) > 1 or bn_link(module) is not None:
        return None
    if getattr(module, "bias", None) is not None:
        return "bias", module, None
    users = list(layer.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = gm.get_submodule(users[0].target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None or len(call_sites(users[0])) > 1:
        return None
    return "batch-norm", bn, users[0]


def output_axis(layer: fx.Node) -> int:
    """The channel axis of a layer's output: last for linear, 1 for convolutions."""
    return -1 if ir.get(layer, ir.LAYER, ir.LayerInfo).kind == "linear" else 1


class BiasCorrection(Pass):
    name = "bias-correction"
    purpose = "shift each quantized layer's bias so its output mean matches float on the calibration data"
    stage = STAGE_CORRECT
    requires = frozenset({CALIBRATION_DATA, "weight-quant"})
    produces = frozenset({"bias-correction"})
    quiet_when_unchanged = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = [n for n in ir.compute_layers(gm) if n.op == "call_module" and ir.WEIGHT in n.meta
                  and ir.BIAS not in n.meta and ir.get(n, ir.LAYER, ir.LayerInfo).kind in MULTIPLY_LAYERS]
        targets = {n: t for n in layers if (t := correction_target(gm, n)) is not None}
        if not targets:
            return PassResult(gm, False)
        reference, batches = float_channel_means(gm, ctx, {n.name: output_axis(n) for n in targets})
        # the quantized graph on those calibration batches at once, node by node: each layer is
        # measured with every earlier correction in place, in one pass over the graph
        run = Lockstep(gm, ctx.calib_batches[:batches])
        for node in run.nodes():
            if node not in targets or node.name not in reference:
                continue
            kind, module, bn_node = targets[node]
            parts = [_channel_sum(y, output_axis(node)) for y in run.outputs(node)]
            quantized = _reduced_means({node.name: sum(p[0] for p in parts)}, {node.name: sum(p[1] for p in parts)}, ctx.ranks)
            shift = reference[node.name] - quantized[node.name]
            if kind == "bias":
                module.bias.add_(shift.to(module.bias.dtype))
                run.rerun(node)  # the layers after it read the corrected output
            else:
                module.running_mean.sub_(shift.to(module.running_mean.dtype))  # its batch norm runs next
            rms = math.sqrt(float((shift**2).mean()))
            node.meta[ir.BIAS] = ir.BiasCorrection(kind, rms, bn_node.name if bn_node is not None else "")
        return PassResult(gm, True)
