"""``pin-first-last``: keep the first and last compute layers at 8 bits.

Both papers keep the layer that reads the image and the classifier at 8 bits: they
hold few parameters and are the most sensitive to quantization. The layers are found
from the graph (reachability from the inputs / to the output), never from names.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..analysis import first_layers, last_layers
from ..spec import QuantSpec
from .base import STAGE_ANALYSIS, Pass, PassContext, PassResult


class PinFirstLast(Pass):
    name = "pin-first-last"
    purpose = "hold the layers next to the network input and output at a fixed bit width"
    stage = STAGE_ANALYSIS
    produces = frozenset({"pins"})

    def __init__(self, bits: int = 8) -> None:
        self.bits = bits

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> PinFirstLast:
        return cls(bits=spec.pin_bits)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        reasons: dict[str, list[str]] = {}
        for name in first_layers(gm):
            reasons.setdefault(name, []).append("reads the network input")
        for name in last_layers(gm):
            reasons.setdefault(name, []).append("produces the network output")
        changed = False
        for name, why in reasons.items():
            pin = ir.Pin(bits=self.bits, reason=" and ".join(why))
            if nodes[name].meta.get(ir.PIN) != pin:
                nodes[name].meta[ir.PIN] = pin
                changed = True
        return PassResult(gm, changed)
