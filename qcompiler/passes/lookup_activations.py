"""``lookup-activations``: elementwise functions read on a grid, so a table computes them.

Hardswish, SiLU, sigmoid, GELU and their kind have no integer arithmetic form, and
left alone they are float islands that the integer program refuses (MobileNetV3,
EfficientNet, YOLO-style networks). Integer hardware computes them with a look-up
table indexed by the input's code. This pass makes the compiled model do what that
hardware does: it puts a per-tensor learned-step (LSQ) quantizer of the spec's
activation width on the function's input (signed or unsigned by
:func:`qcompiler.quantizers.init.choose_grid`, its step started as the spec's ``init``
says) and records the function as a :class:`~qcompiler.ir.Lookup`. The function then
takes at most ``2^bits`` values; the integer program holds them in a table (its
``lookup`` instruction), and the fake-quant module computes the same values by calling
the function on the same float32 grid points.

What such functions usually feed is handled too: every elementwise product of two
activations (a squeeze-excitation gate ``x * hardsigmoid(...)``, a swish written as
``x * torch.sigmoid(x)``) gets both operands on LSQ grids, recorded as an elementwise
:class:`~qcompiler.ir.MatMul`, so it is one integer multiply per element (the program's
``mul``) times the two steps.

Why LSQ also under ``asq``: a table needs one step for every input, where ASQ's step
changes per sample. A function that ends the network (a sigmoid or softmax read out
on the host) is left to the host, as without this pass.

Example:
    ``qcompile model.pt --passes lsq,lookup-activations``, or
    ``QuantSpec(passes=("asq", "post", "lookup-activations"))``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ir
from ..analysis import CONST, INPUT, describe_op, tensor_domains
from ..report import ReportSection, text_table
from ..spec import QuantSpec
from .base import CALIBRATION_DATA, STAGE_ACTIVATIONS, Pass, PassContext, PassResult
from .observe import observe_ranges
from .quantize_matmuls import QuantizeMatmuls

# Elementwise functions of one tensor with no integer form of their own (ReLU, ReLU6 and
# hardtanh are clips, which the program computes exactly without a table).
LOOKUP_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.SELU, nn.CELU,
                  nn.Mish, nn.Softplus, nn.Softsign, nn.LeakyReLU, nn.LogSigmoid, nn.Tanhshrink)
LOOKUP_FUNCTIONS = (F.hardswish, F.hardsigmoid, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.elu,
                    F.selu, torch.selu, F.celu, F.mish, F.softplus, F.softsign, F.leaky_relu, F.logsigmoid,
                    F.tanhshrink)
LOOKUP_METHODS = ("sigmoid", "tanh")
PRODUCT_FUNCTIONS = (operator.mul, torch.mul)


def is_elementwise_product(node: fx.Node) -> bool:
    """``a * b``, ``torch.mul(a, b)`` or ``a.mul(b)`` of two tensors (which may be numbers: the caller checks)."""
    call = (node.op == "call_function" and node.target in PRODUCT_FUNCTIONS) or (
        node.op == "call_method" and node.target == "mul")
    return call and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs


def is_lookup_function(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise function of one activation that a table can compute (see ``LOOKUP_*``)."""
    if not node.args or not isinstance(node.args[0], fx.Node) \
            or any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in LOOKUP_MODULES
    if node.op == "call_function":
        return node.target in LOOKUP_FUNCTIONS
    return node.op == "call_method" and node.target in LOOKUP_METHODS


def host_tail(gm: fx.GraphModule) -> fx.Node | None:
    """The function the network ends in when the integer program runs it on the host (a sigmoid read out)."""
    from ..runtime.lower import output_tail  # the runtime's own rule (imported late: the runtime imports passes)

    tail = output_tail(gm)
    return None if tail is None else tail[0]


def out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place function (``inplace=True``) made out of place: it would overwrite the
    quantizer's output that autograd keeps. The same values either way."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False):
            module.inplace = False  # the compiled copy's module, never the user's
    elif node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}


class LookupActivations(Pass):
    name = "lookup-activations"
    purpose = ("an activation quantizer on the input of every hardswish, SiLU, sigmoid, GELU ... (a look-up table) "
               "and on both operands of every product of two activations (a gate)")
    stage = STAGE_ACTIVATIONS
    requires = frozenset({CALIBRATION_DATA, "act-quant"})
    produces = frozenset({"lookup-quant"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        domains, tail = tensor_domains(gm), host_tail(gm)
        functions = [n for n in gm.graph.nodes if is_lookup_function(gm, n) and n is not tail
                     and ir.LOOKUP not in n.meta and ir.FLOAT not in n.meta and domains[n.args[0]].kind != CONST]
        products = [n for n in gm.graph.nodes if is_elementwise_product(n) and ir.MATMUL not in n.meta
                    and ir.FLOAT not in n.meta and all(domains[a].kind not in (CONST, INPUT) for a in n.args)]
        if not functions and not products:
            return PassResult(gm, False)
        inputs = [n.args[0] for n in functions] + [a for n in products for a in n.args]
        observe_ranges(gm, ctx, list(dict.fromkeys(a for a in inputs if ir.RANGE not in a.meta)), self.name)
        for node in functions:
            bits = ctx.spec.layer_bits(node.name, None)[1]
            q = QuantizeMatmuls.quantize_operand(gm, node, 0, bits, ctx.spec.init, ctx.spec.asymmetric_acts)
            out_of_place(gm, node)
            node.meta[ir.LOOKUP] = ir.Lookup(input=q.name, bits=bits, function=describe_op(gm, node))
        for node in products:
            bits = ctx.spec.layer_bits(node.name, None)[1]
            q0, q1 = (QuantizeMatmuls.quantize_operand(gm, node, i, bits, ctx.spec.init, ctx.spec.asymmetric_acts)
                      for i in range(2))
            node.meta[ir.MATMUL] = ir.MatMul(inputs=(q0.name, q1.name), bits=bits, elementwise=True)
        return PassResult(gm, True)

    @classmethod
    def report_section(cls, gm: fx.GraphModule, spec: QuantSpec) -> ReportSection | None:
        rows = [(n.name, rec.function, rec.input, str(rec.bits), str(2**rec.bits))
                for n in gm.graph.nodes if (rec := n.meta.get(ir.LOOKUP)) is not None]
        if not rows:
            return None
        head = ("node", "function", "input grid", "bits", "table entries")
        return ReportSection("Functions computed by table (lookup-activations)", text_table(head, rows))
