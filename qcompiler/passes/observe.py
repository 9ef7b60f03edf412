"""``observe``: streaming range statistics of every tensor a layer quantizes.

The graph runs over the calibration batches and the input of every compute layer
feeds a bounded-memory :class:`RangeObserver`; the summary is written as a
``TensorRange`` record on the node that produces it. In a distributed compile the
observers are reduced over the ranks first, so every rank writes the same records.
The graph itself is not changed: observation is an analysis, not a rewrite.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from .. import ir
from ..distributed import reduce_observers
from ..observers import RangeObserver
from .base import CALIBRATION_DATA, STAGE_ANALYSIS, Pass, PassContext, PassResult
from .calibrate import run_calibration


class Observe(Pass):
    name = "observe"
    purpose = "record min/max/mean|x|/percentiles of each quantized layer's input"
    stage = STAGE_ANALYSIS
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"ranges"})
    analysis = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, observe_ranges(gm, ctx, [layer.args[0] for layer in ir.compute_layers(gm)], self.name))


def observe_ranges(gm: fx.GraphModule, ctx: PassContext, nodes: Iterable[fx.Node], desc: str) -> bool:
    """Run the calibration data and write a ``qc.range`` record on each of ``nodes``; returns whether any changed."""
    observers = {node.name: RangeObserver() for node in nodes}
    run_calibration(gm, ctx.calib_batches, {k: o.update for k, o in observers.items()}, desc, ctx.progress)
    reduce_observers(observers, ctx.ranks)
    changed = False
    for node in gm.graph.nodes:
        if node.name in observers:
            rng = observers[node.name].summary()
            changed |= node.meta.get(ir.RANGE) != rng
            node.meta[ir.RANGE] = rng
    return changed
