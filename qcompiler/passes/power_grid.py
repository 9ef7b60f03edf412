"""Shared recipe of the ``pot`` and ``post`` passes (each has its own file).

Both replace the weight quantizer of every non-pinned conv / linear layer with a
:class:`PowerGridQuantizer`; ``freeze`` records each weight's integer code, so the
backends can emit shifts and table look-ups without re-deriving anything. They
need an activation pass (``lsq`` or ``asq``) before them: that pass quantizes the
inputs and holds the pinned first/last layers at 8 bits, which a weight grid alone
would leave in float.
"""

from __future__ import annotations

from typing import ClassVar

import torch.fx as fx

from .. import ir
from ..nn.layout import channel_weight
from ..quantizers.power_grid import PowerGridQuantizer
from .base import STAGE_WEIGHT_GRID, Pass, PassContext, PassResult
from .rewrite import MULTIPLY_LAYERS, layer_bits, set_weight_quantizer


class PowerGridPass(Pass):
    grid: ClassVar[str]
    stage = STAGE_WEIGHT_GRID
    requires = frozenset({"act-quant"})
    produces = frozenset({"weight-quant"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        changed = False
        for layer in ir.compute_layers(gm):
            info = ir.get(layer, ir.LAYER, ir.LayerInfo)
            current = ir.find(layer, ir.WEIGHT, ir.WeightQuant)
            if info.kind not in MULTIPLY_LAYERS or ir.PIN in layer.meta:
                continue
            if current is not None and current.grid == self.grid:
                continue
            w_bits, _ = layer_bits(layer, ctx.spec)
            wq = PowerGridQuantizer(w_bits, self.grid, channels=info.out_channels)
            wq.init_weight(channel_weight(gm.get_submodule(layer.target)), ctx.spec.init)
            record = ir.WeightQuant(grid=self.grid, bits=w_bits, granularity="per-channel",
                                    module=f"{layer.target}.weight_quant", init=ctx.spec.init)
            set_weight_quantizer(gm, layer, wq, record)
            changed = True
        return PassResult(gm, changed)
