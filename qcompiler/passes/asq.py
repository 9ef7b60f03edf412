"""``asq``: adaptive-step activation quantizers (ASQ) with uniform weights.

Every non-pinned conv / linear input gets an :class:`ASQQuantizer` (learned step
times a per-sample factor from a small adapter, DESIGN.md §3.2) and every weight a
per-channel LSQ quantizer, so ``--passes asq`` is the paper's "ASQ" scheme and
``asq,post`` its "ASQ+POST". Pinned layers keep an 8-bit LSQ input quantizer: an
adapter there would cost more than it could gain at 8 bits.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .. import ir
from ..quantizers.asq import ASQQuantizer
from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .rewrite import lsq_act_quantizer, quantize_multiply_layers


def asq_act_quantizer(layer: fx.Node, info: ir.LayerInfo, bits: int, rng: ir.TensorRange, ctx: PassContext) -> tuple[nn.Module, str]:
    if ir.PIN in layer.meta:
        return lsq_act_quantizer(layer, info, bits, rng, ctx)
    return ASQQuantizer(bits, signed=rng.signed, channels=info.in_channels), "asq"


class ASQ(Pass):
    name = "asq"
    purpose = "per-sample adaptive activation steps (ASQ) and uniform per-channel weights"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"lsq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, quantize_multiply_layers(gm, ctx, asq_act_quantizer))
