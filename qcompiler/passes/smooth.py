"""``smooth``: move a layer norm's outlier features into the linear layers reading it (SmoothQuant).

A transformer's layer-norm output has a few features whose range is many times the
others' (large affine weights), and one per-tensor step must cover them, leaving the rest
a handful of codes. The norm's affine weight and bias are per feature, and so is a
linear layer's weight column, so a per-feature factor moves between them exactly
(Xiao et al., SmoothQuant, 2023):

  1. keep the ``nn.LayerNorm`` modules (with affine weights, called once) whose every
     reader is an ``nn.Linear`` called once and reading features on the last axis;
  2. on the calibration batches, the largest ``|x_c|`` of each norm's output feature;
  3. ``s_c = max|x_c|^alpha / max_readers max|W[:, c]|^(1 - alpha)``, ``alpha`` the one of
     ``ALPHAS`` (or no smoothing at all) whose readers' outputs on the kept calibration
     samples lose least to a quick simulation of the spec's grids (the activation per
     tensor at its least-error clip, the weights per output channel at their maximum);
  4. divide the norm's weight and bias by ``s``, multiply every reader's weight columns;
     record ``qc.smooth`` on the norm and drop its observed range (it changed).

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
from ..numerics import int_range, quantize_float
from .base import CALIBRATION_DATA, STAGE_ANALYSIS, Pass, PassContext, PassResult
from .calibrate import run_calibration
from .rewrite import call_sites

SCALE_RANGE = (1e-5, 1e5)  # a dead feature (max 0) or a zero column keeps its scale of 1
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # migration strengths tried (SmoothQuant's default is 0.5)
SAMPLE_BYTES = 8 << 20  # norm output kept per norm for choosing alpha
CLIPS = torch.linspace(0.3, 1.0, 15).tolist()  # activation clips (of max|x|) the simulation tries


def simulated_error(x: torch.Tensor, weights: list[torch.Tensor], act_bits: int, weight_bits: int) -> float:
    """Squared error of ``x @ W^T`` for every ``W`` once ``x`` (per tensor, its best clip) and
    each ``W`` (per output channel, at its maximum) are on grids of these widths."""
    qmin, qmax = int_range(act_bits, signed=True)
    top = float(x.abs().max())
    best = None
    for clip in CLIPS:
        step = max(top * clip / qmax, 1e-12)
        xq = quantize_float(x, step, qmin, qmax) * step
        err = float((xq - x).square().sum())
        if best is None or err < best[0]:
            best = (err, xq)
    xq = best[1]
    wmin, wmax = int_range(weight_bits, signed=True, narrow=True)
    total = 0.0
    for w in weights:
        ws = (w.abs().amax(1, keepdim=True) / wmax).clamp_min(1e-12)
        wq = quantize_float(w, ws, wmin, wmax) * ws
        total += float((xq @ wq.t() - x @ w.t()).square().sum())
    return total


def smoothable(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The linear layers reading layer norm ``node`` if the pass may rescale between them, else None."""
    if node.op != "call_module" or len(call_sites(node)) != 1:
        return None
    norm = gm.get_submodule(node.target)
    if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None or ir.SMOOTH in node.meta:
        return None
    readers = list(node.users)
    for r in readers:
        layer = gm.get_submodule(r.target) if r.op == "call_module" else None
        if (type(layer) is not nn.Linear or r.args[0] is not node or len(r.args) != 1 or r.kwargs
                or len(call_sites(r)) != 1 or layer.in_features != norm.normalized_shape[-1]):
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

    def __init__(self, act_bits: int = 8, weight_bits: int = 8) -> None:
        self.act_bits, self.weight_bits = act_bits, weight_bits

    @classmethod
    def from_spec(cls, spec) -> Smooth:
        return cls(act_bits=spec.act_bits, weight_bits=spec.weight_bits)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets = {n: r for n in gm.graph.nodes if (r := smoothable(gm, n)) is not None}
        if not targets:
            return PassResult(gm, False)
        act_max = {n.name: torch.zeros(gm.get_submodule(n.target).normalized_shape[-1], dtype=torch.float64)
                   for n in targets}
        samples: dict[str, list[torch.Tensor]] = {k: [] for k in act_max}

        def watch(name: str):
            def update(x: torch.Tensor) -> None:
                rows = x.detach().reshape(-1, x.shape[-1]).double()
                torch.maximum(act_max[name], rows.abs().amax(0), out=act_max[name])
                room = SAMPLE_BYTES // rows[:1].nbytes - sum(len(t) for t in samples[name])
                if room > 0:
                    samples[name].append(rows[:room].clone())
            return update

        run_calibration(gm, ctx.calib_batches, {k: watch(k) for k in act_max}, "smooth", ctx.progress)
        names = sorted(act_max)  # the same order on every rank
        flat = all_reduce_values(torch.cat([act_max[k] for k in names]).tolist(), dist.ReduceOp.MAX, ctx.ranks)
        batches = int(all_reduce_values([len(ctx.calib_batches)], dist.ReduceOp.SUM, ctx.ranks)[0])
        reduced = torch.tensor(flat, dtype=torch.float64).split([act_max[k].numel() for k in names])
        act_max = dict(zip(names, reduced))

        changed = False
        for node, readers in targets.items():
            norm = gm.get_submodule(node.target)
            layers = [gm.get_submodule(r.target) for r in readers]
            weights = [l.weight.detach().double() for l in layers]
            weight_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
            x = torch.cat(samples[node.name]) if samples[node.name] else torch.zeros(0, weight_max.numel(), dtype=torch.float64)
            options = [None, *ALPHAS]  # None: leave this norm as it is
            errors = []
            for alpha in options:
                sc = torch.ones_like(weight_max) if alpha is None else smoothing_scales(act_max[node.name], weight_max, alpha)
                errors.append(simulated_error(x / sc, [w * sc for w in weights], self.act_bits, self.weight_bits)
                              if len(x) else 0.0)
            errors = all_reduce_values(errors, dist.ReduceOp.SUM, ctx.ranks)  # every rank chooses alike
            alpha = options[min(range(len(options)), key=lambda i: (errors[i], i))]
            if alpha is None:
                continue
            s = smoothing_scales(act_max[node.name], weight_max, alpha)
            changed = True
            with torch.no_grad():
                norm.weight.div_(s.to(norm.weight.dtype))
                norm.bias.div_(s.to(norm.bias.dtype))
                for layer in layers:
                    layer.weight.mul_(s.to(layer.weight.dtype))
            node.meta[ir.SMOOTH] = ir.Smoothing(alpha=alpha, readers=tuple(r.name for r in readers),
                                                spread=float(s.max() / s.min()), batches=batches)
            node.meta.pop(ir.RANGE, None)  # observed before: no longer this tensor's range
        return PassResult(gm, changed)


__all__ = ["ALPHAS", "Smooth", "simulated_error", "smoothable", "smoothing_scales"]
