"""``lsq``: uniform learned-step quantizers for weights and activations.

The uniform baseline (LSQ, DESIGN.md §3.1). Every conv / linear layer gets an
unsigned (or, when calibration saw negative inputs, signed) per-tensor quantizer on
its input and a signed per-output-channel quantizer on its weight, both initialised
as ``2 * mean|x| / sqrt(p)``. Adder layers are left to the adder passes, since a
uniform grid per side does not factor out of ``|x - w|``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from .. import ir
from ..quantizers import UniformQuantizer
from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .rewrite import act_quantizer_name, input_quantizer, layer_bits, set_act_quantizer, set_weight_quantizer

MULTIPLY_LAYERS = ("conv1d", "conv2d", "linear")

# (layer node, its LayerInfo, activation bits, observed input range) -> (quantizer, method name)
ActQuantizerFactory = Callable[[fx.Node, ir.LayerInfo, int, ir.TensorRange], tuple[nn.Module, str]]


def quantize_weight_uniform(gm: fx.GraphModule, layer: fx.Node, bits: int) -> None:
    """Per-output-channel LSQ on ``layer``'s weight."""
    info = ir.get(layer, ir.LAYER, ir.LayerInfo)
    weight = gm.get_submodule(layer.target).weight
    wq = UniformQuantizer(bits, signed=True, channels=info.out_channels)
    wq.init_from(weight.detach())
    record = ir.WeightQuant(grid="uniform", bits=bits, granularity="per-channel", module=f"{layer.target}.weight_quant")
    set_weight_quantizer(gm, layer, wq, record)


def quantize_multiply_layers(gm: fx.GraphModule, ctx: PassContext, make_act_quantizer: ActQuantizerFactory) -> bool:
    """Input quantizer from ``make_act_quantizer`` plus uniform weights on every
    not-yet-quantized conv / linear layer; returns whether anything changed."""
    changed = False
    for layer in ir.compute_layers(gm):
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        if info.kind not in MULTIPLY_LAYERS or input_quantizer(layer) is not None:
            continue
        w_bits, a_bits = layer_bits(layer, ctx.spec)
        rng = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
        aq, method = make_act_quantizer(layer, info, a_bits, rng)
        aq.init_from(mean_abs=rng.mean_abs)
        record = ir.ActQuant(
            layer=layer.name, method=method, bits=a_bits, signed=rng.signed,
            module=act_quantizer_name(layer), init_step=float(aq.step.detach()),
        )
        set_act_quantizer(gm, layer, aq, record)
        quantize_weight_uniform(gm, layer, w_bits)
        changed = True
    return changed


def lsq_act_quantizer(layer: fx.Node, info: ir.LayerInfo, bits: int, rng: ir.TensorRange) -> tuple[nn.Module, str]:
    return UniformQuantizer(bits, signed=rng.signed), "lsq"


class LSQ(Pass):
    name = "lsq"
    purpose = "uniform learned-step quantizers on every conv/linear weight and input"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"asq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, quantize_multiply_layers(gm, ctx, lsq_act_quantizer))
