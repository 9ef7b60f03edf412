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

import numpy as np

from ..numerics import fixed_point_multiplier, round_half_even, shift_round_half_even


def multipliers(reals: list[np.ndarray], offset: np.ndarray, bits: int = 31) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(m_t, sh, b)``, int64 arrays of the broadcast shape of ``reals`` and ``offset``."""
    shape = np.broadcast_shapes(*(np.shape(r) for r in reals), np.shape(offset))
    rs = [np.broadcast_to(np.asarray(r, dtype=np.float64), shape).reshape(-1) for r in reals]
    off = np.broadcast_to(np.asarray(offset, dtype=np.float64), shape).reshape(-1)
    ms = [np.zeros(off.size, dtype=np.int64) for _ in rs]
    sh = np.zeros(off.size, dtype=np.int64)
    b = np.zeros(off.size, dtype=np.int64)
    for i in range(off.size):
        lead = max((float(r[i]) for r in rs), key=abs)
        _, shift = fixed_point_multiplier(lead, bits)
        if shift < 0:
            raise ValueError(f"requantization multiplier {lead} is too large for {bits}-bit fixed point")
        sh[i] = shift
        for t, r in enumerate(rs):
            m, s = fixed_point_multiplier(float(r[i]), bits)
            # a smaller multiplier has a larger shift: round it down to the common shift
            ms[t][i] = 0 if m == 0 else (shift_round_half_even(m, s - shift) if s >= shift else m << (shift - s))
        b[i] = int(round_half_even(np.float64(off[i]) * 2.0**shift))  # exact power-of-two scaling, then half-even
    return [m.reshape(shape) for m in ms], sh.reshape(shape), b.reshape(shape)


def apply(xs: list[np.ndarray], ms: list[np.ndarray], sh: np.ndarray, b: np.ndarray, lo, hi, wide: bool = False) -> np.ndarray:
    """``clamp(shift_round_half_even(sum_t x_t * m_t + b, sh), lo, hi)``, one shift per element.

    int64 arithmetic, or with ``wide`` exact Python integers (a 48-bit POST accumulator
    times a 31-bit multiplier needs ~80 bits; slower, and only where the bound needs it).
    """
    kind = object if wide else np.int64
    total = np.asarray(b, dtype=np.int64).astype(kind)
    for x, m in zip(xs, ms):
        total = total + x.astype(kind) * np.asarray(m).astype(kind)
    shifts = np.broadcast_to(sh, total.shape)
    out = np.empty(total.shape, dtype=kind)
    for s in np.unique(sh):
        mask = shifts == s
        out[mask] = shift_round_half_even(total[mask], int(s))
    return np.clip(out, lo, hi).astype(np.int64)


__all__ = ["apply", "multipliers"]
