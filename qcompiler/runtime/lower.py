"""Lowering: a frozen, verified compiled graph to an integer :class:`~.program.Program`.

The lowering walks the fx graph once, in order, and keeps for every node a
symbolic value (docs/design.md §3.1 gives the domains):

* :class:`Grid`: integer codes in a buffer times one quantizer's step (per sample
  under ASQ: the step times a buffer of betas);
* :class:`Acc`: ``clip(sum_t x_t * scale_t + offset, lo, hi)``, integer buffers ``x_t``
  with real per-channel scales and offset, and a pending clamp (ReLU, ReLU6). Batch
  norm, average pooling's divisor, scalar arithmetic and joins only change the
  scales and offsets; nothing is emitted until a quantizer requantizes the value
  (one ``requant``) or the network output reads it (``dequant``);
* the network input, in float, which only a quantizer may read (host ``quantize``).

It reads only records (``qc.step``, ``qc.codes``, ``qc.layer``, ``qc.join``) and the
modules' frozen values (batch-norm statistics, pooling shapes); no pass decision is
re-derived. Steps, multipliers and rounding come from :mod:`qcompiler.numerics`.

An op that is not affine in the accumulator (max pooling, average pooling after a
clamp) first *materializes* the value: a ``requant`` onto a 32-bit intermediate grid
whose unit is the value's static bound over ``2^31``, so the worst case still fits;
the error is far below one output code (it counts only near exact ties).

Example:
    >>> import qcompiler, torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=torch.randn(32, 4))
    >>> [i.op for i in lower(c).instructions]
    ['quantize', 'mac', 'requant', 'mac', 'dequant']
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ir
from ..nn import exact
from ..analysis import (ADAPTIVE_AVG_POOLS, AVG_POOLS, BATCH_NORMS, MAX_POOLS, avg_pool_call, max_pool_call, emits_nothing, feeds_only_constants, is_identity, is_linear_upsampling, is_nearest_upsampling,
                        join_kind, join_operands, linear_weights, nearest_positions, op_kind, padding_call, padding_positions,
                        shape_built_tensors,
                        single_output, static_index, tensor_domains)
from ..errors import QCompileError, UnsupportedError
from ..frontend import TRANSPOSED_KINDS
from ..numerics import post_table
from ..training_calls import is_eval_identity
from .fixedpoint import f32_constants, multipliers
from .interpreter import F32_EXACT, F64_EXACT, adaptive_windows, take_index
from .isa import ISA, Instr
from .program import Program

WIDE_BITS = 31  # a materialized intermediate fits a signed 32-bit register


@dataclass
class Term:
    """``buf * scale`` (times the per-sample ``factor`` buffer under ASQ); ``bound`` >= ``|buf|``."""

    buf: str
    scale: np.ndarray  # float64, broadcastable to the per-sample shape
    bound: np.ndarray  # float64, same shape as scale: the largest |integer| the buffer can hold
    factor: str | None = None
    floor: int | None = None  # the smallest integer it can hold, where that is above -bound (unsigned codes)


@dataclass
class Acc:
    """``clip(sum_t term_t + offset, lo, hi)``: an affine function of integer buffers, not yet requantized."""

    terms: list[Term]
    offset: np.ndarray
    shape: tuple[int, ...]
    lo: float = -math.inf
    hi: float = math.inf

    @property
    def clamped(self) -> bool:
        return self.lo != -math.inf or self.hi != math.inf


@dataclass
class Grid:
    """Codes of the quantizer ``buf`` (a node name): ``buf * step`` (times ``factor[n]`` under ASQ)."""

    buf: str
    step: float | np.ndarray  # per channel, shaped (C, 1, ...): a join operand (only joins read it)
    qmin: int
    qmax: int
    bits: int
    shape: tuple[int, ...]
    factor: str | None = None

    def acc(self) -> Acc:
        step = np.asarray(self.step, dtype=np.float64)  # a scalar, or per channel (C, 1, ...) for a join operand
        bound = np.full(step.shape, float(max(abs(self.qmin), abs(self.qmax))))
        return Acc([Term(self.buf, step, bound, self.factor, self.qmin)], np.zeros(()), self.shape)


@dataclass
class FloatInput:
    buf: str
    shape: tuple[int, ...]


def per_channel(v: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A per-channel vector shaped ``(C, 1, ...)`` to broadcast over a per-sample ``shape``."""
    a = v.detach().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    return a.reshape(-1, *([1] * (len(shape) - 1)))


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise UnsupportedError(f"node {node.name!r} has no recorded shape; the integer backend needs one tensor per node")
    return tuple(int(d) for d in meta.shape[1:])


@dataclass
class _Lowering:
    gm: fx.GraphModule
    instructions: list[Instr] = field(default_factory=list)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[fx.Node, object] = field(default_factory=dict)
    quantizers: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    folded: set[str] = field(default_factory=set)  # batch norms a layer folds (exact.plan_layer)

    def __post_init__(self) -> None:
        try:  # masks and offsets built from the input's shape: constant offsets of the sums they join
            domains = tensor_domains(self.gm)
            self.built = shape_built_tensors(self.gm, domains)
        except ValueError as e:
            raise UnsupportedError(f"integer backend: {e}") from None
        self.const_only = feeds_only_constants(self.gm, domains)
        self.output_tail = output_tail(self.gm)

    # ------------------------------------------------------------------ helpers

    def const(self, name: str, value: np.ndarray) -> str:
        assert name not in self.consts, name
        self.consts[name] = np.ascontiguousarray(value)
        return name

    def emit(self, op: str, dst: str, srcs, consts=(), attrs=None, layer: str = "") -> str:
        assert op in ISA, op
        self.instructions.append(Instr(op, dst, tuple(srcs), tuple(consts), attrs or {}, layer))
        return dst

    def unsupported(self, node: fx.Node, why: str) -> UnsupportedError:
        return UnsupportedError(f"integer backend: `{node.format_node()}`: {why}")

    def acc(self, node: fx.Node, v: object) -> Acc:
        if isinstance(v, Grid):
            return v.acc()
        if isinstance(v, Acc):
            return v
        raise self.unsupported(node, "reads the float network input outside a quantizer")

    # ------------------------------------------------------------------ requantization

    def requant(self, acc: Acc, dst: str, out_step, qmin: int, qmax: int, out_factor: str | None, layer: str) -> str:
        """One ``requant``: ``acc`` onto codes of step ``out_step`` (times ``out_factor[n]``) in ``[qmin, qmax]``.

        Without per-sample factors the fixed-point constants are computed here; under
        ASQ the interpreter computes them per sample from the same real scales.
        """
        step = np.asarray(out_step, dtype=np.float64)
        names = [self.const(f"{dst}.scale{t}", term.scale) for t, term in enumerate(acc.terms)]
        names += [self.const(f"{dst}.offset", acc.offset), self.const(f"{dst}.step", step)]
        factors = [term.factor for term in acc.terms]
        in_bits = max(math.ceil(math.log2(float(t.bound.max()) + 1)) for t in acc.terms) + math.ceil(math.log2(len(acc.terms)))
        attrs = {
            "terms": [[t.buf, t.factor] for t in acc.terms], "out_factor": out_factor,
            "qmin": qmin, "qmax": qmax, "clip": [_json_float(acc.lo), _json_float(acc.hi)],
            # x_t * m_t beyond int64 (POST accumulators): the interpreter sums exact Python integers
            "mult_bits": 31, "in_bits": in_bits, "wide": in_bits + 32 > 63,
            "static": out_factor is None and all(f is None for f in factors),
        }
        if attrs["static"]:
            ms, sh, b = multipliers([t.scale / step for t in acc.terms], acc.offset / step, attrs["mult_bits"])
            names += [self.const(f"{dst}.mult{t}", m) for t, m in enumerate(ms)]
            names += [self.const(f"{dst}.shift", sh), self.const(f"{dst}.bias", b)]
            attrs["wide"] = attrs["wide"] or b.dtype != np.int64  # a bias past int64 (float64, exact)
            lo, hi = code_bounds(acc.lo, acc.hi, step, qmin, qmax)
            names += [self.const(f"{dst}.lo", np.asarray(lo, dtype=np.int64)), self.const(f"{dst}.hi", np.asarray(hi, dtype=np.int64))]
            fast = None if attrs["wide"] else f32_constants(ms, sh, b, lo, hi, [t.bound for t in acc.terms],
                                                             [t.floor for t in acc.terms])
            if fast is not None:  # proven equal on every input the bounds allow: the interpreter may run float32
                names += [self.const(f"{dst}.mult{t}_f32", m) for t, m in enumerate(fast[0])]
                names += [self.const(f"{dst}.bias_f32", fast[1])]
                attrs["f32"] = True
        srcs = [t.buf for t in acc.terms] + [f for f in factors if f is not None] + ([out_factor] if out_factor else [])
        return self.emit("requant", dst, dict.fromkeys(srcs), names, attrs, layer)

    def materialize(self, acc: Acc, node: fx.Node) -> Acc:
        """Requantize ``acc`` onto a 32-bit intermediate (per-channel unit ``bound / 2^31``)."""
        if len(acc.terms) == 1 and not acc.clamped and not np.any(acc.offset) and acc.terms[0].factor is None:
            return acc
        beta_max = 8.0  # ASQ betas lie in [1/8, 8]
        bound = sum(t.bound * np.abs(t.scale) * (beta_max if t.factor else 1.0) for t in acc.terms) + np.abs(acc.offset)
        unit = np.where(bound > 0, bound / 2.0**WIDE_BITS, 1.0)
        lim = 2**WIDE_BITS - 1
        dst = self.requant(acc, f"{node.name}.wide", unit, -lim, lim, None, node.name)
        return Acc([Term(dst, unit, np.full(unit.shape, float(lim)))], np.zeros(()), acc.shape)

    # ------------------------------------------------------------------ node handlers

    def quantizer(self, node: fx.Node) -> Grid:
        frozen = ir.get(node, ir.STEP, ir.FrozenAct)
        src = self.values[node.args[0]]
        factor = None
        if frozen.adapter is not None:
            factor = self.beta(node, src, frozen)
        shape = _shape(node)
        # per channel: one requantization multiplier per channel (the batch axis is not in `shape`)
        step = frozen.step if frozen.channel_axis is None else frozen.sample_steps(len(shape) + 1)[0]
        if isinstance(src, FloatInput):
            if frozen.channel_axis is not None:
                raise self.unsupported(node, "per-channel steps on the network input")
            attrs = {"step": frozen.step, "qmin": frozen.qmin, "qmax": frozen.qmax, "factor": factor}
            self.emit("quantize", node.name, [src.buf] + ([factor] if factor else []), (), attrs, node.name)
        else:
            self.requant(self.acc(node, src), node.name, step, frozen.qmin, frozen.qmax, factor, node.name)
        self.quantizers.append(node.name)
        return Grid(node.name, step, frozen.qmin, frozen.qmax, frozen.bits, shape, factor)

    def beta(self, node: fx.Node, src: object, frozen: ir.FrozenAct) -> str:
        """Host step: each sample's ASQ factor beta from the float value the quantizer reads."""
        a = frozen.adapter
        if not a.pools_channels_first(node):  # the host step pools channels-first maps
            raise UnsupportedError(f"integer backend: ASQ quantizer {node.name!r} pools over tokens (features on the "
                                   "last axis), which the integer program's adapter step does not support yet")
        names = [self.const(f"{node.name}.{k}", getattr(a, k).detach().double().numpy())
                 for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
        attrs = {"beta_bound": a.beta_bound}
        if isinstance(src, FloatInput):
            srcs, attrs["terms"] = [src.buf], None
        else:
            acc = self.acc(node, src)
            names += [self.const(f"{node.name}.beta.scale{t}", term.scale) for t, term in enumerate(acc.terms)]
            names.append(self.const(f"{node.name}.beta.offset", acc.offset))
            attrs["terms"] = [[t.buf, t.factor] for t in acc.terms]
            attrs["clip"] = [_json_float(acc.lo), _json_float(acc.hi)]
            srcs = [t.buf for t in acc.terms] + [t.factor for t in acc.terms if t.factor]
        return self.emit("asq_beta", f"{node.name}.beta", dict.fromkeys(srcs), names, attrs, node.name)

    def adder(self, node: fx.Node, info: ir.LayerInfo) -> Acc:
        """An adder layer: requantize the input once per scale group, then one ``sad``.

        Output channel ``c`` of group ``g`` is ``-act_steps[g] * sum |a_g - ratio * w_q|``; the
        negation and the step go into the channel's scale, and the lossless clamp's constant
        is already in the bias or the re-estimated batch norm (``compensation_applies``).
        """
        rec = ir.get(node, ir.ADDER_Q, ir.AdderScales)
        codes = ir.get(node, ir.CODES, ir.WeightCodes)
        acc = self.acc(node, self.values[node.args[0]])
        qmin, qmax = 0, 2**rec.act_bits - 1
        act_steps = rec.act_steps  # the module's float32 steps (the verifier checks they agree)
        # under ASQ the input's terms carry per-sample factors: the per-group requant forms its
        # multipliers per sample (the group steps themselves are static)
        bufs = [self.requant(acc, f"{node.name}.a{g}", step, qmin, qmax, None, node.name)
                for g, step in enumerate(act_steps)]
        w = codes.codes.numpy().astype(np.int64) * rec.weight_step_ratio  # in activation steps
        group = np.asarray(rec.group_of_channel, dtype=np.int64)
        consts = [self.const(f"{node.name}.w", w), self.const(f"{node.name}.group", group)]
        k = int(np.prod(w.shape[1:]))
        attrs = {"kind": info.kind, "stride": list(info.stride), "padding": list(info.padding),
                 "dilation": list(info.dilation), "groups": info.groups, "a_bits": rec.act_bits,
                 "w_bits": rec.weight_bits, "k": k}
        per_out = (np.abs(w).reshape(w.shape[0], -1).sum(1) + qmax * k).astype(np.float64)
        attrs["acc_bound"] = int(per_out.max(initial=0))
        self.emit("sad", node.name, bufs, consts, attrs, node.name)
        shape = _shape(node)
        steps = np.asarray(act_steps, dtype=np.float64)[group]
        offset = per_channel(codes.bias, shape) if codes.bias is not None else np.zeros(())
        if rec.compensation_applies and rec.folded_into not in ("bias", ""):
            raise self.unsupported(node, f"adder compensation folded into {rec.folded_into!r} but still applying")
        return Acc([Term(node.name, per_channel(-steps, shape), per_channel(per_out, shape))], offset, shape)

    def layer(self, node: fx.Node) -> Acc:
        info = ir.get(node, ir.LAYER, ir.LayerInfo)
        if info.kind == "adder2d" and ir.ADDER_Q in node.meta and ir.FLOAT not in node.meta:
            return self.adder(node, info)
        if info.kind == "embedding":
            raise self.unsupported(node, f"{info.kind} layers have no integer lowering yet; export the model to ONNX "
                                         "(qcompiler.runtime.onnx_export.to_onnx, custom or qdq form) instead")
        src = self.values[node.args[0]]
        if not isinstance(src, Grid):
            raise self.unsupported(node, "a compute layer must read an activation quantizer's codes")
        if np.ndim(src.step):
            raise self.unsupported(node, "a compute layer reads codes with one step per channel (only joins can)")
        codes = ir.find(node, ir.CODES, ir.WeightCodes)
        if codes is None or ir.FLOAT in node.meta:
            raise self.unsupported(node, "float compute layers have no integer form")
        if codes.grid not in ("uniform", "pot", "post") or info.kind == "adder2d":
            raise self.unsupported(node, f"{codes.grid} weights are not lowered yet")
        shape = _shape(node)
        a_max = max(abs(src.qmin), abs(src.qmax))
        wc = codes.codes.numpy().astype(np.int64)
        kind, stride, padding = info.kind, list(info.stride), list(info.padding)
        if info.kind in TRANSPOSED_KINDS:
            src = self.spread_for_transposed(node, src, info)
            # the conv it equals: stride 1, no padding, the weight (output channel first) flipped in space
            kind, stride, padding = info.kind.replace("_transpose", ""), [1] * len(stride), [0] * len(padding)
            wc = np.ascontiguousarray(np.flip(wc, axis=tuple(range(2, wc.ndim))))
        attrs = {"kind": kind, "stride": stride, "padding": padding,
                 "dilation": list(info.dilation), "groups": info.groups, "a_bits": src.bits, "w_bits": codes.bits}
        if info.kind in TRANSPOSED_KINDS:  # the cost counts the products of real inputs, not of the spread's zeros
            attrs["macs"] = info.macs
        if codes.grid == "uniform":
            op, w_int, unit = "mac", wc, 1.0
            consts = [self.const(f"{node.name}.w", wc)]
        else:
            op, (w_int, unit, consts, extra) = "shift_acc", self.power_weights(node, codes, wc, a_max)
            attrs |= extra
        k = int(np.prod(w_int.shape[1:]))
        bound = a_max * int(np.abs(w_int).max(initial=0)) * k  # every partial sum's magnitude is below it
        attrs |= {"k": k, "exact_f32": bool(bound < F32_EXACT), "exact_f64": bool(bound < F64_EXACT)}
        per_out = np.abs(w_int).reshape(w_int.shape[0], -1).sum(1).astype(np.float64) * a_max
        attrs["acc_bound"] = int(per_out.max(initial=0))  # no result can exceed it: the overflow check may skip the scan
        self.emit(op, node.name, [src.buf], consts, attrs, node.name)
        channel, offset = self.deployed_constants(node, codes, src)
        scale = per_channel(channel * src.step * unit, shape)
        offset = per_channel(offset, shape) if offset is not None else np.zeros(())
        return Acc([Term(node.name, scale, per_channel(per_out, shape), src.factor)], offset, shape)

    def spread_for_transposed(self, node: fx.Node, src: Grid, info: ir.LayerInfo) -> Grid:
        """A transposed conv's input as the stride-1 conv it equals reads it: per spatial axis
        ``stride - 1`` zeros between positions, ``dilation * (kernel - 1) - padding`` zeros before and
        as many plus the output padding after (a negative count crops), gathered by one ``index``
        (position -1 a zero code)."""
        positions, lengths = [], []
        output_padding = info.output_padding or (0,) * len(info.stride)
        for axis, length in enumerate(src.shape[1:]):
            s, d, k = info.stride[axis], info.dilation[axis], info.kernel_size[axis]
            core = [-1] * ((length - 1) * s + 1)
            core[::s] = range(length)
            before = d * (k - 1) - info.padding[2 * axis]
            after = d * (k - 1) - info.padding[2 * axis + 1] + output_padding[axis]
            picked = [-1] * max(before, 0) + core[max(-before, 0): len(core) + min(after, 0)] + [-1] * max(after, 0)
            if len(picked) - d * (k - 1) != _shape(node)[1 + axis]:
                raise self.unsupported(node, "a transposed conv whose output size this lowering does not reproduce")
            positions.append({"positions": picked})
            lengths.append(len(picked))
        buf = f"{node.name}.spread"
        self.emit("index", buf, [src.buf], (), {"index": [[None, None, None], *positions]}, node.name)
        return replace(src, buf=buf, shape=(src.shape[0], *lengths))

    def deployed_constants(self, node: fx.Node, codes: ir.WeightCodes, src: Grid) -> tuple[np.ndarray, np.ndarray | None]:
        """The per-channel weight scale and the bias as the deployed module uses them, float64.

        Where the module computes the layer on integer codes (:func:`exact.plan_layer`, decided
        as in its float64 reference run), it folds the batch norm reading only this layer into
        the scale and the bias, and with a scalar input step adds the bias in whole accumulator
        steps; the batch norm then passes its input through here too.
        """
        scale = codes.scale.double().numpy()
        bias = codes.bias.double().numpy() if codes.bias is not None else None
        weight = exact.integer_weight(codes.grid, codes.codes, codes.scale, codes.max_exponent)
        bn = exact.bn_link(self.gm.get_submodule(node.target))
        step = src.step if src.factor is None else None
        plan = exact.plan_layer(weight, codes.bias, bn, max(abs(src.qmin), abs(src.qmax)), step, torch.float64)
        if plan is None:
            return scale, bias
        if bn is not None:
            self.folded.add(next(iter(node.users)).name)
        # the plan's unit is the folded scale times the grid's power of two (exact), as here
        channel = plan.unit.double().numpy() * (scale / weight.unit.double().numpy())
        if plan.int_bias is not None:
            return channel, plan.int_bias.numpy() * (src.step * plan.unit.double().numpy())
        return channel, plan.bias.double().numpy() if plan.bias is not None else None

    def power_weights(self, node: fx.Node, codes: ir.WeightCodes, wc: np.ndarray, a_max: int):
        """POT/POST codes as shifts (and POST's odd exponents as table look-ups) at one fixed-point scale.

        Weight ``sign * base^-k`` with ``k = |code| - 1``. POT: ``2^-k = 2^(K-k) * 2^-K`` for the
        largest used ``K``. POST: ``k = 2j + r``, ``sqrt2^-k = 2^-j * (1/sqrt2)^r`` with float32's
        ``1/sqrt2 = MANTISSA * 2^-24``, so every product is an integer at scale ``2^-(J + 24)``.
        Returns the equivalent integer weights (for bounds), the scale unit, the constants and attrs.
        """
        sign = np.sign(wc)
        k = np.maximum(np.abs(wc) - 1, 0)
        top = max(codes.max_exponent, 0)
        if codes.grid == "pot":
            shift = np.where(sign != 0, top - k, 0)
            consts = [self.const(f"{node.name}.sign", sign), self.const(f"{node.name}.shift", shift)]
            return sign << shift, 2.0**-top, consts, {"grid": "pot", "max_exponent": top}
        j, odd = k // 2, (k % 2).astype(bool) & (sign != 0)
        top_j = top // 2
        shift = np.where(sign != 0, top_j - j, 0)
        p = codes.post_shift
        table = post_table(a_max)  # indexed by |activation code|
        consts = [self.const(f"{node.name}.sign", sign), self.const(f"{node.name}.shift", shift),
                  self.const(f"{node.name}.odd", odd), self.const(f"{node.name}.lut", table)]
        w_int = sign * (np.where(odd, codes.post_mantissa, 1 << p) << shift)
        return w_int, 2.0 ** -(top_j + p), consts, {"grid": "post", "max_exponent": top, "post_shift": p,
                                                      "post_mantissa": codes.post_mantissa}

    def join(self, node: fx.Node, operands: list[fx.Node]) -> Acc:
        rec = ir.get(node, ir.JOIN, ir.Join)
        accs = [self.acc(node, self.values[a]) for a in operands]
        shape = _shape(node)
        if any(a.clamped for a in accs):
            accs = [self.materialize(a, node) if a.clamped else a for a in accs]
        if rec.kind in ("add", "sub"):
            return self.added(node, rec.kind, accs)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        axis = dim - 1 if dim > 0 else dim + len(shape) + 1 - 1
        if axis < 0 or any(len(a.terms) != 1 or a.terms[0].factor for a in accs):
            raise self.unsupported(node, "concat of sums or of per-sample (ASQ) grids, or along the batch axis")
        full = [a.shape for a in accs]
        cat = lambda arrays: np.concatenate([np.broadcast_to(x, s) for x, s in zip(arrays, full)], axis=axis)  # noqa: E731
        self.emit("concat", node.name, [a.terms[0].buf for a in accs], (), {"axis": axis + 1}, node.name)
        term = Term(node.name, cat([a.terms[0].scale for a in accs]), cat([a.terms[0].bound for a in accs]))
        return Acc([term], cat([np.broadcast_to(a.offset, a.shape) for a in accs]), shape)

    def added(self, node: fx.Node, kind: str, accs: list[Acc]) -> Acc:
        """``a + b`` or ``a - b`` of two sums: their terms side by side, their offsets added."""
        if node.kwargs.get("alpha", 1) != 1:
            raise self.unsupported(node, "add/sub with alpha")
        sign = -1.0 if kind == "sub" else 1.0
        terms = list(accs[0].terms) + [replace(t, scale=sign * t.scale) for t in accs[1].terms]
        return Acc(terms, accs[0].offset + sign * accs[1].offset, _shape(node))

    def shape_built(self, node: fx.Node) -> Acc:
        """A float tensor built from the input's shape alone (:func:`~qcompiler.analysis.shape_built_tensors`):
        a sum with no terms, its value per sample the offset."""
        built, shape = self.built[node], _shape(node)
        if not built.value.is_floating_point():
            raise self.unsupported(node, "indices built from the input's shape (position ids) have no integer form here")
        value = built.value.double()
        if built.batched or value.dim() == len(shape) + 1:  # a leading axis of one, broadcast over the batch
            value = value[0]
        return Acc([], value.numpy(), shape)

    def offset_join(self, node: fx.Node, operands: list[fx.Node]) -> Acc:
        """An add or sub with a tensor built from shapes (an attention mask): that tensor joins the offset."""
        kind = join_kind(node)
        if kind not in ("add", "sub"):
            raise self.unsupported(node, f"a {kind} with a constant tensor (parameters read by the graph, or values "
                                         "built from the input's shape)")
        accs = [self.acc(node, self.values[a]) for a in operands]
        return self.added(node, kind, [self.materialize(a, node) if a.clamped else a for a in accs])

    def module_op(self, node: fx.Node, v: object) -> object:
        m = self.gm.get_submodule(node.target)
        if is_identity(m):
            return v
        if isinstance(m, nn.ReLU):
            return self.relu(node, v)
        if isinstance(m, MAX_POOLS):
            return self.maxpool(node, v, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, AVG_POOLS):
            return self.avgpool(node, v, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                getattr(m, "divisor_override", None))
        if isinstance(m, ADAPTIVE_AVG_POOLS):
            return self.adaptive_avgpool(node, v, m.output_size)
        if isinstance(m, BATCH_NORMS):
            return self.batchnorm(node, v, m)
        if isinstance(m, nn.ReLU6):
            return self.clip(node, v, 0.0, 6.0)
        if isinstance(m, nn.Hardtanh):
            return self.clip(node, v, float(m.min_val), float(m.max_val))
        if isinstance(m, nn.Flatten):
            return self.reshape(node, v)
        raise self.unsupported(node, f"module {type(m).__name__} has no integer lowering")

    def lookup(self, node: fx.Node) -> Acc:
        """An elementwise function of codes (``qc.lookup``): a table of its values at every code.

        The values are the node's own function (its ``approximate=``, slopes, ...) called on
        the grid points ``code * step`` in float64, as the module deployed in float64 (the
        reference :mod:`.agreement` checks against) computes them. They are stored as 32-bit
        integers in units of ``2^-frac_bits``, the finest unit that keeps the largest within
        2^30 (so rounding to the nearest unit cannot carry it past a signed 32-bit word), and
        requantized like any sum.
        """
        src = self.values[node.args[0]]
        if not isinstance(src, Grid) or src.factor is not None or np.ndim(src.step) != 0:
            raise self.unsupported(node, "a table needs its input on one grid with one step (the "
                                         "lookup-activations pass puts a quantizer there)")
        points = torch.arange(src.qmin, src.qmax + 1, dtype=torch.float64) * float(src.step)
        with torch.no_grad():
            values = call_on(self.gm, node, points).numpy()
        if not np.isfinite(values).all():
            raise self.unsupported(node, "the function is not finite at every code of its input grid")
        largest = float(np.abs(values).max())
        frac_bits = WIDE_BITS - 2 - math.floor(math.log2(largest)) if largest > 0 else 0
        table = np.round(np.ldexp(values, frac_bits)).astype(np.int64)
        function = ir.get(node, ir.LOOKUP, ir.Lookup).function
        attrs = {"qmin": src.qmin, "qmax": src.qmax, "frac_bits": frac_bits, "function": function}
        self.emit("lookup", node.name, [src.buf], [self.const(f"{node.name}.table", table)], attrs, node.name)
        bound = np.asarray(float(np.abs(table).max()))
        return Acc([Term(node.name, np.asarray(2.0**-frac_bits), bound, None, int(table.min()))], np.zeros(()), _shape(node))

    def product(self, node: fx.Node) -> Acc:
        """``a * b`` of two code tensors (an elementwise ``qc.matmul``, a gate): one integer multiply per
        element, broadcast as torch broadcasts, at the product of the two steps."""
        a, b = (self.values[x] for x in node.args)
        if not all(isinstance(v, Grid) and v.factor is None and np.ndim(v.step) == 0 for v in (a, b)):
            raise self.unsupported(node, "a product needs both operands on grids with one step each")
        corners = [p * q for p in (a.qmin, a.qmax) for q in (b.qmin, b.qmax)]
        attrs = {"a_bits": a.bits, "b_bits": b.bits}
        self.emit("mul", node.name, [a.buf, b.buf], (), attrs, node.name)
        bound = np.asarray(float(max(abs(c) for c in corners)))
        return Acc([Term(node.name, np.asarray(float(a.step) * float(b.step)), bound, None, min(corners))],
                   np.zeros(()), _shape(node))

    def relu(self, node: fx.Node, v: object) -> object:
        if isinstance(v, Grid):
            if v.qmin >= 0:
                return v  # unsigned codes: ReLU changes nothing
            self.emit("relu", node.name, [v.buf], (), {}, node.name)
            return replace(v, buf=node.name, qmin=0)
        return self.clip(node, v, 0.0, math.inf)

    def clip(self, node: fx.Node, v: object, lo: float, hi: float) -> Acc:
        acc = self.acc(node, v)
        return replace(acc, lo=max(acc.lo, lo), hi=min(acc.hi, hi))

    def batchnorm(self, node: fx.Node, v: object, m: nn.modules.batchnorm._BatchNorm) -> Acc:
        if node.name in self.folded:  # the layer before folded it, as the deployed module does
            return v
        acc = self.acc(node, v)
        if acc.clamped:
            acc = self.materialize(acc, node)
        if m.training or m.running_mean is None:
            raise self.unsupported(node, "batch norm without running statistics (call .eval())")
        var, mean = m.running_var.double(), m.running_mean.double()
        g = 1.0 / torch.sqrt(var + m.eps)
        if m.weight is not None:
            g = m.weight.detach().double() * g
        h = -mean * g + (m.bias.detach().double() if m.bias is not None else 0.0)
        g, h = per_channel(g, acc.shape), per_channel(h, acc.shape)
        return Acc([replace(t, scale=t.scale * g) for t in acc.terms], acc.offset * g + h, acc.shape)

    def _windows(self, node, v, kernel, stride, padding, dilation) -> tuple[object, dict]:
        d = len(_shape(node)) - 1
        tup = lambda x: [int(x)] * d if isinstance(x, int) else [int(i) for i in x]  # noqa: E731
        stride = kernel if stride is None or stride == [] or stride == () else stride
        pads = [v for p in tup(padding) for v in (p, p)]  # (before, after) per dim, as LayerInfo.padding
        return v, {"kernel": tup(kernel), "stride": tup(stride), "padding": pads, "dilation": tup(dilation)}

    def maxpool(self, node, v, kernel, stride, padding, dilation, ceil_mode) -> object:
        _, attrs = self._windows(node, v, kernel, stride, padding, dilation)
        if ceil_mode:  # the last windows run past the input: more padding after it, which never wins a max
            sizes = zip(_shape(node.args[0])[1:], _shape(node)[1:], attrs["kernel"], attrs["stride"], attrs["dilation"])
            for i, (size, out, k, s, dl) in enumerate(sizes):
                reach = (out - 1) * s + (k - 1) * dl + 1  # the padded extent the recorded output size needs
                attrs["padding"][2 * i + 1] = max(attrs["padding"][2 * i + 1], reach - size - attrs["padding"][2 * i])
        if isinstance(v, Grid):
            self.emit("maxpool", node.name, [v.buf], (), attrs | {"pad_value": v.qmin}, node.name)
            return replace(v, buf=node.name, shape=_shape(node))
        # max commutes with the monotone requantization only elementwise: materialize first
        acc = self.materialize(self.acc(node, v), node)
        t = acc.terms[0]
        if np.any(np.min(t.scale) <= 0):
            raise self.unsupported(node, "max pooling of a value with a non-positive scale")
        self.emit("maxpool", node.name, [t.buf], (), attrs | {"pad_value": -(2**62)}, node.name)
        return Acc([replace(t, buf=node.name)], acc.offset, _shape(node))

    def avgpool(self, node, v, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> Acc:
        if ceil_mode:
            raise self.unsupported(node, "average pooling with ceil_mode")
        _, attrs = self._windows(node, v, kernel, stride, padding, 1)
        acc = self.acc(node, v)
        padded = any(attrs["padding"])
        if acc.clamped or (padded and np.any(acc.offset)) or len(acc.terms) > 1:
            acc = self.materialize(acc, node)
        shape = _shape(node)
        if divisor:
            div = np.array(float(divisor))
        elif count_include_pad or not padded:
            div = np.array(float(np.prod(attrs["kernel"])))
        else:  # divisor = the window's positions inside the input: a per-position scale
            div = _sum_windows(np.ones((1, *acc.shape)), attrs)[0].astype(np.float64)
        t = acc.terms[0]
        self.emit("sumpool", node.name, [t.buf], (), attrs, node.name)
        count = float(np.prod(attrs["kernel"]))
        return Acc([replace(t, buf=node.name, scale=t.scale / div, bound=t.bound * count)], acc.offset, shape)

    def adaptive_avgpool(self, node, v, output_size) -> Acc:
        in_shape = self.acc(node, v).shape[1:]
        out = [output_size] * len(in_shape) if isinstance(output_size, int) else list(output_size)
        out = [i if o is None else o for o, i in zip(out, in_shape)]
        if not any(i % o for i, o in zip(in_shape, out)):
            kernel = [i // o for i, o in zip(in_shape, out)]
            return self.avgpool(node, v, kernel, kernel, 0, False, True, None)
        # windows of different sizes (torch's floor/ceil rule): the divisor is a per-position scale
        acc = self.acc(node, v)
        if acc.clamped or len(acc.terms) > 1:
            acc = self.materialize(acc, node)
        t = acc.terms[0]
        _uniform(node, self, [t.scale, t.bound], acc.shape, range(1, len(acc.shape)))
        windows = [adaptive_windows(i, o) for i, o in zip(in_shape, out)]
        lengths = [np.array([e - b for b, e in w], dtype=np.float64) for w in windows]
        div = functools.reduce(np.multiply.outer, lengths)[None]  # (1, *out)
        kernel = [int(length.max()) for length in lengths]
        self.emit("sumpool", node.name, [t.buf], (), {"windows": windows, "kernel": kernel}, node.name)
        lead = (slice(None),) + (slice(0, 1),) * len(in_shape)
        scale, bound = (np.broadcast_to(a, acc.shape)[lead] for a in (t.scale, t.bound))
        return Acc([replace(t, buf=node.name, scale=scale / div, bound=bound * float(np.prod(kernel)))],
                   acc.offset, _shape(node))

    def reduce(self, node: fx.Node, v: object, how: str) -> Acc:
        """``mean`` / ``sum`` over spatial axes: a ``sumpool`` whose window is the whole axis.

        Over the channel axis the channels' scales differ, so it is not a sum of codes.
        """
        acc = self.acc(node, v)
        nd = len(acc.shape) + 1
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        dims = sorted({d % nd for d in ([dim] if isinstance(dim, int) else list(dim or ()))})
        if not dims or dims[0] < 2:
            raise self.unsupported(node, f"{how} over the batch or channel axis (every channel has its own scale)")
        if acc.clamped or len(acc.terms) > 1:
            acc = self.materialize(acc, node)
        t = acc.terms[0]
        _uniform(node, self, [t.scale, t.bound, acc.offset], acc.shape, [d - 1 for d in dims])
        kernel = [acc.shape[d - 1] if d in dims else 1 for d in range(2, nd)]
        attrs = {"kernel": kernel, "stride": kernel, "padding": [0] * (2 * len(kernel)), "dilation": [1] * len(kernel)}
        pooled = tuple(1 if i + 1 in dims else n for i, n in enumerate(acc.shape))
        buf = self.emit("sumpool", node.name if keepdim else f"{node.name}.sum", [t.buf], (), attrs, node.name)
        count = float(np.prod(kernel))
        lead = tuple(slice(0, 1) if i + 1 in dims else slice(None) for i in range(len(acc.shape)))
        scale, bound, offset = (np.broadcast_to(a, acc.shape)[lead] for a in (t.scale, t.bound, acc.offset))
        scale, offset = (scale / count, offset) if how == "mean" else (scale, offset * count)
        out = Acc([replace(t, buf=buf, scale=scale, bound=bound * count)], offset, pooled)
        return out if keepdim else self.reshape(node, out)

    def permute(self, node: fx.Node, v: object, perm: list[int]) -> object:
        """``permute`` / ``transpose`` of the non-batch axes; per-position scales move along."""
        nd = len(_shape(node)) + 1
        perm = [p % nd for p in perm]
        if perm[0] != 0:
            raise self.unsupported(node, "a permutation that moves the batch axis")
        axes = [p - 1 for p in perm[1:]]
        if isinstance(v, (Grid, FloatInput)):  # codes, or the float input before its quantizer: layout only
            self.emit("permute", node.name, [v.buf], (), {"perm": perm[1:]}, node.name)
            return replace(v, buf=node.name, shape=_shape(node))
        acc = self.acc(node, v)
        move = lambda a: np.ascontiguousarray(np.broadcast_to(a, acc.shape).transpose(axes))  # noqa: E731
        terms = [replace(t, buf=self.emit("permute", f"{node.name}.{i}", [t.buf], (), {"perm": perm[1:]}, node.name),
                         scale=move(t.scale), bound=move(t.bound)) for i, t in enumerate(acc.terms)]
        return replace(acc, terms=terms, offset=move(acc.offset), shape=_shape(node))

    def index(self, node: fx.Node) -> object:
        """``x[:, ...]`` with slices and integers on the non-batch axes, or a chunk's piece (:func:`static_index`)."""
        try:
            src, idx = static_index(node)
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        index = [[i.start, i.stop, i.step] if isinstance(i, slice) else int(i) for i in idx[1:]]
        return self.indexed(node, self.values[src], index)

    def upsample(self, node: fx.Node, v: object) -> object:
        """Nearest-neighbour upsampling: a gather along each spatial axis (:func:`nearest_positions`)."""
        positions = nearest_positions(self.gm, node)
        if positions is None:
            raise self.unsupported(node, "a nearest upsampling whose scale factor is computed at run time")
        return self.indexed(node, v, [[None, None, None], *({"positions": p} for p in positions)])

    def pad(self, node: fx.Node, v: object) -> object:
        """A padding that copies values (zeros, reflect, replicate, circular): a gather along each padded
        axis, position -1 a zero (:func:`padding_positions`)."""
        try:
            positions = padding_positions(self.gm, node)
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        return self.indexed(node, v, [[None, None, None] if p is None else {"positions": p} for p in positions])

    def interpolate(self, node: fx.Node, v: object) -> Acc:
        """Linear upsampling: per output position, a weighted sum of its input neighbours (two per
        axis, :func:`linear_weights`). Each corner is a gather of every term, whose per-position
        scale carries the product of the corner's axis weights; the next requantization sums them."""
        axes = linear_weights(self.gm, node)
        if axes is None:
            raise self.unsupported(node, "a linear upsampling whose scale factor is computed at run time")
        acc = self.acc(node, v)
        if acc.clamped:
            acc = self.materialize(acc, node)
        terms, offset = [], np.zeros(())
        for corner in itertools.product((0, 1), repeat=len(axes)):
            # per axis (low, high, low weight, high weight): this corner's positions and weights
            weight = functools.reduce(np.multiply.outer, [a[2 + c] for a, c in zip(axes, corner)])[None]
            if not np.any(weight):
                continue  # every output position sits on an input position along some axis
            index = [[None, None, None], *({"positions": a[c]} for a, c in zip(axes, corner))]
            gathered = self.indexed(node, acc, index, f"{node.name}.{''.join(map(str, corner))}")
            terms += [replace(t, scale=t.scale * weight) for t in gathered.terms]
            offset = offset + gathered.offset * weight
        return Acc(terms, offset, _shape(node))

    def indexed(self, node: fx.Node, v: object, index: list, dst: str | None = None) -> object:
        """``v[:, *index]`` (:func:`take_index`): codes as they are, or each term of an accumulation and its scales.
        ``dst``: the buffer name (default the node's), the prefix of the terms' buffers."""
        dst = dst or node.name
        if isinstance(v, (Grid, FloatInput)):
            self.emit("index", dst, [v.buf], (), {"index": index}, node.name)
            return replace(v, buf=dst, shape=_shape(node))
        acc = self.acc(node, v)
        # a padded position's codes are zero: its offset must be too, its scales are moot (copied)
        pick = lambda a, zeros=False: np.ascontiguousarray(  # noqa: E731
            take_index(np.broadcast_to(a, acc.shape), index, batched=False, zeros=zeros))
        terms = [replace(t, buf=self.emit("index", f"{dst}.{i}", [t.buf], (), {"index": index}, node.name),
                         scale=pick(t.scale), bound=pick(t.bound)) for i, t in enumerate(acc.terms)]
        return replace(acc, terms=terms, offset=pick(acc.offset, zeros=True), shape=_shape(node))

    def reshape(self, node: fx.Node, v: object) -> object:
        shape = _shape(node)
        if isinstance(v, (Grid, FloatInput)):  # e.g. a classifier flattening the image before its input quantizer
            self.emit("reshape", node.name, [v.buf], (), {"shape": list(shape)}, node.name)
            return replace(v, buf=node.name, shape=shape)
        acc = self.acc(node, v)
        terms = []
        for i, t in enumerate(acc.terms):
            dst = self.emit("reshape", f"{node.name}.{i}", [t.buf], (), {"shape": list(shape)}, node.name)
            terms.append(replace(t, buf=dst, scale=_reshaped(t.scale, acc.shape, shape), bound=_reshaped(t.bound, acc.shape, shape)))
        return replace(acc, terms=terms, offset=_reshaped(acc.offset, acc.shape, shape), shape=shape)

    def scalar(self, node: fx.Node, v: object) -> Acc:
        a, b = node.args[0], node.args[1]
        tensor, number = (a, b) if isinstance(a, fx.Node) else (b, a)
        if not isinstance(number, (int, float)):
            raise self.unsupported(node, "arithmetic with a non-number")
        acc = self.acc(node, self.values[tensor])
        if acc.clamped:
            acc = self.materialize(acc, node)
        op = node.target if node.op == "call_function" else getattr(operator, node.target)
        name = getattr(op, "__name__", str(op))
        if name in ("mul", "truediv", "div"):
            k = float(number) if name == "mul" else 1.0 / float(number)
            return Acc([replace(t, scale=t.scale * k) for t in acc.terms], acc.offset * k, acc.shape)
        if name in ("add", "sub"):
            k = float(number)
            if name == "sub" and tensor is not a:
                raise self.unsupported(node, "number minus tensor")
            return replace(acc, offset=acc.offset + (k if name == "add" else -k))
        raise self.unsupported(node, f"scalar {name}")

    def node(self, node: fx.Node) -> object:
        try:  # shape values (a reshape reads its own recorded shape) and chunk tuples (their getitems index)
            if emits_nothing(node):
                return None
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        if node in self.built:
            return self.shape_built(node)
        if node in self.const_only:
            return None
        if node.op == "placeholder":
            self.inputs.append(node.name)
            return FloatInput(node.name, _shape(node))
        if ir.ACT in node.meta:
            return self.quantizer(node)
        if ir.LAYER in node.meta:
            return self.layer(node)
        if ir.LOOKUP in node.meta:
            return self.lookup(node)
        if ir.MATMUL in node.meta:  # elementwise: lower() refused the others
            return self.product(node)
        if ir.FLOAT in node.meta:
            raise self.unsupported(node, f"computed in float ({ir.get(node, ir.FLOAT, ir.FloatRegion).reason})")
        operands = join_operands(node)
        if operands is not None and any(a in self.built for a in operands):
            return self.offset_join(node, operands)
        if operands is not None:
            return self.join(node, operands)
        if node.op == "get_attr":
            raise self.unsupported(node, "parameters read by the graph")
        kind = op_kind(self.gm, node)
        v = self.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if is_nearest_upsampling(self.gm, node):
            return self.upsample(node, v)
        if is_linear_upsampling(self.gm, node):
            return self.interpolate(node, v)
        if padding_call(self.gm, node) is not None:
            return self.pad(node, v)
        if node.op == "call_module":
            return self.module_op(node, v)
        fname = getattr(node.target, "__name__", str(node.target))
        if kind == "keep":
            if fname in ("relu",):
                return self.relu(node, v)
            if fname in ("flatten", "view", "reshape", "squeeze", "unsqueeze"):
                return self.reshape(node, v)
            if fname in ("contiguous", "clone", "detach") or is_eval_identity(node.target):
                return v
            if fname in ("max_pool1d", "max_pool2d", "max_pool3d"):
                kw = max_pool_call(node)
                return self.maxpool(node, v, kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"], kw["ceil_mode"])
        if kind == "keep" and fname in ("permute", "transpose"):
            dims = [d for a in node.args[1:] for d in (a if isinstance(a, (list, tuple)) else [a])]
            dims = dims or list(node.kwargs.get("dims", ()))
            nd = len(_shape(node)) + 1
            if fname == "transpose":
                d0, d1 = (d % nd for d in (dims or [node.kwargs["dim0"], node.kwargs["dim1"]]))
                dims = list(range(nd))
                dims[d0], dims[d1] = d1, d0
            return self.permute(node, v, dims)
        if kind == "keep" and fname == "getitem":
            return self.index(node)
        if kind == "affine" and fname in ("relu6",):
            return self.clip(node, v, 0.0, 6.0)
        if kind == "affine" and fname in ("mean", "sum"):
            return self.reduce(node, v, fname)
        if kind == "affine" and fname in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            kw = avg_pool_call(node)
            return self.avgpool(node, v, kw["kernel_size"], kw["stride"], kw["padding"], kw["ceil_mode"],
                                kw["count_include_pad"], kw["divisor_override"])
        if kind == "affine" and fname in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
            return self.adaptive_avgpool(node, v, node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None))
        if kind == "scalar":
            return self.scalar(node, v)
        raise self.unsupported(node, f"{fname} has no integer lowering yet")

    def output(self, node: fx.Node) -> str:
        try:
            out = single_output(node)
        except ValueError as e:
            raise self.unsupported(node, str(e)) from None
        tail = self.output_tail
        src = out.args[0] if tail is not None else out
        acc = self.acc(node, self.values[src])
        names = [self.const(f"output.scale{t}", t.scale) for t in acc.terms] + [self.const("output.offset", acc.offset)]
        attrs = {"terms": [[t.buf, t.factor] for t in acc.terms], "clip": [_json_float(acc.lo), _json_float(acc.hi)]}
        srcs = [t.buf for t in acc.terms] + [t.factor for t in acc.terms if t.factor]
        if tail is None:
            return self.emit("dequant", "output", dict.fromkeys(srcs), names, attrs, out.name)
        dequantized = self.emit("dequant", "output.dequantized", dict.fromkeys(srcs), names, attrs, src.name)
        _, function, axis = tail
        return self.emit("activation", "output", [dequantized], (), {"function": function, "axis": axis}, out.name)


_HOST_FUNCTIONS = {torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
                   F.log_softmax: "log_softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                   F.tanh: "tanh"}
_HOST_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


def output_activation(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int | None] | None:
    """``(function, axis)`` when ``node``, the network's output, is a softmax, log-softmax, sigmoid or
    tanh of one tensor that nothing else reads: the program dequantizes that tensor and runs the
    function on the host (an ``activation`` instruction) instead of refusing a float region. ``None``
    otherwise, and for a softmax without an explicit ``dim`` or with a ``dtype``."""
    if len(node.users) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        function = next((f for cls, f in _HOST_MODULES.items() if type(m) is cls), None)
        dim = getattr(m, "dim", None)
    elif node.op == "call_function" and node.target in _HOST_FUNCTIONS:
        function = _HOST_FUNCTIONS[node.target]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    elif node.op == "call_method" and node.target in ("softmax", "log_softmax", "sigmoid", "tanh"):
        function = node.target
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    else:
        return None
    if function is None or node.kwargs.get("dtype") is not None:
        return None
    if function in ("softmax", "log_softmax"):
        return (function, dim) if isinstance(dim, int) else None
    return function, None


def output_tail(gm: fx.GraphModule) -> tuple[fx.Node, str, int | None] | None:
    """``(node, function, axis)`` where the network's output is such a function (:func:`output_activation`)."""
    try:
        last = single_output(next(n for n in gm.graph.nodes if n.op == "output"))
    except ValueError:  # several outputs: output() says so in one line
        return None
    tail = output_activation(gm, last)
    return None if tail is None else (last, *tail)


def call_on(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """``node``'s own call (module, function or method, with its other arguments) applied to ``x``."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)(x)
    if node.op == "call_method":
        return getattr(x, node.target)(*node.args[1:], **node.kwargs)
    return node.target(x, *node.args[1:], **node.kwargs)


def _json_float(x: float) -> float | None:
    """JSON has no infinity: ``None`` stands for an open end."""
    return None if math.isinf(x) else float(x)


def code_bounds(lo: float, hi: float, step, qmin: int, qmax: int):
    """Code range after a real clamp ``[lo, hi]``: a monotone quantizer commutes with the clamp,
    ``round(clip(v, lo, hi) / s) = clip(round(v / s), round(lo / s), round(hi / s))``."""
    from ..numerics import round_half_even

    lo_c = qmin if lo == -math.inf else np.maximum(qmin, round_half_even(np.float64(lo) / step)).astype(np.int64)
    hi_c = qmax if hi == math.inf else np.minimum(qmax, round_half_even(np.float64(hi) / step)).astype(np.int64)
    return (int(lo_c) if np.ndim(lo_c) == 0 else lo_c), (int(hi_c) if np.ndim(hi_c) == 0 else hi_c)


def _uniform(node: fx.Node, lw: _Lowering, arrays, shape: tuple[int, ...], axes) -> None:
    """A sum over ``axes`` is a sum of codes only where the scales (and offsets) do not vary along them."""
    for a in arrays:
        full = np.broadcast_to(a, shape)
        for ax in axes:
            if full.shape[ax] > 1 and not np.all(full == full.take([0], axis=ax)):
                raise lw.unsupported(node, "pooling over positions whose scales differ")


def _reshaped(a: np.ndarray, old: tuple[int, ...], new: tuple[int, ...]) -> np.ndarray:
    """Per-channel arrays follow a reshape: broadcast to the old shape, then reshape (scalars stay)."""
    if np.ndim(a) == 0:
        return a
    return np.ascontiguousarray(np.broadcast_to(a, old)).reshape(new)


def _sum_windows(x: np.ndarray, attrs: dict) -> np.ndarray:
    from .interpreter import window_reduce

    return window_reduce(x, attrs, "sum", 0)


def lower(compiled) -> Program:
    """The integer program of a compiled model (freezes and verifies it first).

    Args:
        compiled: a :class:`qcompiler.Compiled`.
    """
    compiled.freeze()
    gm = compiled.module
    lw = _Lowering(gm)
    products = [n for n in gm.graph.nodes if ir.MATMUL in n.meta and not ir.get(n, ir.MATMUL, ir.MatMul).elementwise]
    if products:  # said before any other node fails on the way to it
        raise lw.unsupported(products[0], "a product of two activations (attention) has no integer instruction yet; "
                                          "export ONNX (custom form), which computes it on both operands' grids")
    out = None
    host_tail = lw.output_tail[0] if lw.output_tail is not None else None
    for node in gm.graph.nodes:
        try:
            if node.op == "output":
                out = lw.output(node)
                continue
            if node is host_tail:  # run on the host after the output's dequant (output())
                continue
            lw.values[node] = lw.node(node)
        except QCompileError:
            raise
        except Exception as e:  # a form the handlers did not foresee: one line, never a traceback
            raise lw.unsupported(node, f"cannot be lowered ({type(e).__name__}: {e})") from None
    if len(lw.inputs) != 1 or out is None:
        raise UnsupportedError("integer backend: the model must have exactly one input and one tensor output")
    meta = {"quantizers": lw.quantizers, "passes": str(compiled.spec.passes)}
    return Program(lw.instructions, lw.consts, tuple(lw.inputs), (out,), meta)


__all__ = ["Acc", "Grid", "Term", "code_bounds", "lower"]
