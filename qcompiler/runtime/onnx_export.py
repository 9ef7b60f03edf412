"""ONNX export of a frozen compiled graph: our custom ops (``custom``) or standard QDQ (``qdq``).

The emitter walks the fx graph once, in order, and emits the ONNX nodes of each fx
node; the tensor an fx node produces is named after it (auxiliary tensors
``<fx name>.<what>``), and so is the ONNX node computing it, so Netron's view maps
back to the IR dump (the names cost ~2 % of a 4-bit file). It reads only records (``qc.step``,
``qc.codes``, ``qc.adder_q``, ``qc.layer``, ``qc.join``) and the modules' frozen values
(batch-norm statistics, pooling shapes), as the integer backend does, and re-derives
nothing. Shapes are left to ONNX shape inference (no value_info).

Custom form (docs/design.md §1, form 2):

* activation quantizers are ``qcompiler.UniformQuantize`` / ``qcompiler.AsqQuantize``
  (:mod:`.onnx_ops`), each with its step as an initializer;
* uniform weights are INT4 (widths <= 4) or INT8 code initializers decoded by ``Cast``
  and a per-channel ``Mul`` (onnxruntime folds both once, at session load; it leaves a
  ``DequantizeLinear`` of constants alone, so that would decode on every run); a batch
  norm reading only such a conv is folded into its per-channel step and a bias;
  POT/POST weights are codes decoded by ``qcompiler.PowerGridDecode`` through a level
  table (``Gather``, no ``Pow``, also folded at load);
* other batch norms are ``BatchNormalization`` with two vectors of their own
  (``alpha``, ``beta``) and a shared zero mean and unit variance;
* adder layers are one ``qcompiler.AdderConv2d`` per scale group, whose outputs are
  concatenated and put back in channel order;
* everything else is a standard op computing what the fake-quant module computes in
  float32, so the file's outputs match the module's up to float32 rounding order.

The file is opset 21, its batch size is dynamic, the same graph gives the same bytes,
and :func:`save_onnx` writes it atomically (a temporary file, then ``os.replace``).

Example:
    >>> import qcompiler, torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> c = qcompiler.compile(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    ...                       qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(32, 4))
    >>> c.freeze(); model = to_onnx(c.module)
    >>> [n.op_type for n in model.graph.node]
    ['UniformQuantize', 'Cast', 'Mul', 'Gemm', 'Relu', 'UniformQuantize', 'Cast', 'Mul', 'Gemm', 'Identity']
"""

from __future__ import annotations

import math
import operator
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .. import ir
from ..analysis import join_operands, op_kind
from ..errors import QCompileError, UnsupportedError
from . import onnx_ops
from .lower import _shape

FORMATS = ("custom", "qdq")
BATCH = "N"  # the dynamic batch dimension
IR_VERSION = 10


class ExportError(QCompileError):
    """The compiled model cannot be exported as asked (a bad record value or an inexpressible scheme)."""


@dataclass
class _Emitter:
    gm: fx.GraphModule
    fmt: str = "custom"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # custom ops the graph uses
    folded: set[str] = field(default_factory=set)  # batch norms folded into the layer before them

    # ------------------------------------------------------------------ helpers

    def init(self, name: str, value: np.ndarray) -> str:
        assert name not in self.inits, name
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        # a node is named after the tensor it computes: the fx node's name, or ``<fx name>.<what>``
        del name
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def custom(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.used.add(op)
        self.nodes.append(onnx_ops.make_node(op, inputs, [output], output, **attrs))  # named as in node()
        return output

    def unsupported(self, node: fx.Node, why: str) -> UnsupportedError:
        return UnsupportedError(f"onnx export: `{node.format_node()}`: {why}")

    def src(self, node: fx.Node, i: int = 0) -> str:
        a = node.args[i]
        if not isinstance(a, fx.Node):
            raise self.unsupported(node, "a non-tensor operand")
        return a.name

    # ------------------------------------------------------------------ quantizers

    def quantizer(self, node: fx.Node) -> None:
        frozen = ir.get(node, ir.STEP, ir.FrozenAct)
        _positive(frozen.step, f"activation quantizer {node.name!r} step")
        step = self.init(f"{node.name}.step", np.float32(frozen.step))
        x = self.src(node)
        if frozen.adapter is None:
            self.custom("UniformQuantize", [x, step], node.name, node.name, qmin=frozen.qmin, qmax=frozen.qmax)
            return
        a = frozen.adapter
        if a.feature_axis != 1:  # AsqQuantize's body pools channels-first maps
            raise UnsupportedError(f"onnx export: ASQ quantizer {node.name!r} pools over tokens (features on the last "
                                   "axis), which the AsqQuantize op does not support yet")
        ws = [self.init(f"{node.name}.{k}", getattr(a, k).detach().float().numpy())
              for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
        self.custom("AsqQuantize", [x, step, *ws], node.name, node.name, qmin=frozen.qmin, qmax=frozen.qmax,
                    beta_bound=float(a.beta_bound))

    # ------------------------------------------------------------------ weights

    def weight(self, node: fx.Node, codes: ir.WeightCodes) -> str:
        """The layer's weight tensor, decoded from integer codes on its grid."""
        name = node.name
        c = codes.codes.numpy().astype(np.int64)
        scale = codes.scale.detach().float().numpy()
        _positive(scale, f"layer {name!r} weight scale")
        stored = self.init(f"{name}.codes", _int_codes(c, codes.bits))
        if codes.grid == "uniform":
            # Cast and Mul, not DequantizeLinear: onnxruntime folds these constants once at load
            # (its constant folding leaves DequantizeLinear alone, for QDQ fusion), and Cast of an
            # integer code times a float32 step is the same single rounding
            s = self.init(f"{name}.scale", scale.reshape(-1, *([1] * (c.ndim - 1))))
            exact = self.node("Cast", [stored], f"{name}.codes_f", f"{name}/cast", to=TensorProto.FLOAT)
            return self.node("Mul", [exact, s], f"{name}.weight", f"{name}/weight")
        if codes.grid in ("pot", "post"):
            levels = max(abs(codes.qmin), abs(codes.qmax))
            table = self.init(f"{name}.levels", _signed_levels(codes, levels))
            alpha = self.init(f"{name}.alpha", scale.reshape(-1, *([1] * (c.ndim - 1))))
            return self.custom("PowerGridDecode", [stored, table, alpha], f"{name}.weight", f"{name}/weight", levels=levels)
        raise self.unsupported(node, f"{codes.grid} weights on a multiply layer")

    def float_weight(self, node: fx.Node) -> str:
        m = self.gm.get_submodule(node.target)
        return self.init(f"{node.name}.weight", m.weight.detach().float().numpy())

    def bias(self, node: fx.Node, bias: torch.Tensor | None) -> list[str]:
        return [] if bias is None else [self.init(f"{node.name}.bias", bias.detach().float().numpy())]

    # ------------------------------------------------------------------ layers

    def following_bn(self, node: fx.Node) -> nn.Module | None:
        """The eval-mode batch norm that alone reads ``node``, if any (it is folded into the layer)."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        m = self.gm.get_submodule(users[0].target)
        ok = isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.training and m.running_mean is not None
        return m if ok else None

    def layer(self, node: fx.Node) -> None:
        info = ir.get(node, ir.LAYER, ir.LayerInfo)
        codes = ir.find(node, ir.CODES, ir.WeightCodes)
        quantized = codes is not None and ir.FLOAT not in node.meta
        if quantized and codes.grid == "uniform" and info.kind != "linear" and self.following_bn(node) is not None:
            return self.folded_layer(node, info, codes)
        if info.kind == "adder2d":
            if not quantized or ir.ADDER_Q not in node.meta:
                raise self.unsupported(node, "float adder layers have no ONNX form; quantize them (adder-groups, adder-shared)")
            return self.adder(node, info, codes)
        if info.padding_mode != "zeros":
            raise self.unsupported(node, f"padding_mode={info.padding_mode!r}")
        m = self.gm.get_submodule(node.target)
        w = self.weight(node, codes) if quantized else self.float_weight(node)
        b = self.bias(node, codes.bias if quantized else m.bias)
        x = self.src(node)
        if info.kind == "linear":
            if len(info.input_shape) == 1:
                self.node("Gemm", [x, w, *b], node.name, node.name, transB=1)
            else:  # (N, ..., C) inputs: MatMul on the transposed weight
                wt = self.node("Transpose", [w], f"{node.name}.weight_t", f"{node.name}/transpose", perm=[1, 0])
                out = self.node("MatMul", [x, wt], f"{node.name}.matmul" if b else node.name, node.name)
                if b:
                    self.node("Add", [out, b[0]], node.name, f"{node.name}/bias")
            return
        self.node("Conv", [x, w, *b], node.name, node.name, **_conv_attrs(info))

    def folded_layer(self, node: fx.Node, info: ir.LayerInfo, codes: ir.WeightCodes) -> None:
        """A uniform conv and the batch norm after it as one Conv: the codes times ``s_c * alpha_c``.

        ``alpha = gamma / sqrt(var + eps)``; the bias is ``(b - mean) * alpha + beta``. One
        vector per layer instead of the batch norm's four, and the convolution onnxruntime runs
        anyway (its ConvBNFusion folds the same way). It rounds differently from the module's
        conv-then-batch-norm in the last bit, like the convolution's own summation order.
        """
        bn_node = next(iter(node.users))
        bn = self.following_bn(node)
        alpha = _bn_alpha(bn)
        mean = bn.running_mean.double().numpy()
        b = codes.bias.detach().double().numpy() if codes.bias is not None else 0.0
        beta = bn.bias.detach().double().numpy() if bn.bias is not None else 0.0
        scale = codes.scale.detach().double().numpy() * alpha
        c = codes.codes.numpy().astype(np.int64)
        _positive(codes.scale.detach().float().numpy(), f"layer {node.name!r} weight scale")
        stored = self.init(f"{node.name}.codes", _int_codes(c, codes.bits))
        s = self.init(f"{node.name}.scale", scale.astype(np.float32).reshape(-1, *([1] * (c.ndim - 1))))
        exact = self.node("Cast", [stored], f"{node.name}.codes_f", f"{node.name}/cast", to=TensorProto.FLOAT)
        w = self.node("Mul", [exact, s], f"{node.name}.weight", f"{node.name}/weight")
        bias = self.init(f"{node.name}.bias", ((b - mean) * alpha + beta).astype(np.float32))
        self.folded.add(bn_node.name)
        self.node("Conv", [self.src(node), w, bias], bn_node.name, node.name, **_conv_attrs(info))

    def adder(self, node: fx.Node, info: ir.LayerInfo, codes: ir.WeightCodes) -> None:
        """One ``AdderConv2d`` per scale group, concatenated and put back in channel order."""
        rec = ir.get(node, ir.ADDER_Q, ir.AdderScales)
        if info.groups != 1:
            raise self.unsupported(node, "grouped adder layers")
        if rec.compensation_applies and rec.folded_into not in ("bias", ""):
            raise self.unsupported(node, f"adder compensation folded into {rec.folded_into!r} but still applying")
        _positive(np.asarray(rec.act_steps), f"adder layer {node.name!r} group step")
        c = codes.codes.numpy().astype(np.int64)
        group = np.asarray(rec.group_of_channel, dtype=np.int64)
        attrs = _conv_attrs(info, keep_defaults=True)  # AdderConv2d's attributes are required
        attrs.pop("group")
        qmax = 2**rec.act_bits - 1
        ratio = self.init(f"{node.name}.ratio", np.float32(rec.weight_step_ratio))
        outs, order = [], []
        for g, step in enumerate(rec.act_steps):
            channels = np.flatnonzero(group == g)
            if channels.size == 0:
                continue
            order.extend(channels.tolist())
            stored = self.init(f"{node.name}.codes{g}", _int_codes(c[channels], codes.bits))
            # weight codes times the integer ratio: the weights in activation steps, exact
            w = self.node("DequantizeLinear", [stored, ratio], f"{node.name}.w{g}", f"{node.name}/weight{g}")
            s = self.init(f"{node.name}.step{g}", np.float32(step))
            last = len(outs) == 0 and len(channels) == len(group) and codes.bias is None
            out = node.name if last else f"{node.name}.g{g}"
            outs.append(self.custom("AdderConv2d", [self.src(node), s, w], out, f"{node.name}/group{g}", qmax=qmax, **attrs))
        if len(outs) == 1 and outs[0] == node.name:
            return
        y = outs[0]
        if len(outs) > 1:
            y = self.node("Concat", outs, f"{node.name}.cat", f"{node.name}/concat", axis=1)
        if order != sorted(order):
            inverse = np.argsort(np.asarray(order, dtype=np.int64))
            idx = self.init(f"{node.name}.channel_order", inverse)
            y = self.node("Gather", [y, idx], f"{node.name}.ordered" if codes.bias is not None else node.name,
                          f"{node.name}/order", axis=1)
        if codes.bias is not None:
            b = self.init(f"{node.name}.bias", codes.bias.detach().float().numpy().reshape(-1, 1, 1))
            y = self.node("Add", [y, b], node.name, f"{node.name}/bias")
        if y != node.name:
            self.node("Identity", [y], node.name, node.name)

    # ------------------------------------------------------------------ other ops

    def module_op(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        x, name = self.src(node), node.name
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
            self.node("Identity", [x], name, name)
        elif isinstance(m, nn.ReLU):
            self.node("Relu", [x], name, name)
        elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
            self.clip(node, lo, hi)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.batchnorm(node, m)
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            self.pool(node, "MaxPool", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        elif isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
            if getattr(m, "divisor_override", None):
                raise self.unsupported(node, "average pooling with divisor_override")
            self.pool(node, "AveragePool", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode,
                      count_include_pad=int(m.count_include_pad))
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            self.adaptive_avgpool(node, m.output_size)
        elif isinstance(m, nn.Flatten):
            self.flatten(node, m.start_dim, m.end_dim)
        else:
            raise self.unsupported(node, f"module {type(m).__name__} has no ONNX form here")

    def clip(self, node: fx.Node, lo: float, hi: float) -> None:
        bounds = [self.init(f"{node.name}.lo", np.float32(lo)), self.init(f"{node.name}.hi", np.float32(hi))]
        self.node("Clip", [self.src(node), *bounds], node.name, node.name)

    def batchnorm(self, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> None:
        if m.training or m.running_mean is None:
            raise self.unsupported(node, "batch norm without running statistics (call .eval())")
        # two vectors per layer instead of four: alpha = gamma / sqrt(var + eps) and
        # beta = bias - mean * alpha, in float32 as PyTorch's CPU batch norm computes them in eval
        # mode; the mean (zeros) and variance (ones, epsilon 0) are shared by every layer of a width,
        # so BatchNormalization computes x * alpha + beta: (x - 0) / sqrt(1 + 0) is x exactly
        c = m.num_features
        gamma = m.weight.detach().float() if m.weight is not None else torch.ones(c)
        bias = m.bias.detach().float() if m.bias is not None else torch.zeros(c)
        alpha = gamma * (1.0 / torch.sqrt(m.running_var.float() + m.eps))
        beta = bias - m.running_mean.float() * alpha
        a = self.init(f"{node.name}.alpha", alpha.numpy())
        b = self.init(f"{node.name}.beta", beta.numpy())
        mean, var = f"batchnorm.zeros{c}", f"batchnorm.ones{c}"
        if mean not in self.inits:
            self.init(mean, np.zeros(c, np.float32))
            self.init(var, np.ones(c, np.float32))
        self.node("BatchNormalization", [self.src(node), a, b, mean, var], node.name, node.name, epsilon=0.0)

    def pool(self, node: fx.Node, op: str, kernel, stride, padding, dilation, ceil_mode, **extra) -> None:
        d = len(_shape(node)) - 1
        tup = lambda v: [int(v)] * d if isinstance(v, int) else [int(i) for i in v]  # noqa: E731
        stride = kernel if stride is None or stride == [] or stride == () else stride
        pads = tup(padding)
        attrs = {"kernel_shape": tup(kernel), "strides": tup(stride), "pads": pads + pads, "ceil_mode": int(ceil_mode)}
        if op == "MaxPool":
            attrs["dilations"] = tup(dilation)
        self.node(op, [self.src(node)], node.name, node.name, **attrs, **extra)

    def adaptive_avgpool(self, node: fx.Node, output_size) -> None:
        in_shape = _shape(node.args[0])[1:]
        out = [output_size] * len(in_shape) if isinstance(output_size, int) else list(output_size)
        out = [i if o is None else o for o, i in zip(out, in_shape)]
        if all(o == 1 for o in out):
            self.node("GlobalAveragePool", [self.src(node)], node.name, node.name)
            return
        if any(i % o for i, o in zip(in_shape, out)):
            raise self.unsupported(node, "adaptive average pooling whose output does not divide the input")
        kernel = [i // o for i, o in zip(in_shape, out)]
        self.pool(node, "AveragePool", kernel, kernel, 0, 1, False)

    def flatten(self, node: fx.Node, start: int, end: int) -> None:
        rank = len(_shape(node.args[0])) + 1
        if start < 0:
            start += rank
        if end in (-1, rank - 1) and start >= 1:
            self.node("Flatten", [self.src(node)], node.name, node.name, axis=start)
            return
        self.reshape(node)

    def reshape(self, node: fx.Node) -> None:
        shape = self.init(f"{node.name}.shape", np.array([-1, *_shape(node)], dtype=np.int64))
        self.node("Reshape", [self.src(node), shape], node.name, node.name)

    def join(self, node: fx.Node, operands: list[fx.Node]) -> None:
        kind = ir.find(node, ir.JOIN, ir.Join)
        kind = kind.kind if kind is not None else ("cat" if node.target in (torch.cat, torch.concat) else "add")
        names = [a.name for a in operands]
        if kind == "cat":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim == 0 or dim == -(len(_shape(node)) + 1):
                raise self.unsupported(node, "concat along the batch axis")
            self.node("Concat", names, node.name, node.name, axis=int(dim))
            return
        if node.kwargs.get("alpha", 1) != 1:
            raise self.unsupported(node, "add/sub with alpha")
        self.node("Add" if kind == "add" else "Sub", names, node.name, node.name)

    def scalar(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        tensor, number = (a, b) if isinstance(a, fx.Node) else (b, a)
        if not isinstance(number, (int, float)):
            raise self.unsupported(node, "arithmetic with a non-number")
        op = node.target if node.op == "call_function" else getattr(operator, node.target)
        ops = {"mul": "Mul", "truediv": "Div", "div": "Div", "add": "Add", "sub": "Sub"}
        onnx_op = ops.get(getattr(op, "__name__", str(op)))
        if onnx_op is None:
            raise self.unsupported(node, "scalar arithmetic other than + - * /")
        k = self.init(f"{node.name}.value", np.float32(number))
        args = [tensor.name, k] if tensor is a else [k, tensor.name]
        self.node(onnx_op, args, node.name, node.name)

    def function_call(self, node: fx.Node) -> None:
        fname = getattr(node.target, "__name__", str(node.target))
        if fname == "relu":
            self.node("Relu", [self.src(node)], node.name, node.name)
        elif fname == "relu6":
            self.clip(node, 0.0, 6.0)
        elif fname == "flatten":
            kw = dict(zip(("start_dim", "end_dim"), node.args[1:])) | node.kwargs
            self.flatten(node, kw.get("start_dim", 0 if node.op == "call_function" else 0), kw.get("end_dim", -1))
        elif fname in ("view", "reshape", "squeeze", "unsqueeze"):
            self.reshape(node)
        elif fname in ("contiguous", "clone", "detach", "dropout"):
            self.node("Identity", [self.src(node)], node.name, node.name)
        elif fname in ("max_pool1d", "max_pool2d"):
            kw = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:])) | node.kwargs
            self.pool(node, "MaxPool", kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), kw.get("dilation", 1),
                      kw.get("ceil_mode", False))
        elif op_kind(self.gm, node) == "scalar":
            self.scalar(node)
        else:
            raise self.unsupported(node, f"{fname} has no ONNX form here")

    def node_of(self, node: fx.Node) -> None:
        if node.name in self.folded:  # the layer before it computed this tensor
            return
        if node.op == "placeholder":
            self.inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, [BATCH, *_shape(node)]))
            return
        if ir.ACT in node.meta:
            self.quantizer(node)
        elif ir.LAYER in node.meta:
            self.layer(node)
        elif node.op == "get_attr":
            raise self.unsupported(node, "parameters read by the graph")
        elif join_operands(node) is not None:
            self.join(node, join_operands(node))
        elif node.op == "call_module":
            self.module_op(node)
        else:
            self.function_call(node)

    def model(self, output: fx.Node) -> onnx.ModelProto:
        out = output.args[0]
        if not isinstance(out, fx.Node):
            raise UnsupportedError("onnx export: only a single tensor output is supported")
        self.node("Identity", [out.name], "output", "output")
        outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH, *_shape(out)])]
        # no value_info: shape inference recovers every shape (batch dimension "N" included)
        graph = helper.make_graph(self.nodes, "qcompiler", self.inputs, outputs, list(self.inits.values()))
        opsets = [helper.make_opsetid("", onnx_ops.OPSET)]
        functions = [onnx_ops.function_proto(op) for op in sorted(self.used)]
        if functions:
            opsets.append(helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION))
        return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=IR_VERSION,
                                 producer_name="qcompiler", producer_version=str(onnx_ops.DOMAIN_VERSION))


# --------------------------------------------------------------------------- helpers


def _positive(v, what: str) -> None:
    """Refuse a non-positive or non-finite step or scale: the file would compute nonsense."""
    a = np.asarray(v, dtype=np.float64)
    if a.size and not (np.all(np.isfinite(a)) and np.all(a > 0)):
        bad = a[~(np.isfinite(a) & (a > 0))].flat[0]
        raise ExportError(f"{what} is {bad:g}; a quantizer step must be positive and finite (re-run freeze after training)")


def _bn_alpha(m: nn.Module) -> np.ndarray:
    """A batch norm's per-channel factor ``gamma / sqrt(var + eps)``, float64."""
    gamma = m.weight.detach().double().numpy() if m.weight is not None else 1.0
    return gamma / np.sqrt(m.running_var.double().numpy() + m.eps)


def _code_dtype(bits: int):
    return ml_dtypes.int4 if bits <= 4 else np.int8 if bits <= 8 else np.int16


def _int_codes(c: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes in the narrowest ONNX type: INT4 up to 4 bits, INT8 up to 8, INT16 beyond."""
    return c.astype(_code_dtype(bits))


def _signed_levels(codes: ir.WeightCodes, levels: int) -> np.ndarray:
    """The decoding table ``table[levels + s*m] = s * base^-(m-1)`` (``table[levels] = 0``), float32.

    Built from the record's exact constants: POT ``2^-k``; POST ``2^-(k//2)`` times, for odd
    ``k``, ``post_mantissa * 2^-post_shift`` (float32's ``1/sqrt 2``, as the module uses).
    """
    k = np.arange(levels, dtype=np.int64)
    if codes.grid == "pot":
        mags = np.ldexp(1.0, -k)
    else:
        odd = np.where(k % 2 == 1, codes.post_mantissa * 2.0**-codes.post_shift, 1.0)
        mags = np.ldexp(odd, -(k // 2))
    pos = mags.astype(np.float32)
    return np.concatenate([-pos[::-1], [np.float32(0)], pos]).astype(np.float32)


def _conv_attrs(info: ir.LayerInfo, keep_defaults: bool = False) -> dict:
    """Conv attributes; those at ONNX's defaults (strides, dilations 1, no padding, group 1) left out."""
    before, after = info.padding[0::2], info.padding[1::2]
    attrs = {"kernel_shape": list(info.kernel_size), "strides": list(info.stride), "pads": [*before, *after],
             "dilations": list(info.dilation), "group": info.groups}
    if keep_defaults:
        return attrs
    del attrs["kernel_shape"]  # Conv infers it from the weight
    defaults = {"strides": [1] * len(info.stride), "pads": [0] * len(info.padding), "dilations": [1] * len(info.dilation),
                "group": 1}
    return {k: v for k, v in attrs.items() if defaults.get(k) != v}


def to_onnx(gm: fx.GraphModule, fmt: str = "custom") -> onnx.ModelProto:
    """The ONNX model of a frozen, verified compiled graph (``Compiled.freeze()`` first).

    Args:
        gm: the compiled module, its records frozen.
        fmt: ``"custom"`` (our ``qcompiler`` ops, every scheme) or ``"qdq"`` (standard
            QuantizeLinear/DequantizeLinear, uniform schemes only).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown ONNX format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "qdq":
        from .onnx_qdq import _QdqEmitter  # it builds on this module's emitter

        em = _QdqEmitter(gm, fmt)
    else:
        em = _Emitter(gm, fmt)
    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output = node
            continue
        em.node_of(node)
    if len(em.inputs) != 1 or output is None:
        raise UnsupportedError("onnx export: the model must have exactly one input and one tensor output")
    return em.model(output)


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file beside it, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_onnx(compiled, path: str | Path, fmt: str = "custom") -> Path:
    """Freeze and verify ``compiled``, export it and write the file atomically."""
    compiled.freeze()
    return save_onnx(to_onnx(compiled.module, fmt), path)


@dataclass(frozen=True)
class OnnxParity:
    """How an exported file agrees with the fake-quant module on the same inputs."""

    max_abs_diff: float
    output_range: float  # max - min of the module's outputs
    classes_agree: float  # fraction of samples whose arg-max agrees
    samples: int

    @property
    def relative(self) -> float:
        """The largest difference as a fraction of the output range."""
        return self.max_abs_diff / self.output_range if self.output_range > 0 else self.max_abs_diff

    def ok(self, relative: float = 1e-4, classes: float = 1.0) -> bool:
        return self.relative <= relative and self.classes_agree >= classes

    def text(self) -> str:
        return (f"onnx parity: max |diff| {self.max_abs_diff:.3g} = {self.relative:.3g} of the output range "
                f"{self.output_range:.3g}; classes agree {100 * self.classes_agree:.2f} % of {self.samples}")


# onnxruntime rewrites that change float32 arithmetic, not the function: folding a batch norm
# (or a constant Mul/Add) into the convolution's weights rounds differently from running it after
# the convolution, and the NCHWc convolution kernels (chosen once the weights are constants) sum
# in another order. Parity checks the file as written, so it runs without them; deployment keeps them.
REASSOCIATING = ("ConvBNFusion", "ConvMulFusion", "ConvAddFusion", "NchwcTransformer")


def session(model: onnx.ModelProto | str | Path, options=None, as_written: bool = False):
    """A stock CPU ``onnxruntime`` session (no extension library) on a model or a file.

    ``as_written`` turns off the optimizers (:data:`REASSOCIATING`) that fold one float op into
    another and so round differently from the file's op-by-op arithmetic.
    """
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    extra = {"disabled_optimizers": list(REASSOCIATING)} if as_written else {}
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"], **extra)


@torch.no_grad()
def onnx_parity(compiled, model: onnx.ModelProto | str | Path, x: torch.Tensor, batch_size: int = 64,
                options=None) -> OnnxParity:
    """Run the file in onnxruntime and the fake-quant module on ``x``; compare outputs and classes.

    >>> parity = onnx_parity(compiled, "model.onnx", data.x_test)  # doctest: +SKIP
    >>> parity.ok()  # doctest: +SKIP
    True
    """
    sess = session(model, options, as_written=True)
    name = sess.get_inputs()[0].name
    module = compiled.module.eval()
    got, want = [], []
    for batch in torch.as_tensor(x).float().split(batch_size):
        got.append(sess.run(None, {name: batch.numpy()})[0])
        want.append(module(batch).float().numpy())
    got, want = np.concatenate(got), np.concatenate(want)
    return OnnxParity(float(np.abs(got - want).max()), float(want.max() - want.min()),
                      float((got.argmax(-1) == want.argmax(-1)).mean()), len(want))


__all__ = ["FORMATS", "ExportError", "OnnxParity", "export_onnx", "onnx_parity", "save_onnx", "session", "to_onnx"]
