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
    >>> p.run(np.array([[[3, 5, 2]]])).tolist()  # exact integers, held in float64
    [[[-2.0, 3.0]]]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
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


def adaptive_windows(size: int, out: int) -> list[list[int]]:
    """Adaptive pooling's windows ``[floor(i * size / out), ceil((i + 1) * size / out))`` (torch's rule).

    >>> adaptive_windows(5, 3)
    [[0, 2], [1, 4], [3, 5]]
    """
    return [[i * size // out, -(-(i + 1) * size // out)] for i in range(out)]


def adaptive_sum(x: np.ndarray, windows: list[list[list[int]]]) -> np.ndarray:
    """Sums over adaptive windows (they may overlap), one spatial axis at a time through prefix sums."""
    for axis, wins in enumerate(windows, start=2):
        c = np.cumsum(x, axis=axis)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        starts, ends = (np.array([w[i] for w in wins]) for i in (0, 1))
        x = c.take(ends, axis=axis) - c.take(starts, axis=axis)
    return x


def index_tuple(index: list) -> tuple:
    """The NumPy index of an ``index`` instruction: the batch axis whole, then per axis a slice or an integer."""
    return (slice(None), *(slice(*i) if isinstance(i, list) else i for i in index))


def window_reduce(x: np.ndarray, attrs: dict, how: str, pad_value) -> np.ndarray:
    """Sum or max over each pooling window."""
    p = patches(x, attrs, pad_value)
    axes = tuple(range(x.ndim, p.ndim))
    return p.sum(axis=axes) if how == "sum" else p.max(axis=axes)


F32_EXACT = 2**24  # float32 holds every integer below this exactly
F64_EXACT = 2**53  # float64 likewise


def exact_dtype(bound: int):
    """The fastest dtype whose matmul is exact when every partial sum stays below ``bound``.

    BLAS sums integer-valued products in some order; each partial sum is an integer of
    magnitude at most ``bound``, so float32 (float64) is exact below ``2^24`` (``2^53``).
    NumPy's int64 matmul does not use BLAS and is ~100x slower: the last resort.

    >>> exact_dtype(15 * 7 * 576), exact_dtype(255 * 127 * 4608), exact_dtype(2**60)
    (<class 'numpy.float32'>, <class 'numpy.float64'>, <class 'numpy.int64'>)
    """
    return np.float32 if bound < F32_EXACT else np.float64 if bound < F64_EXACT else np.int64


def _dtype(a: dict):
    if a.get("exact_f32"):
        return np.float32
    return np.float64 if a.get("exact_f64") else np.int64


# Exact float convolutions (integer codes, sums below 2^24 / 2^53) run on torch's CPU
# kernel: the interpreter's own NumPy loop below computes the same integers (tests
# compare them) but is ~4x slower on ResNet-20. ``QCOMPILER_NUMPY_CONV=1`` selects it.
TORCH_CONV = os.environ.get("QCOMPILER_NUMPY_CONV", "") in ("", "0")


def conv(x: np.ndarray, w: np.ndarray, a: dict, dtype=None) -> np.ndarray:
    """Exact convolution / linear map of integers ``x`` with integer weights ``w``.

    The result holds exact integers in ``dtype`` (default: the narrowest exact one the
    lowering recorded, ``exact_f32`` / ``exact_f64``; else int64). A convolution runs
    channels-last as one matmul per kernel offset, accumulated in place, which avoids
    the im2col copy (``K`` times the input): the slices are views, BLAS reads them.
    Groups with one input channel each (depthwise) are an elementwise multiply-add.
    """
    dtype = dtype or _dtype(a)
    if a["kind"] == "linear":
        return x.astype(dtype, copy=False) @ w.T.astype(dtype)
    if dtype is not np.int64 and TORCH_CONV:
        return _torch_conv(x, w, a, dtype)
    d = w.ndim - 2
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    o, cg, kernel = w.shape[0], w.shape[1], w.shape[2:]
    groups, pads, stride, dil = a["groups"], a["padding"], a["stride"], a["dilation"]
    padded = [s + pads[2 * i] + pads[2 * i + 1] for i, s in enumerate(spatial)]
    out = [(p - dl * (k - 1) - 1) // st + 1 for p, k, st, dl in zip(padded, kernel, stride, dil)]
    xl = np.zeros((n, *padded, c), dtype=dtype)
    xl[(slice(None), *(slice(pads[2 * i], pads[2 * i] + s) for i, s in enumerate(spatial)))] = np.moveaxis(x, 1, -1)
    og = o // groups
    wl = np.moveaxis(w, 1, -1).astype(dtype)  # (O, *K, Cg)
    y = np.zeros((n, *out, o), dtype=dtype)
    for off in np.ndindex(*kernel):
        window = (slice(None), *(slice(k * dl, k * dl + (m - 1) * st + 1, st)
                                 for k, dl, m, st in zip(off, dil, out, stride)))
        xs = xl[window]  # (N, *out, C), a view
        wk = wl[(slice(None), *off)]  # (O, Cg)
        if groups == 1:
            y += xs @ wk.T
        elif cg == 1:  # depthwise: output o = g * og + j reads input channel g
            y += (xs[..., :, None] * wk.reshape(groups, og)).reshape(*xs.shape[:-1], o)
        else:
            prod = xs.reshape(*xs.shape[:-1], groups, 1, cg) @ np.moveaxis(wk.reshape(groups, og, cg), -1, -2)
            y += prod.reshape(*xs.shape[:-1], o)
    return np.moveaxis(y, -1, 1)


SAD_MATMUL_LEVELS = 32  # beyond this many distinct weight values the direct SAD is faster


def sad_as_matmuls(xs: list[np.ndarray], w: np.ndarray, group: np.ndarray, a: dict) -> np.ndarray:
    """``sum_k |x_k - w_k|`` over each window, as exact convolutions.

    ``|x - w| = x + w - 2 min(x, w)``. With ``0 = v_0 < v_1 < ... < v_L`` the distinct
    positive weights and ``x >= 0`` (unsigned codes), ``min(x, w) = min(w, 0) + sum_i
    [w >= v_i] clip(x - v_(i-1), 0, v_i - v_(i-1))``, so per output channel
    ``sum_k |x_k - w_k| = sum_k x_k + sum_k |w_k| - 2 conv(D(x), J)`` with ``D`` the ``L``
    clipped slices of ``x`` stacked as channels and ``J`` the 0/1 indicators
    ``[w >= v_i]``: one convolution with ``L`` times the channels, exact in float32 while
    ``K * max x`` stays below ``2^24``. Padding is zero codes; ``D(0) = 0``, as needed.
    """
    o, cg = w.shape[:2]
    groups = a["groups"]
    levels = np.unique(w[w > 0]).astype(np.int64)
    prev = np.concatenate([[0], levels[:-1]])
    gaps = levels - prev
    a_max = max(_absmax(x) for x in xs)
    k = int(np.prod(w.shape[1:]))
    dtype = exact_dtype(k * (a_max + 2 * int(np.abs(w).max(initial=0))) + 1)
    spatial = w.ndim - 2
    lv = (1, -1) + (1,) * (w.ndim - 2)
    ind = (w[:, :, None] >= levels.reshape(lv)).astype(dtype)  # (O, Cg, L, *K)
    ind = ind.reshape(o, cg * len(levels), *w.shape[2:])
    ones = np.ones((groups, cg, *w.shape[2:]), dtype=dtype)
    wabs = np.abs(w).reshape(o, -1).sum(1).astype(dtype).reshape(1, o, *([1] * spatial))
    y = None
    for g, x in enumerate(xs):
        sel = np.flatnonzero(group == g)
        if sel.size == 0:
            continue
        xf = x.astype(dtype, copy=False)
        shape = (1, 1, -1) + (1,) * spatial
        d = np.clip(xf[:, :, None] - prev.reshape(shape).astype(dtype), 0, gaps.reshape(shape).astype(dtype))
        d = d.reshape(x.shape[0], x.shape[1] * len(levels), *x.shape[2:])
        if not len(levels):  # no positive weight: min(x, w) = w everywhere, already in sum |w|
            mins = 0.0
        elif groups == 1:
            mins = conv(d, ind[sel], a, dtype)
        else:
            mins = conv(d, ind, a, dtype)[:, sel]
        if groups == 1:
            sums = conv(xf, ones, a, dtype)  # (N, 1, *out): the window sum of x
        else:
            sums = conv(xf, ones, a, dtype)[:, sel // (o // groups)]
        part = sums + wabs[:, sel] - 2 * mins
        if y is None:
            y = np.empty((part.shape[0], o, *part.shape[2:]), dtype=dtype)
        y[:, sel] = part
    return y


def sad_direct(xs: list[np.ndarray], w: np.ndarray, group: np.ndarray, a: dict) -> np.ndarray:
    """``sum_k |x_k - w_k|`` over each window, one int64 broadcast per output channel (the reference)."""
    win = {"padding": a["padding"], "kernel": list(w.shape[2:]), "stride": a["stride"], "dilation": a["dilation"]}
    ps = [patches(x.astype(np.int64), win, 0) for x in xs]  # zero codes in the padding
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
    return y


def _absmax(x: np.ndarray) -> int:
    """``max |x|`` as a Python int, without an ``|x|`` temporary."""
    x = np.asarray(x)
    return 0 if x.size == 0 else int(max(x.max(), -x.min()))


def _torch_conv(x: np.ndarray, w: np.ndarray, a: dict, dtype) -> np.ndarray:
    """:func:`conv` in float through torch's CPU convolution (oneDNN, direct algorithm).

    Exact for the same reason as a BLAS matmul: the direct algorithm sums integer-valued
    products, every partial sum below the bound. ``tests/runtime/test_isa.py`` checks it
    against the NumPy int64 path at the float32 bound, where Winograd or FFT would round.
    """
    d = w.ndim - 2
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=dtype))
    pads = a["padding"]
    before, after = pads[0::2], pads[1::2]
    if before != after:  # torch pads symmetrically: pad the input first (last dim first for F.pad)
        xt = torch.nn.functional.pad(xt, [p for i in reversed(range(d)) for p in (before[i], after[i])])
        before = [0] * d
    fn = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[d - 1]
    with torch.no_grad():
        y = fn(xt, wt, None, a["stride"], before, a["dilation"], a["groups"])
    return y.numpy()


def _per_sample(f: np.ndarray, ndim: int) -> np.ndarray:
    return f.reshape(-1, *([1] * (ndim - 1)))


@dataclass
class Interpreter:
    """Runs a :class:`Program` on NumPy arrays."""

    program: Program
    on_overflow: str = "raise"  # "raise" | "record"
    overflows: list[Overflow] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every buffer's per-sample shape, as run

    def run(
        self, x: np.ndarray, keep: tuple[str, ...] = (), force: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run on ``x``; returns the output and the buffers named in ``keep`` as computed.

        ``force`` replaces buffers by given values right after they are computed, so
        every later instruction reads those (the agreement check feeds each layer the
        reference's codes, so one tie cannot spread into every later layer).
        """
        force = force or {}
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
            if ins.dst in force:
                env[ins.dst] = np.asarray(force[ins.dst]).astype(out.dtype, copy=False).reshape(out.shape)
            for s in ins.srcs:
                if last.get(s) == i and s not in pinned:
                    del env[s]  # its last reader ran: free it
        return env[p.outputs[0]], kept

    # ------------------------------------------------------------------ checks

    def check(self, ins: Instr, y: np.ndarray, bits: int | None = None) -> None:
        bits = bits or ISA[ins.op].acc_bits
        lim = 2 ** (bits - 1)
        if ins.attrs.get("acc_bound", lim) < lim:
            return  # the lowering's static bound already proves every result fits
        if y.ndim >= 2:
            hi, lo = y.max(axis=(0, *range(2, y.ndim))), y.min(axis=(0, *range(2, y.ndim)))
            mags = np.maximum(np.abs(hi), np.abs(lo))
        else:
            mags = np.abs(y)
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
        """Adder layers: per output channel, the sum of absolute differences on its scale group's codes.

        As matmuls (exact, see :func:`sad_as_matmuls`) when the weights take few distinct
        positive values, else directly (one broadcast per output channel).
        """
        a = ins.attrs
        w, group = self.c(ins.consts[0]), self.c(ins.consts[1])
        xs = [env[buf] for buf in ins.srcs]
        if len(np.unique(w[w > 0])) <= SAD_MATMUL_LEVELS and all(x.min(initial=0) >= 0 for x in xs):
            y = sad_as_matmuls(xs, w, group, a)
        else:
            y = sad_direct(xs, w, group, a)
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
        # the int64 sum must not wrap: check the worst case before computing it, statically when
        # the lowering's bound on the inputs already proves it (no pass over the data), else on this batch
        static_worst = 2 ** (a["in_bits"] + a["mult_bits"]) + _absmax(b)
        worst = static_worst if static_worst < F64_EXACT else sum(_absmax(x) * _absmax(m) for x, m in zip(xs, ms)) + _absmax(b)
        wide = a.get("wide", False)
        if worst >= 2**63 and not wide:
            raise AccumulatorOverflow(Overflow(ins.layer, ins.op, -1, worst, 64).message())
        return apply(xs, ms, sh, b, lo, hi, wide=wide and worst >= 2**63, exact_f64=worst < F64_EXACT)

    def op_maxpool(self, ins: Instr, env) -> np.ndarray:
        return window_reduce(env[ins.srcs[0]], ins.attrs, "max", ins.attrs["pad_value"])

    def op_sumpool(self, ins: Instr, env) -> np.ndarray:
        x = env[ins.srcs[0]].astype(np.int64, copy=False)
        if "windows" in ins.attrs:
            y = adaptive_sum(x, ins.attrs["windows"])
        else:
            y = window_reduce(x, ins.attrs, "sum", 0)
        self.check(ins, y)
        return y

    def op_relu(self, ins: Instr, env) -> np.ndarray:
        return np.maximum(env[ins.srcs[0]], 0)

    def op_concat(self, ins: Instr, env) -> np.ndarray:
        return np.concatenate([env[s] for s in ins.srcs], axis=ins.attrs["axis"])

    def op_permute(self, ins: Instr, env) -> np.ndarray:
        return env[ins.srcs[0]].transpose(0, *ins.attrs["perm"])

    def op_index(self, ins: Instr, env) -> np.ndarray:
        return env[ins.srcs[0]][index_tuple(ins.attrs["index"])]

    def op_reshape(self, ins: Instr, env) -> np.ndarray:
        x = env[ins.srcs[0]]
        return x.reshape(x.shape[0], *ins.attrs["shape"])


__all__ = ["AccumulatorOverflow", "Interpreter", "Overflow", "adaptive_sum", "adaptive_windows", "index_tuple",
           "patches", "window_reduce"]
