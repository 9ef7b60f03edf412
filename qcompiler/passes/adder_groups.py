"""``adder-groups``: AdderNet quantization by redistribution (docs/design.md §4.5, steps 2-5).

For each adder layer:
  1. cluster output channels by ``max |W[c]|`` into ``g`` scale groups (k-means);
  2. with the lossless weight clamp, clip weights to the input range ``r_x`` and fold
     the exact compensation ``b[c] = -sum max(|W[c]| - r_x, 0)`` into the next batch
     norm (or the layer's bias when no batch norm follows); each group's range is
     ``r_G = min(max |W_G|, r_x)`` (without the clamp, ``max`` of the two, so nothing
     is clipped);
  3. quantize input and weights of each group on one shared grid (``QAdderConv2d``):
     activation step ``r_G / (2^a - 1)``, weight step an integer multiple of it
     (:func:`~qcompiler.numerics.adder_weight_step_ratio`);
then re-estimate every batch norm on the calibration data, which also replaces the
compensation folded into a batch norm by the measured mean. ``r_x`` comes from
``outlier-clamp`` when it ran, else from the observed maximum of ``|x|``.

The records: ``AdderScales`` (``method`` is ``"redistribution"``, or ``"shared"`` for
``adder-shared``) and ``WeightQuant`` with ``grid = f"adder-{method}"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import ir
from ..cluster import kmeans_1d
from ..errors import SpecError
from ..quantizers.adder import QAdderConv2d
from ..report import ReportSection, text_table
from ..spec import QuantSpec
from ..nn import AdderConv2d
from .base import CALIBRATION_DATA, STAGE_ADDER, Pass, PassContext, PassResult
from .calibrate import reestimate_batchnorm
from .rewrite import MULTIPLY_LAYERS, layer_bits, lsq_act_quantizer, quantize_multiply_layers


def input_range(layer: fx.Node) -> float:
    """``r_x``: the outlier-clamped range if calibrated, else the observed max ``|x|``."""
    clamp = ir.find(layer, ir.ADDER_IN, ir.ClampRange)
    if clamp is not None:
        return clamp.range
    rng = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
    return max(abs(rng.min), abs(rng.max))


FOLDED_INTO_BIAS = "bias"  # AdderScales.folded_into when the constant became the layer's bias


def fold_into_next_batchnorm(gm: fx.GraphModule, layer: fx.Node, constant: torch.Tensor) -> str:
    """Add ``constant`` (per output channel) to ``layer``'s output; returns where it went.

    ``BN(y + b)`` equals ``BN'(y)`` with ``running_mean' = running_mean - b``, so the
    constant goes into the next batch norm (its node name is returned); with no batch
    norm right after the layer it becomes the layer's bias (``FOLDED_INTO_BIAS``).
    """
    users = list(layer.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(users[0].target)
        if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            with torch.no_grad():
                bn.running_mean.sub_(constant.to(bn.running_mean))
            return users[0].name
    module = gm.get_submodule(layer.target)
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(constant.clone().to(module.weight))
        else:
            module.bias.add_(constant.to(module.bias))
    return FOLDED_INTO_BIAS


def compact(labels) -> torch.Tensor:
    """Renumber the used group ids 0..n-1, keeping their order (by centre)."""
    used = sorted(set(int(v) for v in labels))
    remap = {g: i for i, g in enumerate(used)}
    return torch.tensor([remap[int(v)] for v in labels], dtype=torch.int64)


class AdderGroups(Pass):
    name = "adder-groups"
    purpose = "AdderNet redistribution: k-means scale groups shared by weights and inputs, lossless weight clamp"
    stage = STAGE_ADDER
    requires = frozenset({"ranges", CALIBRATION_DATA})
    produces = frozenset({"adder-quant"})
    conflicts = frozenset({"adder-shared"})
    method = "redistribution"
    needs_layers = (AdderConv2d,)

    def __init__(self, groups: int = 4, weight_clamp: bool = True, seed: int = 0) -> None:
        self.groups, self.weight_clamp, self.seed = groups, weight_clamp, seed

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> AdderGroups:
        return cls(groups=spec.adder_groups, weight_clamp=spec.adder_weight_clamp, seed=spec.seed)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        changed = False
        for layer in ir.compute_layers(gm):
            if ir.get(layer, ir.LAYER, ir.LayerInfo).kind != "adder2d" or ir.ADDER_Q in layer.meta:
                continue
            self.quantize_layer(gm, layer, ctx)
            changed = True
        if changed:
            self.quantize_multiply_layers(gm, ctx)
            reestimate_batchnorm(gm, ctx.calib_batches, ctx.progress, ctx.ranks)
        return PassResult(gm, changed)

    @staticmethod
    def quantize_multiply_layers(gm: fx.GraphModule, ctx: PassContext) -> None:
        """The conv / linear layers (stem, 1x1 shortcuts, classifier) no other pass quantized.

        At ``adder_multiply_bits`` (8 by default) with steps that reach the observed
        maximum (post-training: nothing may clip), so the whole network runs in
        integers; or, with ``adder_multiply_bits=None``, in float as the AdderNet
        papers' tables do, recorded as such.
        """
        bits = ctx.spec.adder_multiply_bits
        if bits is not None:
            quantize_multiply_layers(gm, ctx, lsq_act_quantizer, how="max", bits=bits)
            return
        for layer in ir.compute_layers(gm):
            if ir.get(layer, ir.LAYER, ir.LayerInfo).kind in MULTIPLY_LAYERS and ir.WEIGHT not in layer.meta:
                layer.meta[ir.FLOAT] = ir.FloatRegion(
                    "multiply layer of an adder network kept in float (adder_multiply_bits=None), as the AdderNet papers' tables do"
                )

    @classmethod
    def report_section(cls, gm: fx.GraphModule, spec: QuantSpec) -> ReportSection | None:
        rows = adder_group_cost(gm)
        if not rows:
            return None
        return ReportSection("Extra operations of the adder scale groups (supplement, Prop. 2)", group_cost_table(rows))

    def quantize_layer(self, gm: fx.GraphModule, layer: fx.Node, ctx: PassContext) -> None:
        module = gm.get_submodule(layer.target)
        observed = ir.get(layer.args[0], ir.RANGE, ir.TensorRange)
        if observed.signed:  # unsigned codes would silently drop the negative half
            raise SpecError(
                f"adder layer {layer.name!r} reads a signed input (min {observed.min:.3g}); adder quantization "
                "needs x >= 0: put a ReLU in front of it or leave the model's adder layers unquantized"
            )
        w_bits, a_bits = layer_bits(layer, ctx.spec)
        r_x = input_range(layer)
        weight = module.weight.detach()
        channel_max = weight.abs().flatten(1).max(1).values
        try:
            labels = compact(kmeans_1d(channel_max.double().numpy(), self.groups, seed=self.seed))
        except SpecError as e:  # name the layer in the one-line error
            raise SpecError(f"adder layer {layer.name!r}: {e}") from None

        compensation = torch.zeros(module.out_channels)
        if self.weight_clamp:
            compensation = -(weight.abs() - r_x).clamp_min(0).flatten(1).sum(1)
            with torch.no_grad():
                module.weight.clamp_(-r_x, r_x)
        n_groups = int(labels.max()) + 1
        group_max = [float(channel_max[labels == g].max()) for g in range(n_groups)]
        pick = min if self.weight_clamp else max
        group_ranges = [max(pick(m, r_x), 1e-8) for m in group_max]
        act_steps = [r / (2**a_bits - 1) for r in group_ranges]
        folded = fold_into_next_batchnorm(gm, layer, compensation) if bool(compensation.any()) else ""

        q = QAdderConv2d.from_float(module, labels, torch.tensor(act_steps), a_bits, w_bits)
        gm.add_submodule(layer.target, q)
        layer.meta[ir.ADDER_Q] = ir.AdderScales(
            method=self.method, act_bits=a_bits, weight_bits=w_bits, weight_step_ratio=q.weight_step_ratio,
            input_range=r_x, group_of_channel=tuple(labels.tolist()), group_ranges=tuple(group_ranges),
            # the steps the module computes with (its float32 buffer), not their float64 origin
            act_steps=tuple(q.act_steps.double().tolist()), weight_clamped=self.weight_clamp,
            compensation=compensation, folded_into=folded,
            # run() re-estimates every batch norm after this, and the new running mean
            # absorbs any per-channel constant: only a bias keeps it.
            compensation_applies=folded in ("", FOLDED_INTO_BIAS),
        )
        granularity = "per-group" if n_groups > 1 else "per-layer"
        layer.meta[ir.WEIGHT] = ir.WeightQuant(
            grid=f"adder-{self.method}", bits=w_bits, granularity=granularity, module=layer.target, init="range")


@dataclass(frozen=True)
class GroupScaleCost:
    """Extra operations of an adder layer's ``g`` scale groups over one scale."""

    layer: str
    in_channels: int
    groups: int
    exact_pct: float  # from the supplement's eq. (2) with this layer's shapes
    closed_form_pct: float  # the supplement's (g - 1) / (18c + 4), for 3x3 layers


def adder_group_cost(gm: fx.GraphModule) -> tuple[GroupScaleCost, ...]:
    """Relative FLOPs added by group scales, per quantized adder layer (supplement, Prop. 2).

    Eq. (2): ``2hw(c_in d^2 + 1) c_out + c_in d^2 c_out + g h w c_in + h_out w_out c_out``;
    going from one scale to ``g`` adds ``(g - 1) h w c_in``.
    """
    rows = []
    for layer in ir.compute_layers(gm):
        scales = ir.find(layer, ir.ADDER_Q, ir.AdderScales)
        if scales is None:
            continue
        info = ir.get(layer, ir.LAYER, ir.LayerInfo)
        g = len(scales.group_ranges)
        c_in, c_out = info.in_channels, info.out_channels
        h, w = info.input_shape[1:3]
        d2 = info.kernel_size[0] * info.kernel_size[1]
        h_out, w_out = info.output_shape[1:3]
        one_scale = 2 * h * w * (c_in * d2 + 1) * c_out + c_in * d2 * c_out + h * w * c_in + h_out * w_out * c_out
        rows.append(GroupScaleCost(
            layer.name, c_in, g,
            exact_pct=100.0 * (g - 1) * h * w * c_in / one_scale,
            closed_form_pct=100.0 * (g - 1) / (18 * c_in + 4),
        ))
    return tuple(rows)


def group_cost_table(rows: tuple[GroupScaleCost, ...]) -> str:
    return text_table(
        ("adder layer", "c", "g", "extra FLOPs %", "(g-1)/(18c+4) %"),
        [(r.layer, str(r.in_channels), str(r.groups), f"{r.exact_pct:.3f}", f"{r.closed_form_pct:.3f}") for r in rows],
    )
