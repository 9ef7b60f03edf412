"""The NumPy interpreter of integer programs: exact integer semantics, fast.

:class:`Interpreter` dispatches each instruction to ``op_<name>`` over a dict of
named buffers, frees a buffer after its last reader, and checks every integer
result against the instruction's declared ``acc_bits`` (:mod:`.isa`): an overflow
raises :class:`AccumulatorOverflow` naming the layer and the channel, or is
recorded in ``overflows`` with ``on_overflow="record"``.

Pure Python + NumPy (no torch): NumPy's integer matmul does not use BLAS and is ~100x
slower than float, so a ``mac`` whose worst case ``max|x| * max|w| * K`` stays below
``2^24`` (``2^53``) runs as a float32 (float64) BLAS matmul, exact there (the lowering
records ``exact_f32`` / ``exact_f64``); the others run in int64. Convolutions are one
im2col matmul per chunk of images, channels-first (:func:`conv_cf`); buffers stay
logically ``(N, C, *S)`` but are laid out channels-first in memory, which NumPy's
elementwise ops preserve, so no instruction transposes between layers.
``requant`` runs exactly in float64, or in float32 where the lowering proved float32
exact on every input its bounds allow (:mod:`.fixedpoint`), and ``sad`` as convolutions
(:func:`sad_as_matmuls`). docs/runtime.md, *Speed*, has the numbers.

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

import threading
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import QCompileError
from ..numerics import quantize_codes
from .fixedpoint import apply, apply_f32, multipliers
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


def take_index(x: np.ndarray, index: list, batched: bool = True, zeros: bool = True) -> np.ndarray:
    """``x[:, *index]``, an ``index`` instruction: per non-batch axis a slice ``[start, stop, step]``,
    an integer (which drops the axis) or ``{"positions": [...]}``, a gather along the axis (a
    nearest-neighbour upsampling, a padding), where position ``-1`` is a zero (zero padding).
    ``batched=False``: ``x`` has no batch axis (per-sample constants). ``zeros=False``: a ``-1``
    copies position 0 instead (a lowering's per-position scales, which a zero code makes moot).

    >>> take_index(np.arange(12).reshape(1, 3, 4), [[0, 3, 2], {"positions": [0, 0, 3]}]).tolist()
    [[[0, 0, 3], [8, 8, 11]]]
    >>> take_index(np.arange(1, 4).reshape(1, 3), [{"positions": [-1, 0, 1, 2, -1]}]).tolist()
    [[0, 1, 2, 3, 0]]
    """
    basic = tuple(slice(*i) if isinstance(i, list) else slice(None) if isinstance(i, dict) else i for i in index)
    y = x[(slice(None), *basic) if batched else basic]
    axis = 1 if batched else 0
    for i in index:  # gathers one axis at a time (NumPy would broadcast several index arrays together)
        if isinstance(i, dict):
            positions = np.asarray(i["positions"], dtype=np.int64)
            y = np.take(y, np.maximum(positions, 0), axis=axis)
            if zeros and (positions < 0).any():
                y[(slice(None),) * axis + (positions < 0,)] = 0
        if not isinstance(i, int):
            axis += 1
    return y


def host_activation(x: np.ndarray, function: str, axis: int | None = None) -> np.ndarray:
    """The ``activation`` instruction: ``function`` of the float64 output ``x`` (``axis``: softmax's).

    >>> host_activation(np.array([[0.0, np.log(3.0)]]), "softmax", 1).round(6).tolist()
    [[0.25, 0.75]]
    """
    if function in ("softmax", "log_softmax"):
        shifted = x - x.max(axis=axis, keepdims=True)  # exp cannot overflow
        log_sum = np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return np.exp(shifted - log_sum) if function == "softmax" else shifted - log_sum
    if function == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
    if function == "tanh":
        return np.tanh(x)
    raise ValueError(f"unknown host activation {function!r}")


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


def out_shape(spatial, kernel, a: dict) -> list[int]:
    """A convolution's output size per spatial axis."""
    pads, stride, dil = a["padding"], a["stride"], a["dilation"]
    return [(s + pads[2 * i] + pads[2 * i + 1] - dl * (k - 1) - 1) // st + 1
            for i, (s, k, st, dl) in enumerate(zip(spatial, kernel, stride, dil))]


def im2col(xc: np.ndarray, kernel: tuple[int, ...], a: dict, out: np.ndarray) -> np.ndarray:
    """The windows of channels-first ``xc`` ``(C, N, *S)`` as a ``(C * prod(kernel), N * prod(out))`` matrix.

    Row ``c * prod(kernel) + k`` holds input channel ``c`` at kernel offset ``k`` for every
    output position, zero-padded, written into ``out`` (flat, at least that large, in the
    matmul's dtype): one block copy per offset whose rows are whole output lines, which
    channels-first keeps contiguous (channels-last would copy ``C`` values at a time).
    """
    pads, stride, dil = a["padding"], a["stride"], a["dilation"]
    c, n, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    size = out_shape(spatial, kernel, a)
    taps = _phase_taps(spatial, kernel, a, size)
    if taps is not None:
        return _im2col_shifted(xc, kernel, stride, taps, size, out)
    if any(pads):
        padded = np.zeros((c, n, *(s + pads[2 * i] + pads[2 * i + 1] for i, s in enumerate(spatial))), dtype=out.dtype)
        padded[(slice(None), slice(None), *(slice(pads[2 * i], pads[2 * i] + s) for i, s in enumerate(spatial)))] = xc
    else:
        padded = xc
    cols = out[:c * int(np.prod(kernel)) * n * int(np.prod(size))].reshape(c, *kernel, n, *size)
    for off in np.ndindex(*kernel):
        window = tuple(slice(k * dl, k * dl + (m - 1) * st + 1, st) for k, dl, m, st in zip(off, dil, size, stride))
        cols[(slice(None), *off)] = padded[(slice(None), slice(None), *window)]
    return cols.reshape(c * int(np.prod(kernel)), -1)


def _phase_taps(spatial, kernel, a: dict, size: list[int]) -> list[list[tuple[int, int]]] | None:
    """Per axis and kernel tap, ``(phase, shift)``: the tap reads input index ``stride * (i + shift) + phase``
    for output index ``i``; None unless every phase image fits the output grid.

    The phase image ``x[phase::stride]`` (along each axis) then holds at most ``size``
    entries, so laid out on the output's grid (zeros after its end) every tap is a fixed
    flat shift of one phase image: the contiguous copies of :func:`_im2col_shifted`.
    Stride 1 has one phase, the input itself; stride 2 with "same" padding has four.
    """
    taps = []
    for i, (s, k, st, dl, m) in enumerate(zip(spatial, kernel, a["stride"], a["dilation"], size)):
        axis = [tuple(reversed(divmod(t * dl - a["padding"][2 * i], st))) for t in range(k)]
        if any(-(-(s - phase) // st) > m for phase, _ in axis):
            return None
        taps.append(axis)
    return taps


def _phase_image(xc: np.ndarray, phase: tuple[int, ...], stride, size: list[int], dtype) -> np.ndarray:
    """``xc[:, :, phase::stride]`` on the output grid ``(C, N, *size)``: zeros after its end."""
    src = xc[(slice(None), slice(None), *(slice(p, None, st) for p, st in zip(phase, stride)))]
    if list(src.shape[2:]) == list(size):
        return src  # the copies into im2col's rows convert the dtype
    img = np.zeros((*xc.shape[:2], *size), dtype=dtype)
    img[(slice(None), slice(None), *(slice(0, m) for m in src.shape[2:]))] = src
    return img


def _im2col_shifted(xc: np.ndarray, kernel: tuple[int, ...], stride, taps, size: list[int], out: np.ndarray) -> np.ndarray:
    """:func:`im2col` when every phase image fits the output grid (:func:`_phase_taps`).

    Then every kernel offset reads its phase image at one fixed shift ``delta`` of the
    flat ``(N, *size)`` index: each offset is one contiguous copy of ``C`` rows, shifted,
    after which the positions whose neighbour lies outside the image (the padding, and
    the rows that wrapped into the next line or image) are zeroed, a thin border per axis.
    A strided convolution first splits the input into its phase images (strided copies
    of the input, once), so its windows too are long contiguous copies rather than one
    short strided copy per output line.
    """
    c, n = xc.shape[:2]
    images: dict[tuple[int, ...], np.ndarray] = {}
    strides = np.cumprod((1, *size[::-1]))[::-1][1:]  # flat distance of one step along each output axis
    total = n * int(np.prod(size))
    cols = out[:c * int(np.prod(kernel)) * total].reshape(c, -1, total)
    for k, off in enumerate(np.ndindex(*kernel)):
        phase = tuple(taps[i][o][0] for i, o in enumerate(off))
        if phase not in images:
            images[phase] = _phase_image(xc, phase, stride, size, out.dtype).reshape(c, -1)
        flat = images[phase]
        delta = int(np.dot([taps[i][o][1] for i, o in enumerate(off)], strides))
        lo, hi = max(0, -delta), min(total, total - delta)
        cols[:, k, lo:hi] = flat[:, lo + delta:hi + delta]
    # positions whose neighbour along an axis is padding (this also covers the ends of the
    # flat copies, which wrap into the next line or image): one border per axis and kernel
    # index, zeroed for all the offsets sharing it at once
    grid = cols.reshape(c, *kernel, -1, *size)
    for axis, (m, axis_taps) in enumerate(zip(size, taps)):
        for o, (_, sh) in enumerate(axis_taps):
            if sh:
                border = slice(max(0, m - sh), None) if sh > 0 else slice(None, min(m, -sh))
                index = [slice(None)] * grid.ndim
                index[1 + axis], index[2 + len(kernel) + axis] = o, border
                grid[tuple(index)] = 0
    return cols.reshape(-1, total)


def _scratch(work: dict, size: int, dtype, role: str = "im2col") -> np.ndarray:
    """A flat buffer of at least ``size`` elements: one per role and dtype in ``work``, the largest asked for."""
    key = (role, np.dtype(dtype).str)
    buf = work.get(key)
    if buf is None or buf.size < size:
        buf = work[key] = np.empty(size, dtype=dtype)
    return buf


COLS_CHUNK = 1 << 20  # im2col entries per batch chunk: 4 MB of float32, still in cache when the matmul reads it


def _chunk(n: int, per_image: int) -> int:
    """Images per chunk of a batch of ``n`` whose im2col takes ``per_image`` entries each: at most
    :data:`COLS_CHUNK` entries, and equal chunks (a small last one runs the matmul at a poor shape)."""
    step = max(1, min(n, COLS_CHUNK // per_image))
    return -(-n // -(-n // step))


def conv_cf(xc: np.ndarray, w: np.ndarray, a: dict, dtype, work: dict | None = None) -> np.ndarray:
    """Exact convolution of channels-first codes ``xc`` ``(C, N, *S)``: ``(O, N, *out)`` in ``dtype``.

    Per chunk of images one matmul (per group): ``W (O/g, C/g * K) @ im2col (C/g * K, n * out)``.
    This orientation gives BLAS the long output axis as its ``M`` dimension, which OpenBLAS
    runs ~1.3x faster than the channels-last ``(n * out, K) @ (K, O)`` at ResNet widths,
    and the result is already channels-first for the next instruction. The chunks keep
    the im2col matrix in cache; its buffer comes from ``work`` (reused across calls: a
    fresh one this large costs page faults every time).
    """
    o, kernel, groups = w.shape[0], w.shape[2:], a["groups"]
    c, n, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    size = out_shape(spatial, kernel, a)
    if groups == 1 and kernel[0] > 1 and all(s == 1 for s in a["stride"]) and size == list(spatial):
        return _conv_rows_stacked(xc, w, a, dtype, work)
    rows, positions = c * int(np.prod(kernel)), int(np.prod(size))
    wm = w.reshape(groups, o // groups, -1).astype(dtype)
    y = np.empty((o, n, *size), dtype=dtype)
    step = _chunk(n, rows * positions)
    plain = all(k == 1 for k in kernel) and all(s == 1 for s in a["stride"]) and not any(a["padding"])
    if not plain:  # a 1x1, stride-1, unpadded kernel reads xc itself
        buf = _scratch({} if work is None else work, rows * step * positions, dtype)
    for n0 in range(0, n, step):
        chunk = xc[:, n0:n0 + step]
        cols = chunk.reshape(c, -1).astype(dtype, copy=False) if plain else im2col(chunk, kernel, a, buf)
        # each output row's chunk is contiguous: the matmul writes into y directly
        np.matmul(wm, cols.reshape(groups, rows // groups, -1), out=y[:, n0:n0 + step].reshape(groups, o // groups, -1))
    return y


def _conv_rows_stacked(xc: np.ndarray, w: np.ndarray, a: dict, dtype, work: dict | None) -> np.ndarray:
    """:func:`conv_cf` of an ungrouped stride-1 convolution that keeps the input's size.

    The offsets along the first spatial axis are stacked into the matmul's rows instead
    of its columns: ``Z[k] = W[:, :, k] @ im2col_rest`` for every offset ``k`` at once,
    with im2col over the other axes only, then ``y = sum_k Z[k]`` shifted by ``k``'s
    offset along that axis. Same products, exact sums (integers, added in a fixed
    order), but a third of the im2col copies for a 3x3 kernel (docs/runtime.md, *Speed*).
    """
    o, kernel = w.shape[0], w.shape[2:]
    c, n, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    k0, rest = kernel[0], tuple(kernel[1:])
    pads, dil0 = list(a["padding"]), a["dilation"][0]
    rows, positions = c * int(np.prod(rest)), int(np.prod(spatial))
    # (k0 * O, C * prod(rest)): row k * O + o holds W[o, :, k] in im2col's (c, rest) order
    wm = np.moveaxis(w, 2, 0).reshape(k0 * o, rows).astype(dtype)
    inner = dict(a, padding=[0, 0, *pads[2:]])  # im2col over the other axes: the first has kernel 1
    y = np.empty((o, n, *spatial), dtype=dtype)
    step = _chunk(n, rows * positions)
    work = {} if work is None else work
    buf = _scratch(work, rows * step * positions, dtype)
    stacked = _scratch(work, k0 * o * step * positions, dtype, "stacked")
    size0 = spatial[0]
    shifts = [k * dil0 - pads[0] for k in range(k0)]
    first = shifts.index(0) if 0 in shifts else None
    for n0 in range(0, n, step):
        chunk = xc[:, n0:n0 + step]
        m = chunk.shape[1]
        cols = im2col(chunk, (1, *rest), inner, buf) if rest else chunk.reshape(c, -1).astype(dtype, copy=False)
        z = stacked[:k0 * o * m * positions].reshape(k0 * o, m * positions)
        np.matmul(wm, cols, out=z)
        z = z.reshape(k0, o, m, *spatial)
        out = y[:, n0:n0 + m]
        if first is None:
            out[...] = 0
        else:
            np.copyto(out, z[first])
        for k, sh in enumerate(shifts):
            if k == first or abs(sh) >= size0:
                continue
            lo, hi = max(0, -sh), min(size0, size0 - sh)  # output rows whose neighbour lies inside the image
            out[:, :, lo:hi] += z[k, :, :, lo + sh:hi + sh]
    return y


def conv(x: np.ndarray, w: np.ndarray, a: dict, dtype=None, work: dict | None = None) -> np.ndarray:
    """Exact convolution / linear map of integer codes ``x`` ``(N, C, *S)`` with integer weights ``w``.

    The result holds exact integers in ``dtype`` (default: the narrowest exact one the
    lowering recorded, ``exact_f32`` / ``exact_f64``; else int64, NumPy's slow non-BLAS
    matmul). Convolutions run channels-first (:func:`conv_cf`) and return the logical
    ``(N, O, *out)`` as a view of the channels-first result: NumPy's elementwise ops keep
    an operand's memory order, so the requantization after it writes channels-first too
    and the next convolution reads it without a transpose.
    """
    dtype = dtype or _dtype(a)
    if a["kind"] == "linear":
        return x.astype(dtype, copy=False) @ w.T.astype(dtype)
    return np.moveaxis(conv_cf(np.moveaxis(x, 1, 0), w, a, dtype, work), 0, 1)


SAD_MATMUL_LEVELS = 32  # beyond this many distinct weight values the direct SAD is faster


def sad_as_matmuls(xs: list[np.ndarray], w: np.ndarray, group: np.ndarray, a: dict, work: dict | None = None) -> np.ndarray:
    """``sum_k |x_k - w_k|`` over each window, as one exact convolution per scale group.

    ``|x - w| = x + w - 2 min(x, w)``. With ``0 = v_0 < v_1 < ... < v_L`` the distinct
    positive weights and ``x >= 0`` (unsigned codes), ``min(x, w) = min(w, 0) + sum_i
    [w >= v_i] clip(x - v_(i-1), 0, v_i - v_(i-1))``, so per output channel
    ``sum_k |x_k - w_k| = sum_k |w_k| + conv([x; D(x)], [1; -2 J])`` with ``D`` the ``L``
    clipped slices of ``x`` stacked after ``x`` as channels and ``J`` the 0/1 indicators
    ``[w >= v_i]``. Every partial sum stays below ``K (3 max x + max |w|)``, so float32 is
    exact at 4 to 8 bits. Padding is zero codes; ``D(0) = 0``, as needed.
    """
    o, cg = w.shape[:2]
    groups, spatial = a["groups"], w.ndim - 2
    levels = np.unique(w[w > 0]).astype(np.int64)
    prev = np.concatenate([[0], levels[:-1]])
    k = int(np.prod(w.shape[1:]))
    a_max = max(_absmax(x) for x in xs)
    dtype = exact_dtype(k * (3 * a_max + _absmax(w)) + 1)
    # weights over the stacked channels (c, [x, D_1..D_L]): 1 for x, -2 [w >= v_i] for D_i
    stacked = np.concatenate([np.ones_like(w[:, :, None]), -2 * (w[:, :, None] >= levels.reshape(1, 1, -1, *([1] * spatial)))], axis=2)
    stacked = stacked.reshape(o, cg * (len(levels) + 1), *w.shape[2:])
    wabs = np.abs(w).reshape(o, -1).sum(1).astype(dtype).reshape(o, *([1] * (spatial + 1)))
    lv = (1, -1) + (1,) * (spatial + 1)
    y = None
    for g, x in enumerate(xs):
        sel = np.flatnonzero(group == g)
        if sel.size == 0:
            continue
        xc = np.moveaxis(x, 1, 0).astype(dtype, copy=False)  # (C, N, *S)
        d = np.empty((xc.shape[0], len(levels) + 1, *xc.shape[1:]), dtype=dtype)
        d[:, 0] = xc
        np.clip(xc[:, None] - prev.reshape(lv).astype(dtype), 0, (levels - prev).reshape(lv).astype(dtype), out=d[:, 1:])
        d = d.reshape(-1, *xc.shape[1:])
        part = conv_cf(d, stacked if groups > 1 else stacked[sel], a, dtype, work)
        part = (part[sel] if groups > 1 else part) + wabs[sel]
        if y is None:
            y = np.empty((o, *part.shape[1:]), dtype=dtype)
        y[sel] = part
    return np.moveaxis(y, 0, 1)


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


_WORK = threading.local()


def _thread_work() -> dict:
    """This thread's scratch buffers, kept across runs: a program run per batch would
    otherwise fault in a fresh multi-megabyte im2col buffer every time. Per thread,
    so two threads running programs never share one."""
    if not hasattr(_WORK, "buffers"):
        _WORK.buffers = {}
    return _WORK.buffers


def _per_sample(f: np.ndarray, ndim: int) -> np.ndarray:
    return f.reshape(-1, *([1] * (ndim - 1)))


@dataclass
class Interpreter:
    """Runs a :class:`Program` on NumPy arrays."""

    program: Program
    on_overflow: str = "raise"  # "raise" | "record"
    overflows: list[Overflow] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every buffer's per-sample shape, as run
    work: dict | None = field(default=None, repr=False)  # scratch buffers (see conv_cf); None: the running thread's

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

    def scratch(self) -> dict:
        return self.work if self.work is not None else _thread_work()

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

    def op_activation(self, ins: Instr, env) -> np.ndarray:
        return host_activation(env[ins.srcs[0]], ins.attrs["function"], ins.attrs.get("axis"))

    # ------------------------------------------------------------------ integer units

    def op_mac(self, ins: Instr, env) -> np.ndarray:
        y = conv(env[ins.srcs[0]], self.c(ins.consts[0]), ins.attrs, work=self.scratch())
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
        y = conv(env[ins.srcs[0]], sign * (unit << shift), a, work=self.scratch())
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
            y = sad_as_matmuls(xs, w, group, a, self.scratch())
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
            if a.get("f32") and all(x.dtype == np.float32 for x in xs):
                # the lowering proved float32 exact on every input the bounds allow (fixedpoint.f32_constants)
                return apply_f32(xs, [self.c(n) for n in names[2 * k + 6:3 * k + 6]], self.c(names[3 * k + 6]), lo, hi)
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

    def op_mul(self, ins: Instr, env) -> np.ndarray:
        a, b = (env[s].astype(np.int64, copy=False) for s in ins.srcs)
        y = a * b
        self.check(ins, y)
        return y

    def op_lookup(self, ins: Instr, env) -> np.ndarray:
        codes = env[ins.srcs[0]].astype(np.int64, copy=False)  # a float32 requant holds integers too
        return self.c(ins.consts[0])[codes - ins.attrs["qmin"]]

    def op_concat(self, ins: Instr, env) -> np.ndarray:
        return np.concatenate([env[s] for s in ins.srcs], axis=ins.attrs["axis"])

    def op_permute(self, ins: Instr, env) -> np.ndarray:
        return env[ins.srcs[0]].transpose(0, *ins.attrs["perm"])

    def op_index(self, ins: Instr, env) -> np.ndarray:
        return take_index(env[ins.srcs[0]], ins.attrs["index"])

    def op_reshape(self, ins: Instr, env) -> np.ndarray:
        x = env[ins.srcs[0]]
        return x.reshape(x.shape[0], *ins.attrs["shape"])


__all__ = ["AccumulatorOverflow", "Interpreter", "Overflow", "adaptive_sum", "adaptive_windows",
           "host_activation", "patches", "take_index", "window_reduce"]
