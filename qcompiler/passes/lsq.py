"""``lsq``: uniform learned-step quantizers for weights and activations.

The uniform baseline (LSQ, docs/design.md §4.2). Every conv / linear layer gets a
per-tensor quantizer on its input (unsigned or signed, whichever fits the calibration
histogram better) and a signed per-output-channel quantizer on its weight, their steps
started as the spec's ``init`` says (default ``"mse"``, the least squared error;
``"lsq"`` is the paper's ``2 * mean|x| / sqrt(p)``). Layers reading one tensor share
its quantizer. Adder
layers are left to the adder passes, since a uniform grid per side does not factor
out of ``|x - w|``.
"""

from __future__ import annotations

import torch.fx as fx

from .base import STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .rewrite import lsq_act_quantizer, quantize_multiply_layers


class LSQ(Pass):
    name = "lsq"
    purpose = "uniform learned-step quantizers on every conv/linear weight and input"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({"ranges"})
    produces = frozenset({"act-quant", "weight-quant"})
    conflicts = frozenset({"asq"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, quantize_multiply_layers(gm, ctx, lsq_act_quantizer))
