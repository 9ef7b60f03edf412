"""The standard QDQ form of a compiled graph: QuantizeLinear/DequantizeLinear around float ops.

Every activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` on UINT8
(zero point 0, or 128 when signed), every quantized layer reads its weight as INT8
codes through a per-channel ``DequantizeLinear`` and its bias as INT32 codes on the
accumulator's grid. That is the pattern onnxruntime's QDQ transformer fuses into its
integer kernels (``QLinearConv``, ``QGemm``, ``QLinearAdd``), which it does only when
nothing float sits between a ``DequantizeLinear`` and the next ``QuantizeLinear``:

* a batch norm reading only a quantized layer is folded into it: each output channel's
  weight step becomes ``s_c * gamma_c / sigma_c`` and its bias
  ``(b_c - mean_c) gamma_c / sigma_c + beta_c``; the codes stay (see :func:`fold_sign`
  for a negative ``gamma``);
* a ReLU between a layer and the next quantizer stays: onnxruntime drops it because the
  unsigned quantizer (zero point 0) clamps at zero anyway;
* residual joins already read quantized operands and feed a quantizer (``qc.join``).

Only uniform schemes at up to 8 bits have this form; ASQ's per-sample step, POT/POST
grids and adder layers are refused with a one-line :class:`ExportError` naming the
``custom`` form. A quantizer narrower than its INT8/UINT8 type clips to its own range
first (a float ``Clip``, which stops the fusion of the op before it, exact: ``round(clip(x, n s, p s) / s) = clamp(round(x / s), n, p)``).

Where it differs from the fake-quant module: nowhere in its constants. The folded steps,
the bias and its INT32 codes are the deployed module's (:func:`exact.plan_layer`: the
bias in whole steps of the accumulator grid ``s_x * unit[c]``, which is what QLinearConv
adds), carried onto the sign-folded, widened grid exactly (:func:`widen_codes` multiplies
codes and bias codes by the same power of two). What remains is arithmetic inside
onnxruntime's integer kernels: QLinearConv requantizes with its own float32 multiplier
``s_x * s_w / s_y`` and QLinearAdd adds in its own way, so a value within an ulp of a tie
can still get the other code (bench/results/onnx_parity.md has the class agreement).

Example:
    >>> import qcompiler, torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> c = qcompiler.compile(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    ...                       qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(32, 4))
    >>> c.freeze(); model = to_qdq(c.module)
    >>> [n.op_type for n in model.graph.node][:5]
    ['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Gemm']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
import torch.fx as fx
from torch import nn

from .. import ir
from ..frontend import TRANSPOSED_KINDS
from ..nn import exact
from ..numerics import round_half_even
from .onnx_export import ExportError, _conv_attrs, _Emitter, _positive, _shape

MAX_BITS = 8
INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class FoldedSign:
    """Per-channel weight codes and steps after folding a per-channel factor ``k_c`` into the step.

    ``codes`` keep their magnitude; a channel whose factor is negative has its codes
    negated so its step stays positive, except a channel holding ``-2^(b-1)`` (no positive
    counterpart in b bits): that channel keeps its codes and a negative step, which
    ``DequantizeLinear`` multiplies like any other (``negative_steps`` counts them).
    """

    codes: np.ndarray
    scale: np.ndarray
    negative_steps: int


def fold_sign(codes: np.ndarray, scale: np.ndarray, factor: np.ndarray, qmin: int) -> FoldedSign:
    """Fold ``factor`` (per output channel) into the weight steps ``scale``.

    >>> f = fold_sign(np.array([[1, -2], [3, -128]]), np.array([0.5, 0.5]), np.array([-2.0, -1.0]), -128)
    >>> f.codes.tolist(), f.scale.tolist(), f.negative_steps
    ([[-1, 2], [3, -128]], [1.0, -0.5], 1)
    """
    step = scale.astype(np.float64) * factor
    axes = tuple(range(1, codes.ndim))
    flip = (step < 0) & ~np.any(codes == qmin, axis=axes)
    sign = np.where(flip, -1, 1).reshape(-1, *([1] * (codes.ndim - 1)))
    return FoldedSign(codes * sign, np.where(flip, -step, step), int(np.sum((step < 0) & ~flip)))


def widen_codes(codes: np.ndarray, scale: np.ndarray, limit: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the codes times the largest ``2^j`` that keeps them within ``±limit``, the step over it.

    The weights are the same numbers (a power-of-two step division is exact), but the
    accumulator's grid ``s_x * s_w[c]``, on which QLinearConv adds the INT32 bias, is
    ``2^j`` times finer, so the bias is rounded ``2^j`` times less. LSQ-initialised 8-bit
    weights rarely use their full range; 2- and 4-bit ones always leave room in INT8.

    >>> c, s = widen_codes(np.array([[3, -7], [100, 1]]), np.array([1.0, 1.0]))
    >>> c.tolist(), s.tolist()
    ([[48, -112], [100, 1]], [0.0625, 1.0])
    """
    axes = tuple(range(1, codes.ndim))
    peak = np.maximum(np.abs(codes).max(axis=axes), 1)
    j = np.floor(np.log2(limit / peak)).astype(np.int64)
    j = np.where(peak * 2.0 ** (j + 1) <= limit, j + 1, j)  # log2 rounding at exact powers
    j = np.where(peak * 2.0**j > limit, j - 1, j).clip(0, None)
    shape = (-1, *([1] * (codes.ndim - 1)))
    return codes * (2**j).reshape(shape), scale / 2.0**j


@dataclass
class _QdqEmitter(_Emitter):
    def init(self, name: str, value) -> str:
        # scalars stay 0-d (``np.ascontiguousarray`` would make them shape [1]): onnxruntime
        # fuses a join only when its quantizers' steps and zero points are scalars
        assert name not in self.inits, name
        self.inits[name] = numpy_helper.from_array(np.array(value, order="C"), name)
        return name

    def refuse(self, node: fx.Node, what: str) -> ExportError:
        return ExportError(f"qdq ONNX form: {node.name!r} {what}; use the custom form (--onnx-format custom)")

    # ------------------------------------------------------------------ quantizers

    def quantizer(self, node: fx.Node) -> None:
        frozen = ir.get(node, ir.STEP, ir.FrozenAct)
        if frozen.adapter is not None:
            raise self.refuse(node, "is an ASQ quantizer, whose per-sample step QDQ cannot express")
        if frozen.bits > MAX_BITS:
            raise self.refuse(node, f"quantizes to {frozen.bits} bits (QDQ here: up to {MAX_BITS})")
        _positive(frozen.step, f"activation quantizer {node.name!r} step")
        # UINT8 for every activation, signed ones with zero point 128: onnxruntime fuses a
        # join (QLinearAdd) only when both operands and the result have one type. An
        # asymmetric grid's codes [-z, 255 - z] sit at zero point z.
        half = 2 ** (MAX_BITS - 1)
        zp = 0 if frozen.qmin >= 0 else half if frozen.qmax < half else -frozen.qmin
        x = self.src(node)
        narrow = (frozen.qmin + zp, frozen.qmax + zp) != (0, 2**MAX_BITS - 1)  # codes that UINT8 saturation alone would not clamp
        if frozen.channel_axis is not None:
            return self.channel_quantizer(node, frozen, x, zp, narrow)
        if narrow:
            lo, hi = (self.init(f"{node.name}.{k}", np.float32(q) * np.float32(frozen.step))
                      for k, q in (("lo", frozen.qmin), ("hi", frozen.qmax)))
            x = self.node("Clip", [x, lo, hi], f"{node.name}.clipped", f"{node.name}/clip")
        s = self.init(f"{node.name}.step", np.float32(frozen.step))
        zero = self.init(f"{node.name}.zero_point", np.uint8(zp))
        q = self.node("QuantizeLinear", [x, s, zero], f"{node.name}.q", f"{node.name}/quantize")
        self.node("DequantizeLinear", [q, s, zero], node.name, node.name)

    def channel_quantizer(self, node: fx.Node, frozen: ir.FrozenAct, x: str, zp: int, narrow: bool) -> None:
        """Per-channel steps (a join operand): ``Div`` by the steps, a unit-scale QDQ pair, ``Mul``.

        Per-axis scales on the QDQ pair itself would let onnxruntime fuse the layer before it
        into a ``QLinearConv``, whose output zero point must be one scalar; divided first, the
        values are ``x / step`` as the module computes them, rounded and clamped by the pair.
        """
        steps = self.init(f"{node.name}.step", frozen.sample_steps(len(_shape(node)) + 1).astype(np.float32))
        v = self.node("Div", [x, steps], f"{node.name}.scaled", f"{node.name}/scale")
        if narrow:  # integer bounds: clip, then round
            lo, hi = (self.init(f"{node.name}.{k}", np.float32(q)) for k, q in (("lo", frozen.qmin), ("hi", frozen.qmax)))
            v = self.node("Clip", [v, lo, hi], f"{node.name}.clipped", f"{node.name}/clip")
        one, zero = self.init(f"{node.name}.unit", np.float32(1.0)), self.init(f"{node.name}.zero_point", np.uint8(zp))
        q = self.node("QuantizeLinear", [v, one, zero], f"{node.name}.q", f"{node.name}/quantize")
        codes = self.node("DequantizeLinear", [q, one, zero], f"{node.name}.codes", f"{node.name}/codes")
        self.node("Mul", [codes, steps], node.name, node.name)

    # ------------------------------------------------------------------ layers

    def layer(self, node: fx.Node) -> None:
        info = ir.get(node, ir.LAYER, ir.LayerInfo)
        codes = ir.find(node, ir.CODES, ir.WeightCodes)
        if codes is None or ir.FLOAT in node.meta:
            if info.kind == "adder2d":
                raise self.refuse(node, "is a float adder layer")
            return super().layer(node)  # a float layer: a float op, unfused
        if codes.grid != "uniform":
            raise self.refuse(node, f"has {codes.grid} weights (QDQ: uniform grids only)")
        if codes.bits > MAX_BITS:
            raise self.refuse(node, f"has {codes.bits}-bit weights (QDQ here: up to {MAX_BITS})")
        if info.padding_mode != "zeros":
            raise self.unsupported(node, f"padding_mode={info.padding_mode!r}")
        name = node.name
        c = codes.codes.numpy().astype(np.int64)
        scale = codes.scale.detach().double().numpy()
        _positive(scale, f"layer {name!r} weight scale")
        if info.kind == "embedding":  # INT8 rows, dequantized per row (one float32 product, as the module), then Gather
            s, zero = self.init(f"{name}.scale", scale.astype(np.float32)), self.init(f"{name}.zero_point", np.zeros(scale.shape, np.int8))
            w = self.node("DequantizeLinear", [self.init(f"{name}.codes", c.astype(np.int8)), s, zero], f"{name}.weight",
                          f"{name}/weight", axis=0)
            self.node("Gather", [w, self.src(node)], name, name, axis=0)
            return
        out = name
        bn = exact.bn_link(self.gm.get_submodule(node.target)) if info.kind != "linear" else None
        if bn is not None:
            bn_node = next(iter(node.users))
            self.folded.add(bn_node.name)
            out = bn_node.name
        # the module's folded unit and bias (exact.folded_constants) and its integer bias: the bias
        # in whole steps of the accumulator grid s_x * unit[c], what QLinearConv adds as INT32
        unit, folded_bias = exact.folded_constants(codes.scale, codes.bias, bn)
        src = node.args[0]
        frozen = ir.find(src, ir.STEP, ir.FrozenAct) if isinstance(src, fx.Node) else None
        int_bias = exact.integer_bias(folded_bias, frozen.step, unit) if frozen is not None and frozen.adapter is None else None
        unit64 = unit.double().numpy()
        folded = fold_sign(c, unit64, np.ones_like(unit64), -(2 ** (MAX_BITS - 1)))
        sign = np.sign(folded.scale) * np.sign(unit64)  # -1 where the codes were negated
        c, scale = widen_codes(folded.codes, folded.scale)
        ratio = folded.scale / scale  # 2^j per channel, exact
        if int_bias is not None:  # the bias the module adds, as a float (for an unfused conv)
            bias = int_bias.numpy() * (np.float32(frozen.step) * unit.numpy()).astype(np.float64)
        else:
            bias = folded_bias.double().numpy() if folded_bias is not None else np.zeros(len(unit64))
        scale32 = scale.astype(np.float32)
        stored = self.init(f"{name}.codes", c.astype(np.int8))
        s = self.init(f"{name}.scale", scale32)
        zero = self.init(f"{name}.zero_point", np.zeros(scale.shape, np.int8))
        w = self.node("DequantizeLinear", [stored, s, zero], f"{name}.weight", f"{name}/weight", axis=0)
        has_bias = codes.bias is not None or bn is not None
        unfused = info.kind in TRANSPOSED_KINDS or not self.fused(bn_node if bn is not None else node)
        if has_bias and info.kind != "linear" and unfused:
            # onnxruntime runs this conv in float (a Clip or a float op before the next quantizer;
            # a transposed conv's weight passes a layout Transpose): a float bias then computes what
            # the module does, an INT32 one would not
            b = [self.init(f"{name}.bias", bias.astype(np.float32))]
        elif has_bias and int_bias is not None:  # the module's integer bias on the widened, sign-folded grid
            b = self.bias_codes(node, int_bias.numpy() * sign * ratio, np.float32(frozen.step) * scale32)
        else:
            b = self.int_bias(node, bias, scale32) if has_bias else []
        x = self.src(node)
        if info.kind == "linear" and len(info.input_shape) != 1:  # tokens (N, ..., C): Gemm is 2-d only
            wt = self.node("Transpose", [w], f"{name}.weight_t", f"{name}/weight_t", perm=[1, 0])
            y = self.node("MatMul", [x, wt], out if not b else f"{name}.matmul", name)
            if b:
                self.node("Add", [y, *b], out, f"{name}/bias")
        elif info.kind == "linear":
            self.node("Gemm", [x, w, *b], out, name, transB=1)
        else:
            self.conv(info, x, w, b, out, name, channel_first=True)

    def fused(self, out: fx.Node) -> bool:
        """Whether the tensor ``out`` reaches a full-range UINT8 quantizer through ReLUs only,
        so that onnxruntime fuses the conv computing it into a QLinearConv."""
        while len(out.users) == 1:
            (out,) = out.users
            frozen = ir.find(out, ir.STEP, ir.FrozenAct)
            if frozen is not None:
                return frozen.qmax - frozen.qmin == 2**MAX_BITS - 1 and frozen.adapter is None
            if out.op != "call_module" or not isinstance(self.gm.get_submodule(out.target), nn.ReLU):
                return False
        return False

    def bias_codes(self, node: fx.Node, q: np.ndarray, acc: np.ndarray) -> list[str]:
        """INT32 bias codes ``q`` on the accumulator grid ``acc``, dequantized for the conv to read."""
        if np.any(np.abs(q) > INT32.max):
            raise self.refuse(node, "has a bias beyond INT32 codes on its accumulator grid")
        codes = self.init(f"{node.name}.bias_codes", q.astype(np.int32))
        s = self.init(f"{node.name}.bias_scale", acc.astype(np.float32))
        return [self.node("DequantizeLinear", [codes, s], f"{node.name}.bias", f"{node.name}/bias", axis=0)]

    def int_bias(self, node: fx.Node, bias: np.ndarray, scale: np.ndarray) -> list[str]:
        """The bias as INT32 codes on the accumulator's grid ``s_x * s_w[c]`` (what QLinearConv adds).

        A layer whose input is not quantized keeps a float bias (it is not fused anyway).
        """
        src = node.args[0]
        frozen = ir.find(src, ir.STEP, ir.FrozenAct) if isinstance(src, fx.Node) else None
        if frozen is None:
            return [self.init(f"{node.name}.bias", bias.astype(np.float32))]
        acc = (np.float32(frozen.step) * scale).astype(np.float32)
        return self.bias_codes(node, round_half_even(bias / acc.astype(np.float64)), acc)

    def adder(self, node, info, codes) -> None:
        raise self.refuse(node, "is an adder layer (no standard integer kernel)")

    def module_op(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU) and self.clamps_at_zero(node):
            # the unsigned quantizer reading it clamps at zero anyway; onnxruntime would drop
            # the ReLU too, but only after it has matched (and missed) the join's pattern
            self.node("Identity", [self.src(node)], node.name, node.name)
            return
        super().module_op(node)

    def clamps_at_zero(self, node: fx.Node) -> bool:
        """Whether every reader of ``node`` is a quantizer whose codes start at zero."""
        return all(ir.find(u, ir.STEP, ir.FrozenAct) is not None and u.meta[ir.STEP].qmin == 0 for u in node.users)

    def batchnorm(self, node: fx.Node, m) -> None:
        if node.name not in self.folded:
            super().batchnorm(node, m)


def to_qdq(gm: fx.GraphModule) -> onnx.ModelProto:
    """The QDQ model of a frozen compiled graph (uniform schemes up to 8 bits)."""
    from .onnx_export import to_onnx

    return to_onnx(gm, "qdq")


__all__ = ["FoldedSign", "fold_sign", "to_qdq", "widen_codes"]
