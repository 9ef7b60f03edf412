"""Shared recipe of the ``pot`` and ``post`` passes (each has its own file).

Both replace the weight quantizer of every non-pinned conv / linear layer with a
:class:`PowerGridQuantizer` and record each weight's integer code, so the backends
can emit shifts and table look-ups without re-deriving anything.
"""

from __future__ import annotations

from typing import ClassVar

import torch.fx as fx

from .. import ir
from ..quantizers.power_grid import PowerGridQuantizer
from .base import STAGE_WEIGHT_GRID, Pass, PassContext, PassResult
from .lsq import MULTIPLY_LAYERS
from .rewrite import layer_bits, set_weight_quantizer


def encode_codes(gm: fx.GraphModule, layer: fx.Node) -> ir.WeightCodes:
    """The ``WeightCodes`` record of ``layer`` from its current weight and quantizer."""
    module = gm.get_submodule(layer.target)
    q: PowerGridQuantizer = module.weight_quant
    return ir.WeightCodes(
        grid=q.grid, bits=q.bits, base=q.base,
        codes=q.codes(module.weight.detach()), scale=q.alpha.detach().abs().clone(),
    )


class PowerGridPass(Pass):
    grid: ClassVar[str]
    stage = STAGE_WEIGHT_GRID
    produces = frozenset({"weight-quant", "weight-codes"})

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
            wq.init_from(gm.get_submodule(layer.target).weight)
            record = ir.WeightQuant(grid=self.grid, bits=w_bits, granularity="per-channel", module=f"{layer.target}.weight_quant")
            set_weight_quantizer(gm, layer, wq, record)
            layer.meta[ir.CODES] = encode_codes(gm, layer)
            changed = True
        return PassResult(gm, changed)
