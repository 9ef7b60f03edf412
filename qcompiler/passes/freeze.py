"""``freeze``: write the current, effective value of everything a backend reads.

Passes record decisions; QAT then keeps moving the learned values (steps, clips,
weights, ASQ adapters) that live in modules. This analysis reads them back into
records, so the IR alone describes the integer deployment:

  1. every activation quantizer: its step after ``positive()``, code range,
     signedness, rounding, and for ASQ the adapter's weights and bound (``qc.step``);
  2. every quantized layer: the integer code of each weight on its grid (uniform,
     POT, POST, adder), the per-channel scale, the bias, and for power grids the
     largest exponent used and the POST constant (``qc.codes``);
  3. every node computed in float: why (``qc.float``), so nothing is silent.

It runs last in every pipeline, and again before saving, reporting and lowering
(:func:`freeze`). A second run writes equal records and reports no change.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .. import ir, numerics
from ..analysis import FLOAT, describe_op, join_operands, tensor_domains
from ..nn.layout import channel_weight
from ..quantizers.adder import QAdderConv2d
from ..quantizers.asq import BETA_BOUND, ASQQuantizer
from ..quantizers.power_grid import PowerGridQuantizer
from ..quantizers.uniform import UniformQuantizer, positive
from .base import STAGE_FREEZE, Pass, PassContext, PassResult
from .lookup_activations import host_tail, is_lookup_function


def frozen_act(q: UniformQuantizer) -> ir.FrozenAct:
    adapter = None
    if isinstance(q, ASQQuantizer):
        w1, b1, w2, b2 = (t.detach().clone() for t in q.adapter.weights())
        adapter = ir.FrozenAdapter(w1, b1, w2, b2, beta_bound=BETA_BOUND, feature_axis=q.adapter.feature_axis)
    step = positive(q.step.detach())
    per_channel = step.dim() > 0  # per-channel join operands (their module's channel axis)
    return ir.FrozenAct(
        bits=q.bits, signed=q.signed, qmin=q.qmin, qmax=q.qmax,
        step=tuple(step.tolist()) if per_channel else float(step), rounding="half-to-even", adapter=adapter,
        channel_axis=q.channel_axis if per_channel else None,
    )


@torch.no_grad()
def weight_codes(gm: fx.GraphModule, layer: fx.Node) -> ir.WeightCodes:
    """The integer weight codes of a quantized layer, read from its module now."""
    module = gm.get_submodule(layer.target)
    grid = ir.get(layer, ir.WEIGHT, ir.WeightQuant).grid
    weight = channel_weight(module).detach()
    bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
    if isinstance(module, QAdderConv2d):
        lo, hi = numerics.int_range(module.weight_bits, signed=True, narrow=True)
        codes = module.weight_codes().to(numerics.code_dtype(lo, hi))
        return ir.WeightCodes(grid, module.weight_bits, lo, hi, codes, module.weight_steps().clone(), bias)
    q = module.weight_quant
    if isinstance(q, PowerGridQuantizer):
        codes = q.codes(weight).to(numerics.code_dtype(-q.positive_levels, q.positive_levels))
        post = q.grid == "post"
        return ir.WeightCodes(
            grid, q.bits, -q.positive_levels, q.positive_levels, codes, positive(q.alpha.detach()).clone(), bias,
            base=q.base, max_exponent=numerics.largest_exponent(codes),
            post_mantissa=numerics.POST_MANTISSA if post else 0, post_shift=numerics.POST_SHIFT if post else 0,
        )
    return ir.WeightCodes(grid, q.bits, q.qmin, q.qmax, q.codes(weight, narrow_dtype=True), positive(q.step.detach()).clone(), bias)


def float_reason(gm: fx.GraphModule, node: fx.Node, domains) -> str:
    """Why ``node`` computes in float, in words a user can act on."""
    if ir.LAYER in node.meta:
        return f"{ir.get(node, ir.LAYER, ir.LayerInfo).kind} layer that no pass in the pipeline quantizes"
    floats = [a.name for a in node.all_input_nodes if domains[a].kind == FLOAT]
    if floats:
        return f"reads the float output of {floats[0]}"
    if join_operands(node) is not None:
        return "join whose operands are not all on integer grids (quantize_joins is off)"
    if is_lookup_function(gm, node) and node is not host_tail(gm):
        return f"{describe_op(gm, node)} has no integer form here; the lookup-activations pass computes it by table"
    return f"{describe_op(gm, node)} has no integer form here"


def same_record(a: object, b: object) -> bool:
    """Field-by-field equality, tensors compared by value."""
    if type(a) is not type(b):
        return False
    if not dataclasses.is_dataclass(a):
        return a == b
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif not same_record(x, y):
            return False
    return True


def _write(node: fx.Node, key: str, record: object) -> bool:
    old = node.meta.get(key)
    node.meta[key] = record
    return old is None or not same_record(old, record)


def freeze(gm: fx.GraphModule) -> bool:
    """Refresh ``qc.step``, ``qc.codes`` and ``qc.float`` from the modules; returns whether any changed."""
    changed = False
    for node in ir.act_quantizers(gm):
        changed |= _write(node, ir.STEP, frozen_act(gm.get_submodule(node.target)))
    for layer in ir.compute_layers(gm):
        if ir.WEIGHT in layer.meta:
            changed |= _write(layer, ir.CODES, weight_codes(gm, layer))
    domains = tensor_domains(gm)
    for node, domain in domains.items():
        if domain.kind == FLOAT and ir.FLOAT not in node.meta:
            changed |= _write(node, ir.FLOAT, ir.FloatRegion(float_reason(gm, node, domains)))
    return changed


class Freeze(Pass):
    name = "freeze"
    purpose = "record the effective steps, weight codes, adapters and float regions the backends read"
    stage = STAGE_FREEZE
    produces = frozenset({"frozen"})
    analysis = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, freeze(gm))
