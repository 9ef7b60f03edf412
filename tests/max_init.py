"""Step initialisation from the observed ranges (no clipping), for numeric checks right after compile.

LSQ's ``2 mean|x| / sqrt(p)`` start is made for QAT: at 8 bits it clips softmax outputs
and spreads a +-3 range over a few dozen levels, so a compiled model is 5-13 % off float
before any training. These tests check that the quantized structure is right, so they
start every step at ``max|x| / p`` (what quantize-joins does for its own quantizers),
as a calibrated initialisation will.
"""

from __future__ import annotations

import torch

from qcompiler import ir
from qcompiler.nn.layout import channel_weight
from qcompiler.passes.rewrite import init_act_step


@torch.no_grad()
def max_init(compiled) -> None:
    """Every activation step from its input's observed max, every uniform weight step from its channel's max."""
    gm = compiled.module
    for node in ir.act_quantizers(gm):
        init_act_step(gm.get_submodule(node.target), ir.get(node.args[0], ir.RANGE, ir.TensorRange), "max")
    for layer in ir.compute_layers(gm):
        rec = ir.find(layer, ir.WEIGHT, ir.WeightQuant)
        if rec is not None and rec.grid == "uniform":
            m = gm.get_submodule(layer.target)
            m.weight_quant.init_from_max(channel_weight(m).abs().flatten(1).max(1).values)
    compiled.freeze()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``y`` against ``ref``."""
    return float((y - ref).norm() / ref.norm())
