"""``outlier-clamp``: calibrate each adder layer's input range, ignoring outliers.

Per calibration batch, the range is the value at index ``round(alpha * (n - 1))`` of
the sorted ``|x|`` (found with a selection, not a sort); batches combine by running
max (docs/design.md §4.5, step 1). A few extreme activations would otherwise stretch the
one grid an adder layer shares with its weights. Memory is one batch's tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx

from .. import ir
from ..distributed import all_reduce_values
from ..spec import QuantSpec
from ..nn import AdderConv2d
from .base import CALIBRATION_DATA, STAGE_CALIBRATE, Pass, PassContext, PassResult
from .calibrate import run_calibration


def outlier_range(x: torch.Tensor, alpha: float) -> float:
    """The ``alpha`` order statistic of ``|x|``: sorted ``|x|`` at ``round(alpha * (n - 1))``.

    >>> outlier_range(torch.arange(-10.0, 11.0), alpha=0.9)
    9.0
    """
    a = x.detach().abs().flatten()
    index = round(alpha * (a.numel() - 1))
    return float(torch.kthvalue(a, index + 1).values)


class _RunningMax:
    def __init__(self, alpha: float) -> None:
        self.alpha, self.value, self.batches = alpha, 0.0, 0

    def update(self, x: torch.Tensor) -> None:
        self.value = max(self.value, outlier_range(x, self.alpha))
        self.batches += 1


class OutlierClamp(Pass):
    name = "outlier-clamp"
    purpose = "calibrate each adder layer's input range as a high quantile of |x|"
    stage = STAGE_CALIBRATE
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"adder-input-range"})
    needs_layers = (AdderConv2d,)

    def __init__(self, alpha: float = 0.9992) -> None:
        self.alpha = alpha

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> OutlierClamp:
        return cls(alpha=spec.outlier_alpha)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        adders = [n for n in ir.compute_layers(gm) if ir.get(n, ir.LAYER, ir.LayerInfo).kind == "adder2d"]
        stats = {n.args[0].name: _RunningMax(self.alpha) for n in adders}
        run_calibration(gm, ctx.calib_batches, {k: s.update for k, s in stats.items()}, "outlier-clamp", ctx.progress)
        # a max over batches and a count: over all ranks' batches, exactly (in name order on every rank)
        names = sorted(stats)
        ranges = dict(zip(names, all_reduce_values([stats[k].value for k in names], dist.ReduceOp.MAX, ctx.ranks)))
        counts = dict(zip(names, all_reduce_values([stats[k].batches for k in names], dist.ReduceOp.SUM, ctx.ranks)))
        changed = False
        for layer in adders:
            name = layer.args[0].name
            record = ir.ClampRange(alpha=self.alpha, range=ranges[name], batches=int(counts[name]))
            changed |= layer.meta.get(ir.ADDER_IN) != record
            layer.meta[ir.ADDER_IN] = record
        return PassResult(gm, changed)
