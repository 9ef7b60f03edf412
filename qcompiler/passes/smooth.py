"""``smooth``: move a layer norm's outlier features into the linear layers reading it (SmoothQuant).

A transformer's layer-norm output has a few features whose range is many times the
others' (large affine weights), and one per-tensor step must cover them, leaving the rest
a handful of codes. The norm's affine weight and bias are per feature, and so is a
linear layer's weight column, so a per-feature factor moves between them exactly
(Xiao et al., SmoothQuant, 2023):

  1. keep the ``nn.LayerNorm`` modules (with affine weights, called once) whose every
     reader is an ``nn.Linear`` called once and reading features on the last axis;
  2. on the calibration batches, the largest ``|x_c|`` of each norm's output feature;
  3. ``s_c = max|x_c|^alpha / max_readers max|W[:, c]|^(1 - alpha)`` (``alpha`` 0.5);
     divide the norm's weight and bias by ``s``, multiply every reader's weight columns;
  4. record ``qc.smooth`` on the norm and drop its observed range (it changed).

The float model computes the same function up to rounding. Run it first, before any
quantizing pass: ``--passes smooth,lsq``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .. import ir
from ..distributed import all_reduce_values
from .base import CALIBRATION_DATA, STAGE_ANALYSIS, Pass, PassContext, PassResult
from .calibrate import run_calibration

SCALE_RANGE = (1e-5, 1e5)  # a dead feature (max 0) or a zero column keeps its scale of 1


def _called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def smoothable(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The linear layers reading layer norm ``node`` if the pass may rescale between them, else None."""
    if node.op != "call_module" or not _called_once(gm, node):
        return None
    norm = gm.get_submodule(node.target)
    if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None or ir.SMOOTH in node.meta:
        return None
    readers = list(node.users)
    for r in readers:
        layer = gm.get_submodule(r.target) if r.op == "call_module" else None
        if (type(layer) is not nn.Linear or r.args[0] is not node or len(r.args) != 1 or r.kwargs
                or not _called_once(gm, r) or layer.in_features != norm.normalized_shape[-1]):
            return None
    return readers or None


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``act_max^alpha / weight_max^(1 - alpha)`` per feature, 1 where either is 0.

    >>> smoothing_scales(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]), 0.5).tolist()
    [4.0, 1.0, 1.0]
    """
    s = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    dead = (act_max <= 0) | (weight_max <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(*SCALE_RANGE))


class Smooth(Pass):
    name = "smooth"
    purpose = "move layer-norm outlier features into the linear layers reading them (SmoothQuant)"
    stage = STAGE_ANALYSIS  # before any range is observed: it changes the norms' outputs
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"smoothed"})

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets = {n: r for n in gm.graph.nodes if (r := smoothable(gm, n)) is not None}
        if not targets:
            return PassResult(gm, False)
        act_max = {n.name: torch.zeros(gm.get_submodule(n.target).normalized_shape[-1], dtype=torch.float64)
                   for n in targets}

        def watch(name: str):
            def update(x: torch.Tensor) -> None:
                m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()
                torch.maximum(act_max[name], m, out=act_max[name])
            return update

        run_calibration(gm, ctx.calib_batches, {k: watch(k) for k in act_max}, "smooth", ctx.progress)
        names = sorted(act_max)  # the same order on every rank
        flat = all_reduce_values(torch.cat([act_max[k] for k in names]).tolist(), dist.ReduceOp.MAX, ctx.ranks)
        batches = int(all_reduce_values([len(ctx.calib_batches)], dist.ReduceOp.SUM, ctx.ranks)[0])
        offset = 0
        for k in names:
            width = act_max[k].numel()
            act_max[k] = torch.tensor(flat[offset:offset + width], dtype=torch.float64)
            offset += width

        for node, readers in targets.items():
            norm = gm.get_submodule(node.target)
            layers = [gm.get_submodule(r.target) for r in readers]
            weight_max = torch.stack([l.weight.detach().abs().amax(0).double() for l in layers]).amax(0)
            s = smoothing_scales(act_max[node.name], weight_max, self.alpha)
            with torch.no_grad():
                norm.weight.div_(s.to(norm.weight.dtype))
                norm.bias.div_(s.to(norm.bias.dtype))
                for layer in layers:
                    layer.weight.mul_(s.to(layer.weight.dtype))
            node.meta[ir.SMOOTH] = ir.Smoothing(alpha=self.alpha, readers=tuple(r.name for r in readers),
                                                spread=float(s.max() / s.min()), batches=batches)
            node.meta.pop(ir.RANGE, None)  # observed before: no longer this tensor's range
        return PassResult(gm, True)


__all__ = ["Smooth", "smoothable", "smoothing_scales"]
