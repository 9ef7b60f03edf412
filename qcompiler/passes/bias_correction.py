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
  2. in graph order, run the quantized graph up to each such layer, take the same
     mean, and add the difference (float minus quantized) to the layer's bias, or,
     for a layer without one, subtract it from the running mean of the batch norm
     that alone reads the layer; later layers are measured with the earlier
     corrections in place, so each corrects what is left;
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
from ..nn.modes import training_mode
from ..nn.qat import float_forward
from .base import CALIBRATION_DATA, STAGE_CORRECT, Pass, PassContext, PassResult
from .rewrite import MULTIPLY_LAYERS, call_sites


class _Reached(Exception):
    """Raised once the watched layer has run: the rest of the graph is not needed."""


class _MeanInterpreter(fx.Interpreter):
    """Runs the graph and sums each watched layer's output per channel.

    ``float_=True`` computes the float model inside the quantized graph: activation
    quantizers pass their input on and quantized layers use their float weights.
    ``stop_after`` ends the run once that node has been computed.
    """

    def __init__(self, gm: fx.GraphModule, watched: dict[str, int], float_: bool, stop_after: str | None = None) -> None:
        super().__init__(gm)
        self.watched, self.float_, self.stop_after = watched, float_, stop_after
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        if self.float_ and ir.ACT in n.meta:
            out = self.env[n.args[0]]
        elif self.float_ and n.op == "call_module" and ir.WEIGHT in n.meta:
            module = self.fetch_attr(n.target)
            forward = float_forward(module)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = forward(module, *args, **kwargs) if forward is not None else module(*args, **kwargs)
        else:
            out = super().run_node(n)
        axis = self.watched.get(n.name)
        if axis is not None:
            y = out.detach().double().movedim(axis, 0).flatten(1)
            self.sums[n.name] = self.sums.get(n.name, 0) + y.sum(1)
            self.counts[n.name] = self.counts.get(n.name, 0) + y.shape[1]
        if n.name == self.stop_after:
            raise _Reached
        return out


def channel_means(gm: fx.GraphModule, ctx: PassContext, watched: dict[str, int], float_: bool,
                  stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Per-channel output means of the ``watched`` layers (name -> channel axis) over the
    calibration batches (all ranks' together), float or quantized."""
    interp = _MeanInterpreter(gm, watched, float_, stop_after)
    with training_mode(gm, False), torch.no_grad():
        for x in ctx.calib_batches:
            try:
                interp.run(x)
            except _Reached:
                pass
    names = sorted(interp.sums)
    flat = [v for n in names for v in [*interp.sums[n].tolist(), float(interp.counts[n])]]
    flat = iter(all_reduce_values(flat, dist.ReduceOp.SUM, ctx.ranks))
    means = {}
    for n in names:
        sums = torch.tensor([next(flat) for _ in range(interp.sums[n].numel())], dtype=torch.float64)
        means[n] = sums / max(next(flat), 1.0)
    return means


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
        reference = channel_means(gm, ctx, {n.name: output_axis(n) for n in targets}, float_=True)
        for layer, (kind, module, bn_node) in targets.items():
            quantized = channel_means(gm, ctx, {layer.name: output_axis(layer)}, float_=False, stop_after=layer.name)
            shift = reference[layer.name] - quantized[layer.name]
            with torch.no_grad():
                if kind == "bias":
                    module.bias.add_(shift.to(module.bias.dtype))
                else:
                    module.running_mean.sub_(shift.to(module.running_mean.dtype))
            rms = math.sqrt(float((shift**2).mean()))
            layer.meta[ir.BIAS] = ir.BiasCorrection(kind, rms, bn_node.name if bn_node is not None else "")
        return PassResult(gm, True)
