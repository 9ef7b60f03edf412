"""``observe``: streaming range statistics of every tensor a layer quantizes.

An ``fx.Interpreter`` runs the graph over the calibration batches and feeds the
input of every compute layer to a bounded-memory :class:`RangeObserver`; the
summary is written as a ``TensorRange`` record on the node that produces it.
The graph itself is not changed: observation is an analysis, not a rewrite.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from tqdm import tqdm

from .. import ir
from ..observers import RangeObserver
from .base import CALIBRATION_DATA, STAGE_ANALYSIS, Pass, PassContext, PassResult


class _ObservingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[str]) -> None:
        super().__init__(gm)
        self.observers = {name: RangeObserver() for name in watched}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        obs = self.observers.get(n.name)
        if obs is not None:
            obs.update(out)
        return out


class Observe(Pass):
    name = "observe"
    purpose = "record min/max/mean|x|/percentiles of each quantized layer's input"
    stage = STAGE_ANALYSIS
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"ranges"})
    analysis = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        watched = {layer.args[0].name for layer in ir.compute_layers(gm)}
        interp = _ObservingInterpreter(gm, watched)
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            for x in tqdm(ctx.calib_batches, desc="observe", disable=not ctx.progress, leave=False):
                interp.run(x)
        gm.train(was_training)
        changed = False
        for node in gm.graph.nodes:
            if node.name in watched:
                rng = interp.observers[node.name].summary()
                changed |= node.meta.get(ir.RANGE) != rng
                node.meta[ir.RANGE] = rng
        return PassResult(gm, changed)
