"""The ``qcompiler`` ONNX domain: one declaration per custom op, and its function body.

Each op of our domain (:data:`OPS`) is declared once: its inputs, outputs and
attributes ``{name: (type, required, default)}``. :func:`function_proto` builds the
op's ONNX *model-local function*, whose body uses standard ops only (opset 21), so a
stock ``onnxruntime.InferenceSession`` runs an exported file with no extension
library, while a hardware toolchain can still match on the op names. Each op also
has a NumPy reference (:func:`reference`) built on :mod:`qcompiler.numerics`, the one
home of the integer numerics; the tests hold the function bodies to it and to the
PyTorch quantizers on edge values (ties at .5, clamp limits, zero).

Numerics (docs/design.md §4): ``Round`` is half to even, like ``torch.round``; a
quantizer divides by its step, rounds, clamps and multiplies back, in that order,
exactly as the fake-quant module does in float32, so the float values agree bit for
bit wherever float32 arithmetic is the same.

Example:
    >>> sorted(OPS)
    ['AdderConv2d', 'AsqQuantize', 'AsqStep', 'PowerGridDecode', 'UniformCodes', 'UniformQuantize']
    >>> f = function_proto("UniformQuantize"); (f.domain, f.name, list(f.attribute))
    ('qcompiler', 'UniformQuantize', ['qmin', 'qmax'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper

from ..numerics import quantize_codes, round_half_even
from ..quantizers.asq import BETA_BOUND

DOMAIN = "qcompiler"
DOMAIN_VERSION = 1
OPSET = 21  # INT4/UINT4 initializers and per-axis DequantizeLinear on them

_ATTR_TYPES = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT, "ints": AttributeProto.INTS}


@dataclass(frozen=True)
class Attr:
    """One attribute of a custom op: ONNX type (``int``/``float``/``ints``), whether required, default."""

    type: str
    required: bool = True
    default: object = None


@dataclass(frozen=True)
class CustomOp:
    """A ``qcompiler`` op: inputs, outputs, attributes and what it computes (one line)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[tuple[str, Attr], ...]
    semantics: str

    @property
    def attrs(self) -> dict[str, Attr]:
        return dict(self.attributes)


OPS: dict[str, CustomOp] = {
    op.name: op
    for op in (
        CustomOp("UniformQuantize", ("x", "step"), ("y",),
                 (("qmin", Attr("int")), ("qmax", Attr("int"))),
                 "y = clip(round_half_even(x / step), qmin, qmax) * step  (LSQ; step a positive scalar)"),
        CustomOp("UniformCodes", ("x", "step"), ("codes",),
                 (("qmin", Attr("int")), ("qmax", Attr("int"))),
                 "codes = clip(round_half_even(x / step), qmin, qmax), as floats (UniformQuantize before its multiply)"),
        CustomOp("AsqQuantize", ("x", "step", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), ("y",),
                 (("qmin", Attr("int")), ("qmax", Attr("int")), ("beta_bound", Attr("float", False, BETA_BOUND))),
                 "s_n = step * exp(L tanh(fc2(relu(fc1(mean_pos x_n))) / L)) (float64, rounded once); "
                 "y = clip(round(x / s_n), qmin, qmax) * s_n"),
        CustomOp("AsqStep", ("x", "step", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), ("s",),
                 (("beta_bound", Attr("float", False, BETA_BOUND)),),
                 "s = step * exp(L tanh(fc2(relu(fc1(mean_pos x_n))) / L)), (N, 1): AsqQuantize's per-sample step"),
        CustomOp("PowerGridDecode", ("codes", "table", "alpha"), ("w",),
                 (("levels", Attr("int")),),
                 "w = table[codes + levels] * alpha  (POT/POST: table[levels + s*m] = s * base^-(m-1), table[levels] = 0)"),
        CustomOp("AdderConv2d", ("x", "step", "w"), ("y",),
                 (("qmax", Attr("int")), ("kernel_shape", Attr("ints")), ("strides", Attr("ints")),
                  ("pads", Attr("ints")), ("dilations", Attr("ints"))),
                 "a = clip(round(x / step), 0, qmax); y[n,o,p] = -step * sum_k |a[n, window(p), k] - w[o, k]|  "
                 "(one scale group; w in activation steps)"),
    )
}


def _ref(node: NodeProto, attr: str, refname: str, kind: str) -> NodeProto:
    """Make ``node.attr`` read the function's attribute ``refname``."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = attr, refname, _ATTR_TYPES[kind]
    node.attribute.append(a)
    return node


class _Body:
    """A tiny builder for function bodies: ``b.op("Div", "x", "step")`` returns the output name."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(arr, out)))
        return out

    def attr_const(self, refname: str, kind: str, as_float: bool = True) -> str:
        """A tensor holding the function attribute ``refname`` (a Constant node referencing it)."""
        out = f"t{len(self.nodes)}"
        self.nodes.append(_ref(helper.make_node("Constant", [], [out]), f"value_{kind}", refname, kind))
        return self.op("Cast", out, to=TensorProto.FLOAT) if as_float else out

    def quantize(self, x: str, step: str, lo: str, hi: str) -> str:
        """``clip(round(x / step), lo, hi)``: round half to even, then clamp (they commute, integer bounds)."""
        return self.op("Clip", self.op("Round", self.op("Div", x, step)), lo, hi)


def _uniform_quantize(b: _Body) -> None:
    codes = b.quantize("x", "step", b.attr_const("qmin", "int"), b.attr_const("qmax", "int"))
    b.op("Mul", codes, "step", out="y")


def _uniform_codes(b: _Body) -> None:
    b.op("Identity", b.quantize("x", "step", b.attr_const("qmin", "int"), b.attr_const("qmax", "int")), out="codes")


def _asq_step(b: _Body) -> str:
    """The per-sample step ``(N, 1)``, as ``ASQQuantizer.sample_step`` in eval mode: the adapter in
    float64 (onnxruntime's float32 pooling order, tanh and exp differ from PyTorch's in the last
    bit; float64 differences almost never survive the one rounding to float32)."""
    f64 = TensorProto.DOUBLE
    # pooled = mean over every position of each sample and channel, (N, C); a 2-D x is its own mean
    x3 = b.op("Reshape", b.op("Cast", "x", to=f64), b.const([0, 0, -1], np.int64))
    pooled = b.op("ReduceMean", x3, b.const([2], np.int64), keepdims=0)
    w1, b1, w2, b2 = (b.op("Cast", k, to=f64) for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    hidden = b.op("Relu", b.op("Gemm", pooled, w1, b1, transB=1))
    z = b.op("Gemm", hidden, w2, b2, transB=1)  # (N, 1)
    bound = b.op("Cast", b.attr_const("beta_bound", "float", as_float=False), to=f64)
    beta = b.op("Exp", b.op("Mul", bound, b.op("Tanh", b.op("Div", z, bound))))  # the same order as the module
    return b.op("Cast", b.op("Mul", b.op("Cast", "step", to=f64), beta), to=TensorProto.FLOAT)


def _asq_step_op(b: _Body) -> None:
    b.op("Identity", _asq_step(b), out="s")


def _asq_quantize(b: _Body) -> None:
    step = _asq_step(b)  # (N, 1): one step per sample
    # x as (N, -1) against the (N, 1) step, and back: Reshape copies nothing, and (unlike a
    # step reshaped to x's rank, whose shape ops onnxruntime does not fold) it is three ops
    flat = b.op("Reshape", "x", b.const([0, -1], np.int64))
    codes = b.quantize(flat, step, b.attr_const("qmin", "int"), b.attr_const("qmax", "int"))
    b.op("Reshape", b.op("Mul", codes, step), b.op("Shape", "x"), out="y")


def _power_grid_decode(b: _Body) -> None:
    # integer codes (INT4/INT8) to exact floats, shifted to table indices 0 .. 2 * levels
    # (Cast, not DequantizeLinear: onnxruntime constant-folds a Cast of initializers, so the
    # table lookup runs once at load)
    codes = b.op("Cast", "codes", to=TensorProto.FLOAT)
    index = b.op("Cast", b.op("Add", codes, b.attr_const("levels", "int")), to=TensorProto.INT64)
    b.op("Mul", b.op("Gather", "table", index, axis=0), "alpha", out="w")


def _adder_conv2d(b: _Body) -> None:
    a = b.quantize("x", "step", b.const(0.0), b.attr_const("qmax", "int"))
    # im2col as a convolution with identity kernels: patch channel j = (c, i, k) in the weight's
    # (C, kh, kw) order; every output is one code times 1, so it is exact
    inner = b.op("Shape", "w", start=1)  # (C, kh, kw)
    ck = b.op("ReduceProd", inner, keepdims=1)  # [C * kh * kw]
    eye = b.op("EyeLike", b.op("ConstantOfShape", b.op("Concat", ck, ck, axis=0)))
    kernel = b.op("Reshape", eye, b.op("Concat", ck, inner, axis=0))
    conv = helper.make_node("Conv", [a, kernel], ["patches"])
    for name in ("kernel_shape", "strides", "pads", "dilations"):
        _ref(conv, name, name, "ints")
    b.nodes.append(conv)
    patches = b.op("Unsqueeze", "patches", b.const([1], np.int64))  # (N, 1, CK, Ho, Wo)
    out_ch = b.op("Shape", "w", end=1)
    w4 = b.op("Reshape", "w", b.op("Concat", out_ch, ck, b.const([1, 1], np.int64), axis=0))  # (O, CK, 1, 1)
    dist = b.op("ReduceSum", b.op("Abs", b.op("Sub", patches, w4)), b.const([2], np.int64), keepdims=0)
    b.op("Mul", b.op("Neg", dist), "step", out="y")  # sums of small integers: exact before the one rounding


_BODIES: dict[str, Callable[[_Body], None]] = {
    "UniformQuantize": _uniform_quantize,
    "UniformCodes": _uniform_codes,
    "AsqQuantize": _asq_quantize,
    "AsqStep": _asq_step_op,
    "PowerGridDecode": _power_grid_decode,
    "AdderConv2d": _adder_conv2d,
}


def function_proto(name: str) -> FunctionProto:
    """The model-local function defining op ``name`` with standard ops (opset :data:`OPSET`)."""
    op = OPS[name]
    b = _Body()
    _BODIES[name](b)
    defaults = [helper.make_attribute(k, a.default) for k, a in op.attributes if not a.required]
    return helper.make_function(
        DOMAIN, name, list(op.inputs), list(op.outputs), b.nodes, [helper.make_opsetid("", OPSET)],
        attributes=[k for k, a in op.attributes if a.required], attribute_protos=defaults, doc_string=op.semantics,
    )


def make_node(name: str, inputs: list[str], outputs: list[str], node_name: str, **attrs) -> NodeProto:
    """A node of our domain; checks the attributes against the declaration."""
    op = OPS[name]
    decl = op.attrs
    unknown = set(attrs) - set(decl)
    missing = {k for k, a in decl.items() if a.required and k not in attrs}
    assert not unknown and not missing, f"{name}: unknown {sorted(unknown)}, missing {sorted(missing)}"
    assert len(inputs) == len(op.inputs) and len(outputs) == len(op.outputs), name
    return helper.make_node(name, inputs, outputs, name=node_name or None, domain=DOMAIN, **attrs)


def op_model(name: str, inputs: dict[str, np.ndarray], dynamic: tuple[str, ...] = ("x",), **attrs) -> onnx.ModelProto:
    """A one-node model of op ``name``: the ``dynamic`` inputs are graph inputs, the others initializers.

    What the tests run to hold a function body to the PyTorch quantizer.

    >>> m = op_model("UniformQuantize", {"x": np.zeros(3, np.float32), "step": np.float32(0.5)}, qmin=0, qmax=3)
    >>> [i.name for i in m.graph.input], [i.name for i in m.graph.initializer]
    (['x'], ['step'])
    """
    op = OPS[name]
    def dims(a: np.ndarray) -> list:
        return ["N", *np.shape(a)[1:]]

    graph_inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(inputs[k].dtype), dims(inputs[k]))
                    for k in op.inputs if k in dynamic]
    inits = [onnx.numpy_helper.from_array(np.asarray(inputs[k]), k) for k in op.inputs if k not in dynamic]
    node = make_node(name, list(op.inputs), list(op.outputs), name, **attrs)
    rank = np.ndim(inputs[op.inputs[0]])  # every op's output has its first input's rank
    outputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [f"{k}{i}" for i in range(rank)]) for k in op.outputs]
    graph = helper.make_graph([node], name, graph_inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                             functions=[function_proto(name)], ir_version=10, producer_name="qcompiler")


# --------------------------------------------------------------------------- NumPy references


def _uniform_ref(x, step, qmin, qmax):
    return (quantize_codes(np.asarray(x, np.float32), np.float32(step), qmin, qmax) * np.float32(step)).astype(np.float32)


def _codes_ref(x, step, qmin, qmax):
    return quantize_codes(np.asarray(x, np.float32), np.float32(step), qmin, qmax).astype(np.float32)


def _asq_step_ref(x, step, fc1_weight, fc1_bias, fc2_weight, fc2_bias, beta_bound=BETA_BOUND):
    x = np.asarray(x, np.float64)
    pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    hidden = np.maximum(pooled @ np.float64(fc1_weight).T + np.float64(fc1_bias), 0)
    z = hidden @ np.float64(fc2_weight).T + np.float64(fc2_bias)
    bound = np.float64(np.float32(beta_bound))
    return (np.float64(np.float32(step)) * np.exp(bound * np.tanh(z / bound))).astype(np.float32)


def _asq_ref(x, step, fc1_weight, fc1_bias, fc2_weight, fc2_bias, qmin, qmax, beta_bound=BETA_BOUND):
    x = np.asarray(x, np.float32)
    s = _asq_step_ref(x, step, fc1_weight, fc1_bias, fc2_weight, fc2_bias, beta_bound)
    flat = x.reshape(x.shape[0], -1)
    codes = np.clip(round_half_even(flat / s), qmin, qmax)
    return (codes * s).reshape(x.shape).astype(np.float32)


def _power_ref(codes, table, alpha, levels):
    return (table[np.asarray(codes, np.int64) + levels] * alpha).astype(np.float32)


def _adder_ref(x, step, w, qmax, kernel_shape, strides, pads, dilations):
    import torch

    from ..nn.adder import adder_conv2d

    a = np.clip(round_half_even(np.asarray(x, np.float32) / np.float32(step)), 0, qmax)
    pad = (pads[0], pads[1])
    assert pads[0] == pads[2] and pads[1] == pads[3], "symmetric padding only"
    y = adder_conv2d(torch.from_numpy(a), torch.from_numpy(np.asarray(w, np.float32)), tuple(strides), pad, tuple(dilations))
    return (y.numpy() * np.float32(step)).astype(np.float32)


_REFERENCES: dict[str, Callable[..., np.ndarray]] = {
    "UniformQuantize": _uniform_ref, "AsqQuantize": _asq_ref, "AsqStep": _asq_step_ref, "UniformCodes": _codes_ref, "PowerGridDecode": _power_ref, "AdderConv2d": _adder_ref,
}


def reference(name: str, *inputs, **attrs) -> np.ndarray:
    """The NumPy reference of op ``name`` (inputs in declaration order, attributes by name).

    >>> reference("UniformQuantize", np.array([0.25, 0.75, 9.0], np.float32), 0.5, qmin=0, qmax=3).tolist()
    [0.0, 1.0, 1.5]
    """
    return _REFERENCES[name](*inputs, **attrs)


__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "OPSET", "Attr", "CustomOp", "function_proto", "make_node", "op_model",
           "reference"]
