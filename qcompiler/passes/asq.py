"""``asq``: adaptive-step activation quantizers (ASQ) with uniform weights.

Every non-pinned conv / linear input gets an :class:`ASQQuantizer` (learned step
times a per-sample factor from a small adapter, DESIGN.md §3.2) and every weight a
per-channel LSQ quantizer, so ``--passes asq`` is the paper's "ASQ" scheme and
``asq,post`` its "ASQ+POST". Pinned layers keep an 8-bit LSQ input quantizer: an
adapter there would cost more than it could gain at 8 bits.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..quantizers import UniformQuantizer
from ..quantizers.asq import ASQQuantizer
from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .lsq import MULTIPLY_LAYERS, quantize_weight_uniform
from .rewrite import act_quantizer_name, input_quantizer, layer_bits, set_act_quantizer


class ASQ(Pass):
    name = "asq"
    purpose = "per-sample adaptive activation steps (ASQ) and uniform per-channel weights"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"lsq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        changed = False
        for layer in ir.compute_layers(gm):
            info = ir.get(layer, ir.LAYER, ir.LayerInfo)
            if info.kind not in MULTIPLY_LAYERS or input_quantizer(layer) is not None:
                continue
            w_bits, a_bits = layer_bits(layer, ctx.spec)
            rng = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
            pinned = ir.find(layer, ir.PIN, ir.Pin) is not None
            if pinned:
                aq, method = UniformQuantizer(a_bits, signed=rng.signed), "lsq"
            else:
                aq, method = ASQQuantizer(a_bits, signed=rng.signed, channels=info.in_channels), "asq"
            aq.init_from(mean_abs=rng.mean_abs)
            record = ir.ActQuant(
                layer=layer.name, method=method, bits=a_bits, signed=rng.signed,
                module=act_quantizer_name(layer), init_step=float(aq.step.detach()),
            )
            set_act_quantizer(gm, layer, aq, record)
            quantize_weight_uniform(gm, layer, w_bits)
            changed = True
        return PassResult(gm, changed)
