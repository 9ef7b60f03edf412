"""The NumPy interpreter of integer programs: exact integer semantics, fast.

:class:`Interpreter` dispatches each instruction to ``op_<name>`` over a dict of
named buffers, frees a buffer after its last reader, and checks every integer
result against the instruction's declared ``acc_bits`` (:mod:`.isa`): an overflow
raises :class:`AccumulatorOverflow` naming the layer and the channel, or is
recorded in ``overflows`` with ``on_overflow="record"``.

Speed: NumPy's integer matmul does not use BLAS and is ~100x slower than float,
so a ``mac`` whose worst case ``max|x| * max|w| * K`` stays below ``2^53`` runs as a
float64 im2col matmul, which is exact there (the lowering records the bound as
``exact_f64``); the others run in int64.

Example:
    >>> from qcompiler.runtime.isa import Instr
    >>> from qcompiler.runtime.program import Program
    >>> w = np.array([[[1, -1]]])  # one output channel, one input channel, kernel 2
    >>> p = Program([Instr("mac", "y", ("x",), ("w",), {"kind": "conv1d", "stride": [1], "padding": [0, 0],
    ...             "dilation": [1], "groups": 1, "exact_f64": True})], {"w": w}, ("x",), ("y",))
    >>> p.run(np.array([[[3, 5, 2]]])).tolist()
    [[[-2, 3]]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import QCompileError
from ..numerics import quantize_codes
from .fixedpoint import apply, multipliers
from .isa import ISA, Instr
from .program import Program


class AccumulatorOverflow(QCompileError):
    """An integer result does not fit the width its instruction declares."""


@dataclass(frozen=True)
class Overflow:
    layer: str
    op: str
    channel: int
    value: int
    bits: int

    def message(self) -> str:
        return (f"{self.op} of layer {self.layer!r} overflows its {self.bits}-bit accumulator at channel "
                f"{self.channel} (|value| {self.value} >= 2^{self.bits - 1})")


def patches(x: np.ndarray, attrs: dict, pad_value) -> np.ndarray:
    """``(N, C, *out, *kernel)`` windows of ``x`` after padding with ``pad_value`` (strides and dilation applied)."""
    d = x.ndim - 2
    pads = attrs["padding"]
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[2 * i], pads[2 * i + 1]) for i in range(d)], constant_values=pad_value)
    kernel, stride, dil = attrs["kernel"], attrs["stride"], attrs["dilation"]
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dil)]
    v = sliding_window_view(x, extent, axis=tuple(range(2, 2 + d)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride) + tuple(slice(None, None, dl) for dl in dil)
    return v[index]


def window_reduce(x: np.ndarray, attrs: dict, how: str, pad_value) -> np.ndarray:
    """Sum or max over each pooling window."""
    p = patches(x, attrs, pad_value)
    axes = tuple(range(x.ndim, p.ndim))
    return p.sum(axis=axes) if how == "sum" else p.max(axis=axes)


def conv(x: np.ndarray, w: np.ndarray, a: dict) -> np.ndarray:
    """Exact integer convolution / linear map of codes ``x`` with integer weights ``w`` (int64 result)."""
    dtype = np.float64 if a["exact_f64"] else np.int64
    if a["kind"] == "linear":
        y = x.astype(dtype) @ w.T.astype(dtype)
    else:
        groups = a["groups"]
        p = patches(x.astype(dtype), {"padding": a["padding"], "kernel": list(w.shape[2:]), "stride": a["stride"],
                                      "dilation": a["dilation"]}, 0)
        n, c, out = p.shape[0], p.shape[1], p.shape[2:2 + w.ndim - 2]
        cg, og = c // groups, w.shape[0] // groups
        ys = []
        for g in range(groups):
            pg = np.moveaxis(p[:, g * cg:(g + 1) * cg], 1, 1 + len(out))  # (N, *out, Cg, *K)
            pg = pg.reshape(n * int(np.prod(out)), -1)
            wg = w[g * og:(g + 1) * og].reshape(og, -1).astype(dtype)
            ys.append((pg @ wg.T).reshape(n, *out, og))
        y = np.moveaxis(np.concatenate(ys, axis=-1), -1, 1)
    return np.rint(y).astype(np.int64) if dtype is np.float64 else y


def _per_sample(f: np.ndarray, ndim: int) -> np.ndarray:
    return f.reshape(-1, *([1] * (ndim - 1)))


@dataclass
class Interpreter:
    """Runs a :class:`Program` on NumPy arrays."""

    program: Program
    on_overflow: str = "raise"  # "raise" | "record"
    overflows: list[Overflow] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every buffer's per-sample shape, as run

    def run(self, x: np.ndarray, keep: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p = self.program
        last: dict[str, int] = {}
        for i, ins in enumerate(p.instructions):
            for s in ins.srcs:
                last[s] = i
        pinned = set(keep) | set(p.outputs)
        env: dict[str, np.ndarray] = {p.inputs[0]: np.asarray(x)}
        kept: dict[str, np.ndarray] = {}
        for i, ins in enumerate(p.instructions):
            out = getattr(self, f"op_{ins.op}")(ins, env)
            env[ins.dst] = out
            self.shapes[ins.dst] = tuple(out.shape[1:])
            if ins.dst in pinned:
                kept[ins.dst] = out
            for s in ins.srcs:
                if last.get(s) == i and s not in pinned:
                    del env[s]  # its last reader ran: free it
        return env[p.outputs[0]], kept

    # ------------------------------------------------------------------ checks

    def check(self, ins: Instr, y: np.ndarray, bits: int | None = None) -> None:
        bits = bits or ISA[ins.op].acc_bits
        lim = 2 ** (bits - 1)
        mags = np.abs(y.reshape(y.shape[0], y.shape[1], -1)).max(axis=(0, 2)) if y.ndim >= 2 else np.abs(y)
        if mags.size and mags.max() >= lim:
            c = int(np.argmax(mags))
            ov = Overflow(ins.layer, ins.op, c, int(mags[c]), bits)
            if self.on_overflow == "raise":
                raise AccumulatorOverflow(ov.message())
            self.overflows.append(ov)

    def c(self, name: str) -> np.ndarray:
        return self.program.consts[name]

    # ------------------------------------------------------------------ host steps

    def op_quantize(self, ins: Instr, env) -> np.ndarray:
        a = ins.attrs
        x = np.asarray(env[ins.srcs[0]], dtype=np.float64)
        step = np.float64(a["step"])
        if a.get("factor"):
            step = step * _per_sample(env[a["factor"]], x.ndim)  # s_n = s * beta_n, as the module forms it
        return quantize_codes(x, step, a["qmin"], a["qmax"])

    def value(self, ins: Instr, env, names: list[str]) -> np.ndarray:
        """The real value ``clip(sum_t x_t * scale_t (* factor_t) + offset)`` in float64."""
        a = ins.attrs
        v = None
        for t, (buf, factor) in enumerate(a["terms"]):
            x = env[buf]
            term = x * self.c(names[t])
            if factor:
                term = term * _per_sample(env[factor], x.ndim)
            v = term if v is None else v + term
        v = v + self.c(names[len(a["terms"])])
        lo, hi = a["clip"]
        if lo is not None or hi is not None:
            v = np.clip(v, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        return v

    def op_asq_beta(self, ins: Instr, env) -> np.ndarray:
        a = ins.attrs
        w1, b1, w2, b2 = (self.c(n) for n in ins.consts[:4])
        if a["terms"] is None:
            x = np.asarray(env[ins.srcs[0]], dtype=np.float64)
        else:
            x = self.value(ins, env, list(ins.consts[4:]))
        # quantizers.asq.adapter_forward in NumPy: pool, fc1, ReLU, fc2, bounded exp
        pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1) if x.ndim > 2 else x
        hidden = np.maximum(pooled @ w1.T + b1, 0.0)
        bound = a["beta_bound"]
        return np.exp(bound * np.tanh((hidden @ w2.T + b2)[:, 0] / bound))

    def op_dequant(self, ins: Instr, env) -> np.ndarray:
        return self.value(ins, env, list(ins.consts))

    # ------------------------------------------------------------------ integer units

    def op_mac(self, ins: Instr, env) -> np.ndarray:
        y = conv(env[ins.srcs[0]], self.c(ins.consts[0]), ins.attrs)
        self.check(ins, y)
        return y

    def op_shift_acc(self, ins: Instr, env) -> np.ndarray:
        """POT/POST: every product is a shift (and for POST's odd exponents a table entry).

        ``(LUT[|x|] * sgn x) << s == x * (MANTISSA << s)`` and ``(x << p) << s == x * (1 << (p + s))``
        exactly, so the shifts and look-ups of a whole layer run as one exact matmul with
        those integer weights; the table itself is checked to be ``A * MANTISSA``.
        """
        a = ins.attrs
        sign, shift = self.c(ins.consts[0]), self.c(ins.consts[1])
        if a["grid"] == "post":
            odd, table = self.c(ins.consts[2]), self.c(ins.consts[3])
            unit = np.where(odd, table[1], np.int64(1) << a["post_shift"])
        else:
            unit = np.int64(1)
        y = conv(env[ins.srcs[0]], sign * (unit << shift), a)
        self.check(ins, y)
        return y

    def op_sad(self, ins: Instr, env) -> np.ndarray:
        """Adder layers: per output channel, the sum of absolute differences on its scale group's codes."""
        a = ins.attrs
        w, group = self.c(ins.consts[0]), self.c(ins.consts[1])
        win = {"padding": a["padding"], "kernel": list(w.shape[2:]), "stride": a["stride"], "dilation": a["dilation"]}
        ps = [patches(env[buf].astype(np.int64), win, 0) for buf in ins.srcs]  # zero codes in the padding
        cg, og = w.shape[1], w.shape[0] // a["groups"]
        spatial = w.ndim - 2
        y = None
        for o in range(w.shape[0]):
            p = ps[int(group[o])]
            c0 = (o // og) * cg
            wo = w[o].reshape(cg, *([1] * spatial), *w.shape[2:])
            d = np.abs(p[:, c0:c0 + cg] - wo).sum(axis=(1, *range(2 + spatial, 2 + 2 * spatial)))
            if y is None:
                y = np.empty((d.shape[0], w.shape[0], *d.shape[1:]), dtype=np.int64)
            y[:, o] = d
        self.check(ins, y)
        return y

    def op_requant(self, ins: Instr, env) -> np.ndarray:
        a = ins.attrs
        terms = a["terms"]
        k = len(terms)
        names = ins.consts
        xs = [env[buf] for buf, _ in terms]
        ndim = xs[0].ndim
        scales, offset, step = [self.c(n) for n in names[:k]], self.c(names[k]), self.c(names[k + 1])
        if a["static"]:
            ms = [self.c(n) for n in names[k + 2:2 * k + 2]]
            sh, b, lo, hi = (self.c(n) for n in names[2 * k + 2:2 * k + 6])
        else:
            from .lower import code_bounds

            # per sample (ASQ): real multipliers from the betas, then the same fixed point as the lowering
            reals = []
            for (_, factor), s in zip(terms, scales):
                s = s[None] if np.ndim(s) else s
                reals.append(s * _per_sample(env[factor], ndim) if factor else s)
            out_step = step[None] if np.ndim(step) else step
            if a["out_factor"]:
                out_step = out_step * _per_sample(env[a["out_factor"]], ndim)
            reals = [np.broadcast_to(r, np.broadcast_shapes(*(np.shape(q) for q in reals), np.shape(out_step))) / out_step for r in reals]
            off = (offset[None] if np.ndim(offset) else offset) / out_step
            ms, sh, b = multipliers(reals, off, a["mult_bits"])
            lo_r, hi_r = a["clip"]
            lo, hi = code_bounds(-np.inf if lo_r is None else lo_r, np.inf if hi_r is None else hi_r, out_step, a["qmin"], a["qmax"])
        # the int64 sum must not wrap: check the worst case of this batch before computing it
        worst = sum(int(np.abs(x).max(initial=0)) * int(np.abs(m).max(initial=0)) for x, m in zip(xs, ms)) + int(np.abs(b).max(initial=0))
        wide = a.get("wide", False)
        if worst >= 2**63 and not wide:
            raise AccumulatorOverflow(Overflow(ins.layer, ins.op, -1, worst, 64).message())
        return apply(xs, ms, sh, b, lo, hi, wide=wide and worst >= 2**63)

    def op_maxpool(self, ins: Instr, env) -> np.ndarray:
        return window_reduce(env[ins.srcs[0]], ins.attrs, "max", ins.attrs["pad_value"])

    def op_sumpool(self, ins: Instr, env) -> np.ndarray:
        y = window_reduce(env[ins.srcs[0]].astype(np.int64, copy=False), ins.attrs, "sum", 0)
        self.check(ins, y)
        return y

    def op_relu(self, ins: Instr, env) -> np.ndarray:
        return np.maximum(env[ins.srcs[0]], 0)

    def op_concat(self, ins: Instr, env) -> np.ndarray:
        return np.concatenate([env[s] for s in ins.srcs], axis=ins.attrs["axis"])

    def op_reshape(self, ins: Instr, env) -> np.ndarray:
        x = env[ins.srcs[0]]
        return x.reshape(x.shape[0], *ins.attrs["shape"])


__all__ = ["AccumulatorOverflow", "Interpreter", "Overflow", "patches", "window_reduce"]
