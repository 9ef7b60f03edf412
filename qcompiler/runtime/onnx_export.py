"""ONNX export of a frozen compiled graph: our custom ops (``custom``) or standard QDQ (``qdq``).

The emitter walks the fx graph once, in order, and emits the ONNX nodes of each fx
node; the tensor an fx node produces is named after it (auxiliary tensors
``<fx name>.<what>``), and so is the ONNX node computing it, so Netron's view maps
back to the IR dump (the names cost ~2 % of a 4-bit file). It reads only records (``qc.step``,
``qc.codes``, ``qc.adder_q``, ``qc.layer``, ``qc.join``) and the modules' frozen values
(batch-norm statistics, pooling shapes), as the integer backend does, and re-derives
nothing. Shapes are left to ONNX shape inference (no value_info).

Custom form (docs/design.md §1, form 2). It computes what the deployed fake-quant module
computes (eval mode, no autograd: :mod:`qcompiler.nn.exact`, docs/design.md §4.7), op for
op, with the same float32 constants, so onnxruntime and PyTorch agree bit for bit:

* activation quantizers are ``qcompiler.UniformQuantize`` / ``qcompiler.AsqQuantize``
  (:mod:`.onnx_ops`), each with its step as an initializer; a uniform quantizer read only
  by integer layers is ``qcompiler.UniformCodes`` (its codes, not times the step);
* a quantized layer with an integer form (uniform, POT, POST; :func:`exact.plan_layer`)
  convolves the input codes with integer weights, INT4 (widths <= 4) or INT8 code
  initializers decoded by ``Cast`` (uniform) or a table (``qcompiler.PowerGridDecode``,
  POT/POST; POST as an even and an odd convolution, ``acc_even + c * acc_odd``), which
  onnxruntime folds once at load. The sums are exact in float32; the batch norm reading
  only the layer is folded into the per-channel ``Mul`` by ``step * unit[c]``, the bias is
  added before it in whole accumulator steps (a scalar input step) or after it (ASQ's
  per-sample step, from ``qcompiler.AsqStep``);
* a layer without one (a partial sum could reach 2^24) convolves dequantized weights, as
  the module does there, and is listed in the file's metadata (:data:`FLOAT_LAYERS`);
* other batch norms are ``Mul`` and ``Add`` with the module's two float32 vectors;
  global average pooling is a ``ReduceMean`` in float64;
* adder layers are one ``qcompiler.AdderConv2d`` per scale group, whose outputs are
  concatenated and put back in channel order;
* everything else is a standard op computing what the fake-quant module computes in float32.

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
    ['UniformCodes', 'Cast', 'Gemm', 'Add', 'Mul', 'Relu', 'UniformCodes', 'Cast', 'Gemm', 'Add', 'Mul', 'Identity']
"""

from __future__ import annotations

import itertools
import operator
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
from ..atomic import staged_file
from ..nn import exact
from ..analysis import (ADAPTIVE_AVG_POOLS, AVG_POOLS, BATCH_NORMS, MAX_POOLS, avg_pool_call, max_pool_call, class_axis, emits_nothing, feeds_only_constants, is_identity, is_nearest_upsampling,
                        join_operands, nearest_positions, op_kind, padding_call, padding_positions, shape_built_tensors, single_output, sole_tensor,
                        static_index, tensor_domains, upsampling_call)
from ..errors import QCompileError, UnsupportedError
from ..frontend import TRANSPOSED_KINDS
from ..training_calls import is_eval_identity
from . import onnx_ops
from .interpreter import adaptive_windows
from .lower import _shape

FORMATS = ("custom", "qdq")
FLOAT_LAYERS = "qcompiler.float_layers"  # metadata: quantized layers without an exact integer form
BATCH = "N"  # the dynamic batch dimension
IR_VERSION = 10
# Activations a float region computes (modules and their functions / methods), by ONNX form.
_FLOAT_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                      nn.Hardsigmoid: "hardsigmoid"}
_TENSOR_ARITHMETIC = {"mul": "Mul", "multiply": "Mul", "add": "Add", "iadd": "Add", "sub": "Sub", "truediv": "Div",
                      "div": "Div"}
_FLOAT_ACTIVATION_FUNCTIONS = set(_FLOAT_ACTIVATIONS.values())  # F.silu, torch.sigmoid, x.tanh(), ... by name


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
    steps: dict[tuple[str, int], str] = field(default_factory=dict)  # (quantizer, rank) -> its step, broadcastable
    inexact: list[str] = field(default_factory=list)  # quantized layers computed on dequantized floats

    def __post_init__(self) -> None:
        try:  # masks and position ids built from the input's shape: constants of the file
            domains = tensor_domains(self.gm)
            self.shape_built = shape_built_tensors(self.gm, domains)
        except ValueError as e:
            raise UnsupportedError(f"onnx export: {e}") from None
        self.const_only = feeds_only_constants(self.gm, domains)

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
        # per channel (a join operand): (1, C, 1, ...), which the elementwise body broadcasts
        step = self.init(f"{node.name}.step", frozen.sample_steps(len(_shape(node)) + 1).astype(np.float32))
        x = self.src(node)
        if frozen.adapter is not None and not frozen.adapter.pools_channels_first(node):  # the ASQ ops pool channels-first maps
            raise UnsupportedError(f"onnx export: ASQ quantizer {node.name!r} pools over tokens (features on the last "
                                   "axis), which the AsqQuantize and AsqStep ops do not support yet")
        integer_users = [self.fmt == "custom" and self.integer_plan(u) is not None for u in node.users]
        if not any(integer_users):
            if frozen.adapter is None:
                self.custom("UniformQuantize", [x, step], node.name, node.name, qmin=frozen.qmin, qmax=frozen.qmax)
            else:
                a = frozen.adapter
                ws = [self.init(f"{node.name}.{k}", getattr(a, k).detach().float().numpy())
                      for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
                self.custom("AsqQuantize", [x, step, *ws], node.name, node.name, qmin=frozen.qmin, qmax=frozen.qmax,
                            beta_bound=float(a.beta_bound))
            return
        # integer layers read the codes (under ASQ against the per-sample step, qcompiler.AsqStep);
        # the values, codes times the step, only if another op reads them
        s = self.grid_step(node, len(_shape(node)) + 1)
        codes = self.custom("UniformCodes", [x, s], f"{node.name}.codes", f"{node.name}.codes",
                            qmin=frozen.qmin, qmax=frozen.qmax)
        if not all(integer_users):
            self.node("Mul", [codes, s], node.name, node.name)

    def grid_step(self, q: fx.Node, rank: int) -> str:
        """The step of quantizer ``q``'s output, shaped to broadcast over a rank-``rank`` tensor.

        A scalar for LSQ; ASQ's per-sample step ``(N, 1)`` (``AsqStep``, the adapter the
        quantizer ran) reshaped to ``(N, 1, ..., 1)``. Emitted once per quantizer and rank.
        """
        frozen = ir.get(q, ir.STEP, ir.FrozenAct)
        if frozen.adapter is None:
            return f"{q.name}.step"
        key = (q.name, rank)
        if key not in self.steps:
            sample = f"{q.name}.sample_step"
            if (q.name, 2) not in self.steps:
                a = frozen.adapter
                ws = [self.init(f"{q.name}.{k}", getattr(a, k).detach().float().numpy())
                      for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
                self.custom("AsqStep", [self.src(q), f"{q.name}.step", *ws], sample, sample,
                            beta_bound=float(frozen.adapter.beta_bound))
                self.steps[(q.name, 2)] = sample
            if rank != 2:  # Unsqueeze, not Reshape: shape inference keeps the batch dimension N
                axes = self.init(f"{sample}.axes{rank}", np.arange(2, rank, dtype=np.int64))
                self.steps[key] = self.node("Unsqueeze", [sample, axes], f"{sample}{rank}", f"{sample}{rank}")
        return self.steps[key]

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
        ok = isinstance(m, BATCH_NORMS) and not m.training and m.running_mean is not None
        return m if ok else None

    def layer(self, node: fx.Node) -> None:
        info = ir.get(node, ir.LAYER, ir.LayerInfo)
        codes = ir.find(node, ir.CODES, ir.WeightCodes)
        quantized = codes is not None and ir.FLOAT not in node.meta
        if info.kind == "embedding":  # the rows the module looks up: the weight decoded as it decodes it, then Gather
            w = self.weight(node, codes) if quantized else self.float_weight(node)
            self.node("Gather", [w, self.src(node)], node.name, node.name, axis=0)
            return
        if quantized and info.kind != "adder2d" and info.padding_mode == "zeros" and self.integer_layer(node, info, codes):
            return
        if quantized and info.kind != "adder2d" and self.fmt == "custom":
            self.inexact.append(node.name)
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
        self.conv(info, x, w, b, node.name, node.name, channel_first=quantized)

    def conv(self, info: ir.LayerInfo, x: str, w: str, b: list[str], out: str, name: str, channel_first: bool) -> str:
        """``Conv``, or ``ConvTranspose`` for a transposed layer. A weight output channel first (codes,
        :mod:`qcompiler.nn.layout`) is put back in ConvTranspose's ``(in, out/groups, *k)`` first: a
        Reshape/Transpose/Reshape of a constant, which onnxruntime folds, moving values without rounding."""
        if info.kind not in TRANSPOSED_KINDS:
            return self.node("Conv", [x, w, *b], out, name, **_conv_attrs(info))
        if channel_first and info.groups == 1:  # (out, in, *k) -> (in, out, *k); also an input-channel range's
            w = self.node("Transpose", [w], f"{w}_layout", f"{w}/layout", perm=[1, 0, *range(2, 2 + len(info.kernel_size))])
        elif channel_first:  # group by group: (g, out/g, in/g, *k) -> (g, in/g, out/g, *k)
            k, g = list(info.kernel_size), info.groups
            split = self.init(f"{w}.groups", np.array([g, info.out_channels // g, info.in_channels // g, *k], np.int64))
            merged = self.init(f"{w}.layout", np.array([info.in_channels, info.out_channels // g, *k], np.int64))
            w = self.node("Reshape", [w, split], f"{w}.grouped", f"{w}/grouped")
            w = self.node("Transpose", [w], f"{w}_t", f"{w}/transpose", perm=[0, 2, 1, *range(3, 3 + len(k))])
            w = self.node("Reshape", [w, merged], f"{w}_layout", f"{w}/layout")
        attrs = _conv_attrs(info)
        if any(info.output_padding):
            attrs["output_padding"] = list(info.output_padding)
        return self.node("ConvTranspose", [x, w, *b], out, name, **attrs)

    def product(self, info: ir.LayerInfo, x: str, w: str, out: str) -> str:
        """The layer's exact integer sum of codes ``x`` and integer weights ``w``: Conv, Gemm or MatMul."""
        if info.kind != "linear":
            return self.conv(info, x, w, [], out, out, channel_first=True)
        if len(info.input_shape) == 1:
            return self.node("Gemm", [x, w], out, out, transB=1)
        wt = self.node("Transpose", [w], f"{w}.t", f"{w}/transpose", perm=[1, 0])
        return self.node("MatMul", [x, wt], out, out)

    def ranges_sum(self, info: ir.LayerInfo, plan: exact.LayerPlan, x: str, w: str, in_axis: int, out: str) -> str:
        """The exact sum of codes ``x`` and integer weights ``w`` in float64: one product, or one
        per input-channel range of ``plan.chunks`` (each exact in float32) added up."""
        if not plan.chunks:
            acc = self.product(info, x, w, out)
            return self.node("Cast", [acc], f"{acc}.f64", f"{acc}/f64", to=TensorProto.DOUBLE)
        total = None
        for i, (a, b) in enumerate(plan.chunks):
            xi = self.channel_slice(x, in_axis, a, b, f"{out}.codes_{i}")
            wi = self.channel_slice(w, 1, a, b, f"{out}.weight_{i}")
            acc_i = self.product(info, xi, wi, f"{out}_{i}")
            acc_i = self.node("Cast", [acc_i], f"{acc_i}.f64", f"{acc_i}/f64", to=TensorProto.DOUBLE)
            total = acc_i if total is None else self.node("Add", [total, acc_i], f"{out}_sum{i}", "")
        return total

    def weight_band(self, w: str, shift: int, bits: int, out: str) -> str:
        """:func:`exact.weight_band` of float integers ``w``: ``sign(w) * (floor(|w| / 2^shift) mod 2^bits)``,
        exact in float32 (constants: folded when the session loads)."""
        scale = self.init(f"{out}.div", np.float32(2.0**shift))
        modulus = self.init(f"{out}.mod", np.float32(2.0**bits))
        mag = self.node("Floor", [self.node("Div", [self.node("Abs", [w], f"{out}.abs", ""), scale], f"{out}.div_", "")],
                        f"{out}.floor", "")
        mag = self.node("Mod", [mag, modulus], f"{out}.mag", "", fmod=1)
        return self.node("Mul", [mag, self.node("Sign", [w], f"{out}.sign", "")], out, "")

    def channel_slice(self, x: str, axis: int, start: int, stop: int, out: str) -> str:
        """``x`` restricted to channels ``[start, stop)`` along ``axis``."""
        ends = [self.init(f"{out}.{k}", np.array([v], np.int64)) for k, v in (("start", start), ("stop", stop), ("axis", axis))]
        return self.node("Slice", [x, *ends], out, out)

    def integer_plan(self, node: fx.Node) -> tuple[ir.FrozenAct, exact.LayerPlan] | None:
        """How the module computes ``node`` on integer codes when deployed (:func:`exact.frozen_layer`,
        from the same record values and the same bounds), or None where it keeps the float formula."""
        info, codes = ir.find(node, ir.LAYER, ir.LayerInfo), ir.find(node, ir.CODES, ir.WeightCodes)
        if info is None or codes is None or ir.FLOAT in node.meta or info.kind == "adder2d" or info.padding_mode != "zeros":
            return None
        q = node.args[0]
        frozen = ir.find(q, ir.STEP, ir.FrozenAct) if isinstance(q, fx.Node) else None
        weight = exact.integer_weight(codes.grid, codes.codes, codes.scale, codes.max_exponent)
        if frozen is None or weight is None:
            return None
        plan = _plan(self.gm, node, frozen, codes, weight)
        return None if plan is None else (frozen, plan)

    def integer_layer(self, node: fx.Node, info: ir.LayerInfo, codes: ir.WeightCodes) -> bool:
        """The layer on integer codes, as the deployed module computes it (:func:`exact.frozen_layer`).

        The codes of the input (``UniformCodes``, or ``Round(x / step)`` under ASQ), the conv (or
        Gemm) of the codes with the integer weights, exact in float32, then one ``Mul`` by
        ``step * unit[c]``: after ``Add`` of the integer bias (a scalar step), or before ``Add``
        of the float bias (ASQ). A batch norm reading only this layer is folded in, as the
        module folds it. False (nothing emitted) where the module keeps the float formula.
        """
        found = self.integer_plan(node)
        if found is None:
            return False
        q = node.args[0]
        frozen, plan = found
        weight = plan.weight
        _positive(codes.scale.detach().float().numpy(), f"layer {node.name!r} weight scale")
        name, rank = node.name, len(_shape(node)) + 1
        axis = rank - 1 if info.kind == "linear" else 1
        out = name
        if plan.bn is not None:
            (bn_node,) = node.users
            self.folded.add(bn_node.name)
            out = bn_node.name
        unit = exact.channel_view(plan.unit, rank, axis)[0].numpy()  # per-sample shape
        step = self.grid_step(q, len(_shape(q)) + 1)
        x = f"{q.name}.codes"  # UniformCodes, emitted by the quantizer
        stored = self.init(f"{name}.codes", _int_codes(codes.codes.numpy().astype(np.int64), codes.bits))
        accs = []
        in_axis = rank - 1 if info.kind == "linear" else 1  # the input's channel axis, the weight's is 1
        for part, which in zip(weight.parts(), ("", "_odd")):
            if codes.grid == "uniform":
                w = self.node("Cast", [stored], f"{name}.weight_int", f"{name}/cast", to=TensorProto.FLOAT)
            else:  # POT/POST: the integers 2^(J-j) of each exponent part, decoded from the codes by a table
                levels = max(abs(codes.qmin), abs(codes.qmax))
                table = self.init(f"{name}.levels{which}", _integer_levels(codes.grid, levels, max(codes.max_exponent, 0), which == "_odd"))
                if f"{name}.one" not in self.inits:
                    self.init(f"{name}.one", np.ones([1] * part.dim(), np.float32))
                w = self.custom("PowerGridDecode", [stored, table, f"{name}.one"], f"{name}.weight_int{which}",
                                f"{name}/decode{which}", levels=levels)
            if not plan.wide:
                accs.append(self.product(info, x, w, f"{name}.acc{which}"))
                continue
            if not plan.band_bits:
                accs.append(self.ranges_sum(info, plan, x, w, in_axis, f"{name}.acc{which}"))
                continue
            # weight bands, each exact, scaled by 2^shift and added in float64 in order (exact.integer_layer)
            total = None
            for shift in plan.band_shifts:
                wb = self.weight_band(w, shift, plan.band_bits, f"{name}.weight_int{which}_b{shift}")
                band = self.ranges_sum(info, plan, x, wb, in_axis, f"{name}.acc{which}_b{shift}")
                band = self.node("Mul", [band, self.init(f"{band}.scale", np.float64(2.0**shift))], f"{band}.scaled", "")
                total = band if total is None else self.node("Add", [total, band], f"{band}.total", "")
            accs.append(total)
        if plan.wide and (weight.odd is not None or plan.int_bias is None):  # back to float32, rounded once
            accs = [self.node("Cast", [a], f"{a}.f32", f"{a}/f32", to=TensorProto.FLOAT) for a in accs]
        acc = accs[0]
        if weight.odd is not None:  # acc_even + c * acc_odd, as the module adds them
            c = self.init(f"{name}.odd_factor", np.float32(weight.odd_factor))
            odd = self.node("Mul", [accs[1], c], f"{name}.acc_odd_scaled", f"{name}/odd")
            acc = self.node("Add", [acc, odd], f"{name}.acc_sum", f"{name}/sum")
        if frozen.adapter is None:  # the module's scalar step times the unit: one float32 product
            scale = self.init(f"{name}.scale", np.float32(frozen.step) * unit)
        else:
            scale = self.node("Mul", [step, self.init(f"{name}.unit", unit)], f"{name}.scale", f"{name}/scale")
        if plan.int_bias is not None:  # exact: an integer sum below 2^24 (2^53 when summed in float64)
            wide = plan.wide and weight.odd is None
            int_bias = exact.channel_view(plan.int_bias.double() if wide else plan.int_bias.float(), rank, axis)[0].numpy()
            acc = self.node("Add", [acc, self.init(f"{name}.bias", int_bias)], f"{name}.acc_biased", f"{name}/bias")
            if wide:
                acc = self.node("Cast", [acc], f"{name}.acc_biased.f32", f"{name}/f32", to=TensorProto.FLOAT)
        bias = plan.bias if plan.int_bias is None else None
        y = self.node("Mul", [acc, scale], f"{name}.scaled" if bias is not None else out, f"{name}/scaled")
        if bias is not None:
            bias = exact.channel_view(bias, rank, axis)[0].numpy()
            self.node("Add", [y, self.init(f"{name}.bias", bias)], out, f"{name}/bias")
        return True

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
        if is_identity(m):
            self.node("Identity", [x], name, name)
        elif isinstance(m, nn.ReLU):
            self.node("Relu", [x], name, name)
        elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
            self.clip(node, lo, hi)
        elif isinstance(m, BATCH_NORMS):
            self.batchnorm(node, m)
        elif isinstance(m, MAX_POOLS):
            self.pool(node, "MaxPool", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        elif isinstance(m, AVG_POOLS):
            if getattr(m, "divisor_override", None):
                raise self.unsupported(node, "average pooling with divisor_override")
            self.pool(node, "AveragePool", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode,
                      count_include_pad=int(m.count_include_pad))
        elif isinstance(m, ADAPTIVE_AVG_POOLS):
            self.adaptive_avgpool(node, m.output_size)
        elif isinstance(m, nn.Flatten):
            self.flatten(node, m.start_dim, m.end_dim)
        elif isinstance(m, nn.LeakyReLU):
            self.node("LeakyRelu", [x], name, name, alpha=float(m.negative_slope))
        elif isinstance(m, nn.GELU):
            self.node("Gelu", [x], name, name, approximate=m.approximate)
        elif isinstance(m, nn.LayerNorm):
            self.layer_norm(node, m.normalized_shape, m.weight, getattr(m, "bias", None), m.eps)
        elif type(m) in _FLOAT_ACTIVATIONS:
            self.activation(node, _FLOAT_ACTIVATIONS[type(m)])
        else:
            raise self.unsupported(node, f"module {type(m).__name__} has no ONNX form here")

    def constant(self, node: fx.Node) -> None:
        """A parameter or buffer the graph reads (a class token, a position embedding): an initializer
        holding its value (the graph's float regions compute with it, as the module does)."""
        value = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.dtype == torch.int64):
            raise self.unsupported(node, "a graph attribute that is not a float or int64 tensor")
        value = value.detach()
        self.init(node.name, (value.float() if value.is_floating_point() else value).numpy())

    def shape_built_tensor(self, node: fx.Node) -> None:
        """A tensor computed from shapes alone (:func:`~qcompiler.analysis.shape_built_tensors`): an
        initializer, expanded to the run-time batch when its first axis is the batch."""
        built = self.shape_built[node]
        value = built.value.float() if built.value.is_floating_point() else built.value
        if value.dtype not in (torch.float32, torch.int64, torch.bool):
            raise self.unsupported(node, f"a tensor built from shapes of dtype {value.dtype} (float, int64 and bool export)")
        if not built.batched:
            self.init(node.name, value.numpy())
            return
        self.expand_to_batch(node, self.init(f"{node.name}.sample", value.numpy()))

    def cast(self, node: fx.Node) -> None:
        """``x.to(...)`` or ``x.type(...)`` as the recorded dtypes say: the identity, or a Cast to float32 / int64 / bool
        (a move to a device changes nothing in the file)."""
        source, target = (getattr(n.meta.get("tensor_meta"), "dtype", None) for n in (node.args[0], node))
        onnx_types = {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL}
        if target not in onnx_types:
            raise self.unsupported(node, f"a conversion to {target} (float32, int64 and bool export)")
        if source == target:
            self.node("Identity", [self.src(node)], node.name, node.name)
        else:
            self.node("Cast", [self.src(node)], node.name, node.name, to=onnx_types[target])

    def batch_size(self, name: str) -> str:
        """The network input's batch size as a 1-element int64 tensor (every activation's batch)."""
        first = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        return self.node("Shape", [first.name], f"{name}.input_shape", f"{name}/input_shape", start=0, end=1)

    def expand_to_batch(self, node: fx.Node, x: str) -> None:
        """``x`` expanded to ``node``'s recorded shape, with the batch taken from the network input at
        run time: ``x.expand(N, ...)``, or a tensor built from shapes whose first axis is the batch."""
        rest = self.init(f"{node.name}.shape_rest", np.array(_shape(node), np.int64))
        shape = self.node("Concat", [self.batch_size(node.name), rest], f"{node.name}.shape", f"{node.name}/shape", axis=0)
        self.node("Expand", [x, shape], node.name, node.name)

    def layer_norm(self, node: fx.Node, shape, weight, bias, eps: float) -> None:
        """A float region's layer norm (module or function): ``LayerNormalization`` over the trailing
        normalized axes; ``weight`` / ``bias``: a tensor, a graph constant's node, or None."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) for d in shape) or not isinstance(eps, (int, float)):
            raise self.unsupported(node, "a layer norm whose shape or eps is computed at run time")

        def operand(value, what: str, default) -> str:
            if isinstance(value, fx.Node):
                return value.name  # a get_attr: already an initializer
            array = value.detach().float().numpy() if value is not None else default(shape, np.float32)
            return self.init(f"{node.name}.{what}", array)

        args = [self.src(node), operand(weight, "scale", np.ones), operand(bias, "bias", np.zeros)]
        self.node("LayerNormalization", args, node.name, node.name, axis=-len(shape), epsilon=float(eps))

    def activation(self, node: fx.Node, kind: str) -> None:
        """A float activation (a float region: the module computes it in float32, as onnxruntime does)."""
        x, name = self.src(node), node.name
        if kind == "silu":  # no ONNX op before opset 24: x * sigmoid(x)
            self.node("Mul", [x, self.node("Sigmoid", [x], f"{name}.sigmoid", f"{name}/sigmoid")], name, name)
        elif kind == "hardsigmoid":  # torch's relu6(x + 3) / 6
            self.node("HardSigmoid", [x], name, name, alpha=1.0 / 6.0, beta=0.5)
        else:
            self.node({"sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}[kind], [x], name, name)

    def clip(self, node: fx.Node, lo: float, hi: float) -> None:
        bounds = [self.init(f"{node.name}.lo", np.float32(lo)), self.init(f"{node.name}.hi", np.float32(hi))]
        self.node("Clip", [self.src(node), *bounds], node.name, node.name)

    def batchnorm(self, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> None:
        if m.training or m.running_mean is None:
            raise self.unsupported(node, "batch norm without running statistics (call .eval())")
        # x * alpha + beta as two ops with the module's float32 constants (exact.bn_affine), as
        # the module computes batch norm in eval mode; deployment folds both into the conv before
        # (onnxruntime's ConvMulFusion / ConvAddFusion)
        alpha, beta = exact.bn_affine(m)
        rank = len(_shape(node)) + 1
        a = self.init(f"{node.name}.alpha", exact.channel_view(alpha, rank)[0].numpy())
        b = self.init(f"{node.name}.beta", exact.channel_view(beta, rank)[0].numpy())
        y = self.node("Mul", [self.src(node), a], f"{node.name}.scaled", f"{node.name}/scale")
        self.node("Add", [y, b], node.name, node.name)

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
            self.global_pool(node)
            return
        if any(i % o for i, o in zip(in_shape, out)):
            self.uneven_adaptive_avgpool(node, in_shape, out)
            return
        kernel = [i // o for i, o in zip(in_shape, out)]
        self.pool(node, "AveragePool", kernel, kernel, 0, 1, False)

    def uneven_adaptive_avgpool(self, node: fx.Node, in_shape: tuple[int, ...], out: list[int]) -> None:
        """Adaptive average pooling over windows of different sizes, in the order torch's CPU kernel
        sums them: each output's window elements in row-major order added one by one from the
        first (float32), then the sum divided by the window's length along each axis in turn.

        The spatial axes are flattened and one zero appended; the k-th ``Gather`` picks every
        window's k-th element (the zero where a window is shorter: adding it changes nothing).
        """
        name, channels = node.name, _shape(node.args[0])[0]
        spans = [[range(*window) for window in adaptive_windows(i, o)] for i, o in zip(in_shape, out)]
        size = int(np.prod(in_shape))
        longest = int(np.prod([max(len(r) for r in axis) for axis in spans]))
        picks = np.full((longest, *out), size, dtype=np.int64)  # index `size` is the appended zero
        for position in itertools.product(*(range(o) for o in out)):
            window = itertools.product(*(axis[i] for axis, i in zip(spans, position)))
            members = [np.ravel_multi_index(p, in_shape) for p in window]
            picks[(slice(0, len(members)), *position)] = members
        flat_shape = self.init(f"{name}.flat_shape", np.array([0, channels, -1], np.int64))
        flat = self.node("Reshape", [self.src(node), flat_shape], f"{name}.flat", name)
        zero_pad = self.init(f"{name}.zero_pad", np.array([0, 0, 0, 0, 0, 1], np.int64))
        flat = self.node("Pad", [flat, zero_pad], f"{name}.padded", name)
        total = None
        for k in range(longest):
            term = self.node("Gather", [flat, self.init(f"{name}.picks{k}", picks[k])], f"{name}.term{k}", name, axis=2)
            total = term if total is None else self.node("Add", [total, term], f"{name}.sum{k}", name)
        for axis, spans_of_axis in enumerate(spans):
            lengths = np.array([len(r) for r in spans_of_axis], np.float32)
            lengths = self.init(f"{name}.length{axis}", lengths.reshape([-1 if a == axis else 1 for a in range(len(out))]))
            out_name = name if axis == len(out) - 1 else f"{name}.div{axis}"
            total = self.node("Div", [total, lengths], out_name, name)

    def global_pool(self, node: fx.Node) -> None:
        """Global average pooling as the module computes it in eval mode (:func:`exact.global_mean`)."""
        self.mean(node, list(range(2, len(_shape(node)) + 1)), True)

    def mean(self, node: fx.Node, axes: list[int], keepdims: bool) -> None:
        """A mean as the module computes it in eval mode (:func:`exact.mean`): summed in float64,
        rounded once (a float32 sum's order would differ from PyTorch's)."""
        name = node.name
        wide = self.node("Cast", [self.src(node)], f"{name}.f64", f"{name}/widen", to=TensorProto.DOUBLE)
        axes = self.init(f"{name}.axes", np.asarray(axes, dtype=np.int64))
        mean = self.node("ReduceMean", [wide, axes], f"{name}.mean", f"{name}/mean", keepdims=int(keepdims))
        self.node("Cast", [mean], name, name, to=TensorProto.FLOAT)

    def flatten(self, node: fx.Node, start: int, end: int) -> None:
        rank = len(_shape(node.args[0])) + 1
        if start < 0:
            start += rank
        if end in (-1, rank - 1) and start == 1:  # ONNX Flatten makes 2-d: (N, rest) only from axis 1
            self.node("Flatten", [self.src(node)], node.name, node.name, axis=start)
            return
        self.reshape(node)

    def reshape(self, node: fx.Node) -> None:
        shape = self.init(f"{node.name}.shape", np.array([-1, *_shape(node)], dtype=np.int64))
        self.node("Reshape", [self.src(node), shape], node.name, node.name)

    def index(self, node: fx.Node) -> None:
        """``x[:, slices or integers]`` (the integer program's ``index``), or a chunk's piece
        (:func:`static_index`): one ``Slice``, an integer ``i`` as ``[i, i + 1)``, then a
        ``Reshape`` to the recorded shape drops the integers' axes."""
        try:
            src, idx = static_index(node)
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        end = np.iinfo(np.int64).max  # ONNX Slice clamps its bounds to the axis, as Python does
        ranges = []  # (axis, start, stop, step)
        for axis, i in enumerate(idx[1:], start=1):
            if isinstance(i, int):
                ranges.append((axis, i, i + 1 if i != -1 else end, 1))
            elif i != slice(None):
                step = 1 if i.step is None else i.step
                start = i.start if i.start is not None else (0 if step > 0 else end)
                stop = i.stop if i.stop is not None else (end if step > 0 else -end - 1)
                ranges.append((axis, start, stop, step))
        if not ranges:
            self.node("Identity", [src.name], node.name, node.name)
            return
        args = [self.init(f"{node.name}.{what}", np.array(values, np.int64))
                for what, values in zip(("axes", "starts", "ends", "steps"), zip(*ranges))]
        sliced = self.node("Slice", [src.name, args[1], args[2], args[0], args[3]], f"{node.name}.slice", node.name)
        shape = self.init(f"{node.name}.shape", np.array([-1, *_shape(node)], dtype=np.int64))
        self.node("Reshape", [sliced, shape], node.name, f"{node.name}/shape")

    def upsampling(self, node: fx.Node, call: dict) -> None:
        """``nn.Upsample`` or ``F.interpolate``: nearest-neighbour as gathers, the others as a ``Resize``."""
        positions = nearest_positions(self.gm, node)
        if positions is not None:
            self.gather_positions(node, positions)
        elif is_nearest_upsampling(self.gm, node):
            raise self.unsupported(node, "a nearest upsampling whose scale factor is computed at run time")
        else:
            self.resize(node, call)

    def gather_positions(self, node: fx.Node, positions: list[list[int]]) -> None:
        """Nearest-neighbour upsampling (the integer program's ``index`` with positions): one ``Gather``
        per spatial axis, on the positions torch's own call picks (:func:`nearest_positions`), so every
        scale rounds as in the module rather than by ``Resize``'s coordinate rules."""
        x = self.src(node)
        for axis, picked in enumerate(positions, start=2):
            last = axis == len(positions) + 1
            out = node.name if last else f"{node.name}.axis{axis}"
            x = self.node("Gather", [x, self.init(f"{node.name}.positions{axis}", np.array(picked, np.int64))], out,
                          out, axis=axis)

    def pad(self, node: fx.Node) -> None:
        """A padding that copies values, on the integer program's positions (:func:`padding_positions`):
        per padded axis one ``Gather``; where it holds zeros, after a ``Pad`` of one zero in front
        that position -1 then picks."""
        try:
            positions = padding_positions(self.gm, node)
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        x, rank = self.src(node), len(positions) + 1
        padded = [axis for axis, p in enumerate(positions, start=1) if p is not None]
        if not padded:  # every amount zero (a UNet whose sizes already match)
            self.node("Identity", [x], node.name, node.name)
        for axis in padded:
            picked = np.array(positions[axis - 1], np.int64)
            if (picked < 0).any():
                front = np.zeros(2 * rank, np.int64)
                front[axis] = 1
                x = self.node("Pad", [x, self.init(f"{node.name}.pads{axis}", front)], f"{node.name}.zero{axis}",
                              f"{node.name}.zero{axis}", mode="constant")
                picked = picked + 1
            out = node.name if axis == padded[-1] else f"{node.name}.axis{axis}"
            x = self.node("Gather", [x, self.init(f"{node.name}.positions{axis}", picked)], out, out, axis=axis)

    def resize(self, node: fx.Node, call: dict) -> None:
        """A (bi/tri)linear upsampling (an affine map of the codes) or a bicubic one (a float region):
        ``Resize`` with torch's sampling (``pytorch_half_pixel`` or ``align_corners``, cubic coefficient
        -0.75). The scale is the call's ``scale_factor`` where torch samples with it, else the recorded
        output size over the input's."""
        mode = {"linear": "linear", "bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(call.get("mode"))
        if mode is None or call.get("antialias"):
            raise self.unsupported(node, f"upsampling mode {call.get('mode')!r}"
                                         f"{' with antialias' if call.get('antialias') else ''} has no ONNX form here")
        in_size, out_size = node.args[0].meta["tensor_meta"].shape[2:], node.meta["tensor_meta"].shape[2:]
        factor = call.get("scale_factor")
        if factor is not None and not isinstance(factor, fx.Node) and not call.get("recompute_scale_factor"):
            factors = [float(f) for f in (factor if isinstance(factor, (list, tuple)) else [factor] * len(in_size))]
        else:
            factors = [o / i for o, i in zip(out_size, in_size)]
        scales = self.init(f"{node.name}.scales", np.array([1.0, 1.0, *factors], np.float32))
        sampling = "align_corners" if call.get("align_corners") else "pytorch_half_pixel"
        self.node("Resize", [self.src(node), "", scales], node.name, node.name, mode=mode,
                  coordinate_transformation_mode=sampling, cubic_coeff_a=-0.75)

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
        elif fname in ("view", "reshape", "squeeze", "unsqueeze", "unflatten"):
            self.reshape(node)
        elif fname in ("contiguous", "clone", "detach") or is_eval_identity(node.target):  # inference: identities
            self.node("Identity", [self.src(node)], node.name, node.name)
        elif fname == "pow" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):  # GPT-2's gelu_new: x ** 3
            e = node.args[1]
            exponent = e.name if isinstance(e, fx.Node) else self.init(f"{node.name}.exponent", np.float32(e))
            self.node("Pow", [self.src(node), exponent], node.name, node.name)
        elif fname == "where" and len(node.args) == 3 and all(isinstance(a, fx.Node) for a in node.args):
            self.node("Where", [self.src(node, i) for i in range(3)], node.name, node.name)  # a causal mask
        elif fname in ("to", "type") and node.op == "call_method":  # x.to(dtype): a Cast where the dtype changes
            self.cast(node)
        elif fname in ("matmul", "bmm") and len(node.args) == 2:  # quantized operands arrive as codes times step
            self.node("MatMul", [self.src(node, 0), self.src(node, 1)], node.name, node.name)
        elif fname == "getitem":
            self.index(node)
        elif fname in _FLOAT_ACTIVATION_FUNCTIONS:
            self.activation(node, fname)
        elif fname == "gelu":
            self.node("Gelu", [self.src(node)], node.name, node.name, approximate=node.kwargs.get("approximate", "none"))
        elif fname == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            self.node("LeakyRelu", [self.src(node)], node.name, node.name, alpha=float(slope))
        elif fname in _TENSOR_ARITHMETIC and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            # two tensors in float: a squeeze-excitation gate, a position embedding added to the tokens
            self.node(_TENSOR_ARITHMETIC[fname], [self.src(node, 0), self.src(node, 1)], node.name, node.name)
        elif fname == "expand":
            self.expand_to_batch(node, self.src(node))
        elif fname == "layer_norm":  # ConvNeXt's channels-first norm calls the function
            kw = dict(zip(("normalized_shape", "weight", "bias", "eps"), node.args[1:])) | node.kwargs
            self.layer_norm(node, kw["normalized_shape"], kw.get("weight"), kw.get("bias"), kw.get("eps", 1e-5))
        elif fname in ("transpose", "permute"):  # attention's k.transpose(-2, -1), heads to the front
            self.node("Transpose", [self.src(node)], node.name, node.name, perm=_permutation(node))
        elif fname == "softmax":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if not isinstance(dim, int) or node.kwargs.get("dtype") is not None:
                raise self.unsupported(node, "softmax without an integer dim, or with a dtype")
            self.node("Softmax", [self.src(node)], node.name, node.name, axis=dim)
        elif node.target is exact.mean:
            rank = len(_shape(node.args[0])) + 1
            dim = node.args[1]
            self.mean(node, sorted(d % rank for d in ([dim] if isinstance(dim, int) else dim)), node.kwargs.get("keepdim", False))
        elif fname in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):  # torchvision's DenseNet calls the function
            self.adaptive_avgpool(node, node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None))
        elif fname in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            kw = avg_pool_call(node)
            if kw["divisor_override"]:
                raise self.unsupported(node, "average pooling with divisor_override")
            self.pool(node, "AveragePool", kw["kernel_size"], kw["stride"], kw["padding"], 1, kw["ceil_mode"],
                      count_include_pad=int(kw["count_include_pad"]))
        elif fname in ("max_pool1d", "max_pool2d", "max_pool3d"):
            kw = max_pool_call(node)
            self.pool(node, "MaxPool", kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"], kw["ceil_mode"])
        elif op_kind(self.gm, node) == "scalar":
            self.scalar(node)
        else:
            raise self.unsupported(node, f"{fname} has no ONNX form here")

    def node_of(self, node: fx.Node) -> None:
        if node.name in self.folded:  # the layer before it computed this tensor
            return
        try:  # shape values (a Reshape takes the recorded shape) and chunk tuples (their getitems slice)
            if emits_nothing(node):
                return
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        if node in self.shape_built:
            self.shape_built_tensor(node)
            return
        if node in self.const_only:
            return
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")  # an embedding's indices are integers
            dtype = TensorProto.INT64 if getattr(meta, "dtype", None) == torch.int64 else TensorProto.FLOAT
            self.inputs.append(helper.make_tensor_value_info(node.name, dtype, [BATCH, *_shape(node)]))
            return
        if ir.ACT in node.meta:
            self.quantizer(node)
        elif ir.LAYER in node.meta:
            self.layer(node)
        elif node.op == "get_attr":
            self.constant(node)
        elif join_operands(node) is not None:
            self.join(node, join_operands(node))
        elif (call := upsampling_call(self.gm, node)) is not None:
            self.upsampling(node, call)
        elif padding_call(self.gm, node) is not None:
            self.pad(node)
        elif node.op == "call_module":
            self.module_op(node)
        else:
            self.function_call(node)

    def model(self, output: fx.Node) -> onnx.ModelProto:
        try:
            out = single_output(output)
        except ValueError as e:
            raise UnsupportedError(f"onnx export: {e}") from None
        self.node("Identity", [out.name], "output", "output")
        outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH, *_shape(out)])]
        # no value_info: shape inference recovers every shape (batch dimension "N" included)
        graph = helper.make_graph(self.nodes, "qcompiler", self.inputs, outputs, list(self.inits.values()))
        opsets = [helper.make_opsetid("", onnx_ops.OPSET)]
        functions = [onnx_ops.function_proto(op) for op in sorted(self.used)]
        if functions:
            opsets.append(helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION))
        model = helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=IR_VERSION,
                                  producer_name="qcompiler", producer_version=str(onnx_ops.DOMAIN_VERSION))
        if self.inexact:  # layers computed on dequantized floats (no exact integer form): say which
            helper.set_model_props(model, {FLOAT_LAYERS: ",".join(self.inexact)})
        return model


# --------------------------------------------------------------------------- helpers


def _plan(gm: fx.GraphModule, node: fx.Node, frozen: ir.FrozenAct, codes: ir.WeightCodes,
          weight: exact.IntegerWeight) -> exact.LayerPlan | None:
    """The deployed module's choices for ``node`` (:func:`exact.plan_layer`), from the records."""
    layer = gm.get_submodule(node.target)
    step = frozen.step if frozen.adapter is None else None  # ASQ: per-sample steps
    return exact.plan_layer(weight, codes.bias, exact.bn_link(layer), max(abs(frozen.qmin), abs(frozen.qmax)), step,
                            chunkable=exact.chunkable(layer))


def _permutation(node: fx.Node) -> list[int]:
    """The full axis order of a ``transpose(d0, d1)`` or ``permute(...)`` call, batch axis included."""
    rank = len(_shape(node)) + 1
    dims = [d for a in node.args[1:] for d in (a if isinstance(a, (list, tuple)) else [a])]
    if getattr(node.target, "__name__", node.target) == "permute":
        return [int(d) % rank for d in (dims or node.kwargs["dims"])]
    d0, d1 = (int(d) % rank for d in (dims or [node.kwargs["dim0"], node.kwargs["dim1"]]))
    perm = list(range(rank))
    perm[d0], perm[d1] = d1, d0
    return perm


def _positive(v, what: str) -> None:
    """Refuse a non-positive or non-finite step or scale: the file would compute nonsense."""
    a = np.asarray(v, dtype=np.float64)
    if a.size and not (np.all(np.isfinite(a)) and np.all(a > 0)):
        bad = a[~(np.isfinite(a) & (a > 0))].flat[0]
        raise ExportError(f"{what} is {bad:g}; a quantizer step must be positive and finite (re-run freeze after training)")


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


def _integer_levels(grid: str, levels: int, top: int, odd: bool = False) -> np.ndarray:
    """A table decoding power-grid codes to :func:`exact.integer_weight`'s integers, float32.

    POT: ``table[levels + s*m] = s * 2^(top - k)``, ``k = m - 1``. POST (``k = 2j + r``): the
    even part ``s * 2^(top//2 - j)`` where ``r = 0`` (else 0), the odd part likewise where ``r = 1``.

    >>> _integer_levels("pot", 3, 2).tolist()
    [-1.0, -2.0, -4.0, 0.0, 4.0, 2.0, 1.0]
    >>> _integer_levels("post", 3, 2, odd=True).tolist()
    [-0.0, -2.0, -0.0, 0.0, 0.0, 2.0, 0.0]
    """
    k = np.arange(levels, dtype=np.int64)
    if grid == "pot":
        pos = np.ldexp(1.0, np.maximum(top - k, 0)) * (k <= top)
    else:
        pos = np.ldexp(1.0, np.maximum(top // 2 - k // 2, 0)) * (k <= top) * ((k % 2 == 1) == odd)
    return np.concatenate([-pos[::-1], [0.0], pos]).astype(np.float32)


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
    with staged_file(path) as f:
        f.write(model.SerializeToString(deterministic=True))
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


# onnxruntime rewrites that change float32 arithmetic, not the function: folding the per-channel
# scale Mul (or a batch norm, or a constant Add) into the convolution's weights makes its inputs
# non-integer, so its sums round, and the NCHWc kernels (chosen once the weights are constants)
# sum in another order. Parity checks the file as written, so it runs without them; deployment
# keeps them (bench/onnx_latency.py), and then differs from the module in the last bit.
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
    x = torch.as_tensor(x)
    for batch in (x if not x.is_floating_point() else x.float()).split(batch_size):  # indices stay integers
        got.append(sess.run(None, {name: batch.numpy()})[0])
        want.append(sole_tensor(module(batch)).float().numpy())
    got, want = np.concatenate(got), np.concatenate(want)
    axis = class_axis(module)  # a segmentation map's classes are its channels
    return OnnxParity(float(np.abs(got - want).max()), float(want.max() - want.min()),
                      float((got.argmax(axis) == want.argmax(axis)).mean()), len(want))


__all__ = ["FORMATS", "ExportError", "OnnxParity", "export_onnx", "onnx_parity", "save_onnx", "session", "to_onnx"]
