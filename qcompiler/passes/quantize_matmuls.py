"""``quantize-matmuls``: both operands of every product of two activations on a grid.

Attention computes ``q @ k.transpose(-2, -1)`` and ``attn @ v``: products of two
activations, with no weight. Left alone they would be float islands between
quantized projections. This pass puts a per-tensor learned-step (LSQ) quantizer of
the spec's activation width on each operand (signed or unsigned by
:func:`qcompiler.quantizers.init.choose_signed`, its step started as the spec's
``init`` says), so the product is an integer matmul of two code tensors times the two
steps, and records the operands' grids on the product (``qc.matmul``). The report
lists each product as a layer of kind ``matmul`` with no weight.

Why LSQ also under ``asq``: an ASQ adapter is sized by a fixed feature axis, and
the last axis of ``k^T`` and of the attention weights is the sequence length, which
changes from call to call.

A product with a Parameter operand is a linear layer: the front end rewrites the
simple ones (:mod:`qcompiler.functional_layers`) and records why it left the others
in float; they are not touched here. The pass runs whenever a pipeline quantizes
activations; a second run finds every product recorded and reports no change.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ir
from ..analysis import CONST, tensor_domains
from ..quantizers import UniformQuantizer, init
from .base import CALIBRATION_DATA, STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .observe import observe_ranges
from .rewrite import quantize_input

MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm")


def is_matmul(node: fx.Node) -> bool:
    """A ``matmul`` / ``@`` / ``bmm`` call with two tensor operands."""
    call = (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS)
    return call and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs


class QuantizeMatmuls(Pass):
    name = "quantize-matmuls"
    purpose = "an activation quantizer on both operands of every product of two activations (attention)"
    stage = STAGE_ACTIVATIONS
    requires = frozenset({CALIBRATION_DATA})
    produces = frozenset({"matmul-quant"})
    quiet_when_unchanged = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        domains = tensor_domains(gm)
        products = [n for n in gm.graph.nodes if is_matmul(n) and ir.MATMUL not in n.meta
                    and ir.FLOAT not in n.meta and all(domains[a].kind != CONST for a in n.args)]
        if not products:
            return PassResult(gm, False)
        operands = {a for n in products for a in n.args}
        observe_ranges(gm, ctx, [a for a in operands if ir.RANGE not in a.meta], self.name)
        for node in products:
            bits = ctx.spec.layer_bits(node.name, None)[1]
            q0, q1 = (self.quantize_operand(gm, node, i, bits, ctx.spec.init, ctx.spec.asymmetric_acts) for i in range(2))
            node.meta[ir.MATMUL] = ir.MatMul(inputs=(q0.name, q1.name), bits=bits)
        return PassResult(gm, True)

    @staticmethod
    def quantize_operand(gm: fx.GraphModule, node: fx.Node, i: int, bits: int, how: str, asymmetric: bool = False) -> fx.Node:
        """Make operand ``i`` of ``node`` a quantizer's output: one already there of this width, or a new one."""
        src = node.args[i]
        rec = src.meta.get(ir.ACT)
        if rec is not None and rec.bits == bits and rec.method == "lsq":
            return src  # already on a grid of this width (x @ x, or a quantized tensor read twice)
        rng = ir.get(src, ir.RANGE, ir.TensorRange)
        signed, zero_point = init.choose_grid(rng, bits, asymmetric)
        q = UniformQuantizer(bits, signed=signed, zero_point=zero_point)
        return quantize_input(gm, node, q, "lsq", rng, how, operand=i, name=f"{node.name}_in{i}")
