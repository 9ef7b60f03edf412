"""Requantization in fixed point: the ``requant`` instruction's constants and its arithmetic.

``y = sum_t x_t * M_t + B`` with real per-channel (or per-sample) multipliers ``M_t``
becomes ``shift_round_half_even(sum_t x_t * m_t + b, sh)`` with integers ``m_t``
sharing one shift ``sh`` per element. ``sh`` is the shift of the largest ``|M_t|``
from :func:`numerics.fixed_point_multiplier` (so that term keeps its full ``bits``
of precision); the other terms' multipliers are rounded to the same shift, which
keeps the absolute error at half a unit of ``2^-sh``. The lowering calls
:func:`multipliers` once for static steps; the interpreter calls it per sample
under ASQ, so both run the same arithmetic. The integer numerics themselves are
:mod:`qcompiler.numerics`'; nothing here rounds differently.

Example:
    >>> m, sh, b = multipliers([np.array([0.5]), np.array([0.25])], np.array([1.0]))
    >>> apply([np.array([[3]]), np.array([[1]])], m, sh, b, -8, 7)  # 1.5 + 0.25 + 1 = 2.75
    array([[3]])
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..numerics import fixed_point_multipliers, round_half_even, shift_round_half_even


def multipliers(reals: list[np.ndarray], offset: np.ndarray, bits: int = 31) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(m_t, sh, b)``, int64 arrays of the broadcast shape of ``reals`` and ``offset``.

    Vectorized (ASQ forms them per sample and channel at run time).
    """
    shape = np.broadcast_shapes(*(np.shape(r) for r in reals), np.shape(offset))
    rs = np.stack([np.broadcast_to(np.asarray(r, dtype=np.float64), shape).reshape(-1) for r in reals])
    off = np.broadcast_to(np.asarray(offset, dtype=np.float64), shape).reshape(-1)
    lead = np.take_along_axis(rs, np.argmax(np.abs(rs), axis=0)[None], axis=0)[0]
    _, sh = fixed_point_multipliers(lead, bits)
    if np.any(sh < 0):
        bad = float(lead[np.argmin(sh)])
        raise ValueError(f"requantization multiplier {bad} is too large for {bits}-bit fixed point")
    ms = []
    for r in rs:
        m, s = fixed_point_multipliers(r, bits)
        # a smaller multiplier has a larger shift: round it down to the common shift
        # (|m| < 2^bits: beyond bits + 1 places it rounds to 0, and int64 shifts past 63 would wrap)
        down = shift_round_half_even(m, np.clip(s - sh, 0, bits + 1))
        ms.append(np.where(m == 0, 0, np.where(s >= sh, down, m << np.maximum(sh - s, 0))).reshape(shape))
    b = round_half_even(np.ldexp(off, sh))  # exact power-of-two scaling, then half-even
    # a POST accumulator's tiny scale makes sh large: b can pass int64, but it is still an exact
    # float64 integer (a 53-bit mantissa scaled by 2^sh), which the wide path reads exactly
    b = b.astype(np.int64) if np.all(np.abs(b) < 2.0**62) else b
    return ms, sh.reshape(shape), b.reshape(shape)


def apply(xs: list[np.ndarray], ms: list[np.ndarray], sh: np.ndarray, b: np.ndarray, lo, hi, wide: bool = False,
          exact_f64: bool = False) -> np.ndarray:
    """``clamp(shift_round_half_even(sum_t x_t * m_t + b, sh), lo, hi)``, one shift per element.

    int64 arithmetic; with ``wide`` exact Python integers (a 48-bit POST accumulator
    times a 31-bit multiplier needs ~80 bits; slower, and only where the bound needs
    it); with ``exact_f64`` (the caller checked ``sum_t max|x_t| max|m_t| + max|b| < 2^53``)
    float64, where every product and partial sum is the same exact integer, scaling by
    ``2^-sh`` is exact, and ``round_half_even`` of that exact quotient is
    ``shift_round_half_even``: the same result, ~5x faster.
    """
    if exact_f64:
        return _apply_f64(xs, ms, sh, b, lo, hi)
    kind = object if wide else np.int64
    b = np.asarray(b)
    total = np.frompyfunc(int, 1, 1)(b) if wide else b.astype(np.int64)  # int(float) is exact
    for x, m in zip(xs, ms):
        total = total + x.astype(np.int64).astype(kind) * np.asarray(m).astype(kind)  # floats holding integers too
    if not wide:
        return np.clip(shift_round_half_even(total, np.asarray(sh, dtype=np.int64)), lo, hi).astype(np.int64)
    shifts = np.broadcast_to(sh, total.shape)
    out = np.empty(total.shape, dtype=kind)
    for s in np.unique(sh):
        mask = shifts == s
        out[mask] = shift_round_half_even(total[mask], int(s))
    return np.clip(out, lo, hi).astype(np.int64)


F32_PROOF_LIMIT = 1 << 22  # inputs enumerated per requant: beyond this the proof costs more than it saves


def f32_constants(ms: list[np.ndarray], sh: np.ndarray, b: np.ndarray, lo, hi, bounds: list[np.ndarray],
                  floors: list[int | None] | None = None) -> tuple[list[np.ndarray], np.ndarray] | None:
    """float32 multipliers and bias under which :func:`apply_f32` equals :func:`apply`, or None.

    float32 arithmetic is not exact here (``x m`` needs ``in_bits + 31`` bits), but a
    static requant has few possible inputs: every integer ``|x_t| <= bounds[t]`` (the
    lowering's proven bounds; ``x_t >= floors[t]`` where given, as for unsigned codes),
    per channel. When those are few enough, all of them are run through both functions;
    if every code agrees, the float32 evaluation *is* the requant for every input the
    program can produce, and the interpreter may use it (half the memory traffic of
    float64). Where the nearest float32 constants let one input round the other way, the
    float32 neighbours a few ulps off are tried, per channel. IEEE float32 multiply, add
    and ``rint`` are correctly rounded everywhere, so the proof holds on any machine.

    A one-term requant with more inputs than :data:`F32_PROOF_LIMIT` (a first layer's
    18-bit accumulator) is proven on far fewer: both evaluations are monotone in ``x``
    (correctly rounded operations are), so where they agree at the two ends of the input
    range and on both sides of every point where the exact one changes code, they agree
    on every input in between (:func:`_transition_inputs`).

    >>> m, sh, b = multipliers([np.array([0.0571])], np.array([0.3]))
    >>> f32_constants(m, sh, b, 0, 15, [np.array(255.0)]) is not None
    True
    """
    sh = np.asarray(sh, dtype=np.int64)
    shape = np.broadcast_shapes(*(np.shape(m) for m in ms), sh.shape, np.shape(b), np.shape(lo), np.shape(hi))
    reach = [int(np.max(bd)) for bd in bounds]
    lows = [-r if f is None else max(-r, int(f)) for r, f in zip(reach, floors or [None] * len(reach))]
    positions = math.prod(shape) if shape else 1
    k = len(ms)
    enumerable = positions * math.prod(r - low + 1 for r, low in zip(reach, lows)) <= F32_PROOF_LIMIT
    codes = int(np.max(hi)) - int(np.min(lo)) + 1
    by_transitions = k == 1 and positions * codes * 5 <= F32_PROOF_LIMIT
    if not (enumerable or by_transitions) or max(reach) >= 2**24 or max(abs(int(np.min(lo))), abs(int(np.max(hi)))) >= 2**24:
        return None
    # one axis of constants (every channel), then one axis per term holding every value it can take
    consts = [np.broadcast_to(np.asarray(v), shape).reshape(-1, *([1] * k)) for v in (*ms, sh, b, lo, hi)]
    cms, csh, cb, clo, chi = consts[:k], consts[k], consts[k + 1], consts[k + 2], consts[k + 3]
    if enumerable:
        xs = [np.arange(low, r + 1, dtype=np.float32).reshape(1, *[-1 if u == t else 1 for u in range(k)])
              for t, (low, r) in enumerate(zip(lows, reach))]
    else:
        xs = [_transition_inputs(cms[0], csh, cb, clo, chi, lows[0], reach[0])]
    worst = sum(r * int(np.max(np.abs(m))) for r, m in zip(reach, ms)) + int(np.max(np.abs(b)))
    if worst >= 2**63:
        return None
    exact = apply(xs, cms, csh, cb, clo, chi, exact_f64=worst < 2**53)
    # the nearest float32 constants, or where some input rounds the other way, a neighbour a few
    # ulps off (the float32 constants are free: only the proof below binds them), per channel
    nearest = [np.ldexp(np.asarray(v, dtype=np.float64), -sh).astype(np.float32) for v in (*ms, b)]
    nearest = [np.broadcast_to(v, shape).reshape(-1, *([1] * k)) for v in nearest]
    chosen = [v.copy() for v in nearest]
    open_ = np.ones(positions, dtype=bool)
    steps = [0, 1, -1, 2, -2]
    for offsets in sorted(itertools.product(steps, repeat=k + 1), key=lambda o: sum(map(abs, o))):
        if offsets[-1] and not np.any(nearest[-1]):
            continue  # a zero bias stays zero (apply_f32 then skips the pass)
        trial = [_ulps(v, o) for v, o in zip(nearest, offsets)]
        fast = apply_f32(xs, trial[:k], trial[k], clo, chi)
        agree = np.all((fast == exact).reshape(positions, -1), axis=1) & open_
        for c, t in zip(chosen, trial):
            c[agree] = t[agree]
        open_ &= ~agree
        if not open_.any():
            return [c.reshape(shape) for c in chosen[:k]], chosen[k].reshape(shape)
    return None


def _transition_inputs(m, sh, b, lo, hi, low: int, reach: int) -> np.ndarray:
    """Per channel (rows), the inputs that decide a monotone one-term requant, as float32 columns.

    The exact requant of ``x`` changes code only where ``(x m + b) 2^-sh`` crosses a
    half-integer ``v + 1/2`` with ``lo <= v < hi``; around each such crossing (found in
    float64, within far less than one input of the true one) the inputs ``-2..+2`` away
    are taken, with the range's two ends. Rows are padded with the low end.
    """
    m = np.ldexp(np.asarray(m, dtype=np.float64), -np.asarray(sh)).reshape(-1, 1)
    b = np.ldexp(np.asarray(b, dtype=np.float64), -np.asarray(sh)).reshape(-1, 1)
    rows = m.shape[0]
    lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float64).reshape(-1, 1), (rows, 1)) for v in (lo, hi))
    levels = np.arange(int(lo.min()), int(hi.max())) + 0.5  # every half-integer some channel's codes cross
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where((m != 0) & (levels >= lo) & (levels < hi), (levels - b) / np.where(m == 0, 1.0, m), np.nan)
    near = np.floor(cross)[..., None] + np.arange(-2, 3)  # (rows, levels, 5)
    near = np.where(np.isfinite(near) & (near >= low) & (near <= reach), near, low).reshape(rows, -1)
    return np.concatenate([near, np.full((rows, 1), low), np.full((rows, 1), reach)], axis=1).astype(np.float32)


def _ulps(v: np.ndarray, n: int) -> np.ndarray:
    """``v`` moved ``n`` float32 ulps (towards +inf for ``n > 0``)."""
    for _ in range(abs(n)):
        v = np.nextafter(v, np.float32(np.inf if n > 0 else -np.inf))
    return v


def apply_f32(xs, m32: list[np.ndarray], b32: np.ndarray, lo, hi) -> np.ndarray:
    """``clamp(rint(sum_t x_t m_t + b), lo, hi)`` in float32, terms summed in order, codes as float32.

    Equal to :func:`apply` only where :func:`f32_constants` proved it.
    """
    return _affine_round(xs, m32, b32, lo, hi, np.float32, np.float32)


def _apply_f64(xs, ms, sh, b, lo, hi) -> np.ndarray:
    """:func:`apply` in float64: codes as exact floats.

    ``m_t 2^-sh`` and ``b 2^-sh`` are exact (a power-of-two scaling), so ``x_t m_t 2^-sh``
    and the sum are the exact ``(sum_t x_t m_t + b) 2^-sh`` below ``2^53``; rounding that
    half to even is ``shift_round_half_even``. The codes come back as float32 when they
    fit its ``2^24`` exactly (the next ``mac`` reads float32), else float64.
    """
    sh = np.asarray(sh, dtype=np.int64)
    scaled = [np.ldexp(np.asarray(m, dtype=np.float64), -sh) for m in ms]
    bias = np.ldexp(np.asarray(b, dtype=np.float64), -sh)
    narrow = max(int(np.max(np.abs(lo))), int(np.max(np.abs(hi)))) < 2**24
    return _affine_round(xs, scaled, bias, lo, hi, np.float64, np.float32 if narrow else np.float64)


def _bound_in(v, work) -> np.ndarray:
    """A clamp bound in the ``work`` dtype where it converts exactly (an int64 bound would make
    NumPy clip in float64), a single value where it is uniform."""
    v = np.asarray(v)
    v = v.flat[0] if v.ndim and np.all(v == v.flat[0]) else v
    as_work = np.asarray(v).astype(work)
    return as_work if np.array_equal(as_work, v) else v


def _affine_round(xs, ms, bias, lo, hi, work, out_dtype) -> np.ndarray:
    """``clamp(rint(sum_t x_t m_t + bias), lo, hi)`` computed in ``work``, returned as ``out_dtype``.

    Every pass writes in place into one buffer laid out like ``xs[0]`` (``empty_like``
    keeps the memory order), so a channels-first accumulator gives channels-first codes.
    A zero bias is skipped. One thread: the requant follows a matmul whose BLAS threads
    still spin on the other core, and a second NumPy thread there made the whole
    program slower (docs/runtime.md, *Speed*).
    """
    shape = np.broadcast_shapes(*(np.shape(x) for x in xs), *(np.shape(m) for m in ms), np.shape(bias))
    lo, hi = (_bound_in(v, work) for v in (lo, hi))
    total = np.empty_like(xs[0] if np.shape(xs[0]) == shape else np.empty(shape), dtype=work)
    np.multiply(xs[0], ms[0], out=total)
    term = None
    for x, m in zip(xs[1:], ms[1:]):
        term = np.multiply(x, m, out=term)
        total += term
    if np.any(bias):
        total += bias
    np.rint(total, out=total)  # half to even
    np.clip(total, lo, hi, out=total)  # in place: a float32 out is ~1.5x slower
    return total if out_dtype == work else total.astype(out_dtype)


__all__ = ["apply", "apply_f32", "f32_constants", "multipliers"]
