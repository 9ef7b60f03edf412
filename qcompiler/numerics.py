"""Integer numerics: the one place the arithmetic of quantized codes is written.

Everything that decides an integer code, or computes on integer codes, lives here:
the fake-quant modules (training), the passes, the reports and the integer
backends all import it, so the forms of a compiled model agree by construction.
docs/design.md §4 is the specification; conventions:

* rounding is half to even everywhere (``torch.round``, ``numpy.rint``, Python's
  ``round`` and ONNX ``Round`` agree);
* functions on arrays take a ``torch.Tensor`` or a ``numpy.ndarray`` and return
  the same kind, so a NumPy integer interpreter reuses them unchanged;
* nothing here holds state or learns: learned steps and clips stay in the
  quantizer modules and are passed in.

The power-grid projection (:func:`grid_exponents` and friends) is torch only: it is
decided from float32 bits exactly like the fused kernel, and backends read its
result as codes rather than recomputing it.

Example:
    >>> import numpy as np
    >>> quantize_codes(np.array([0.26, -1.0, 9.0]), 0.25, *int_range(4, signed=True))
    array([ 1, -4,  7])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TypeVar, Union

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)
Integers = TypeVar("Integers", int, np.ndarray, torch.Tensor)
Step = Union[float, torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------- uniform codes


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)`` of a ``bits``-bit code.

    ``narrow`` drops the most negative signed code so the range is symmetric, which
    keeps ``-w`` and ``w`` on codes of equal magnitude (adder weights need that).

    >>> int_range(4, signed=False)
    (0, 15)
    >>> int_range(4, signed=True)
    (-8, 7)
    >>> int_range(4, signed=True, narrow=True)
    (-7, 7)
    """
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def offset_range(bits: int, zero_point: int) -> tuple[int, int]:
    """The code range of a ``bits``-bit grid whose zero sits ``zero_point`` codes above its bottom.

    Hardware stores ``code + zero_point`` as an unsigned ``bits``-bit value (the
    zero point of an asymmetric activation); here the codes stay the integers
    relative to zero, so every backend reads them as it reads signed ones. 0 is the
    unsigned range, ``2^(bits-1)`` the signed one.

    >>> offset_range(8, 16), offset_range(4, 0), offset_range(4, 8) == int_range(4, signed=True)
    ((-16, 239), (0, 15), True)
    """
    if not 0 <= zero_point <= 2 ** (bits - 1):
        raise ValueError(f"zero point {zero_point} outside [0, {2 ** (bits - 1)}] for {bits}-bit codes")
    return -zero_point, 2**bits - 1 - zero_point


def round_half_even(v: Array, out: Array | None = None) -> Array:
    """Round to the nearest integer, ties to even; ``out=v`` rounds in place.

    >>> round_half_even(torch.tensor([0.5, 1.5, -2.5]))
    tensor([ 0.,  2., -2.])
    >>> round_half_even(np.array([0.5, 1.5, -2.5]))
    array([ 0.,  2., -2.])
    """
    if isinstance(v, torch.Tensor):
        return torch.round(v, out=out) if out is not None else torch.round(v)
    return np.rint(v, out=out) if out is not None else np.rint(v)


def round_clamp_(v: Array, qmin: int, qmax: int) -> Array:
    """``clamp(round_half_even(v), qmin, qmax)`` in place on a float tensor or array ``v``.

    Rounding and clamping commute because the bounds are integers, so a caller that
    has already clamped ``v`` (to see which elements were inside) only rounds it.

    >>> v = torch.tensor([-9.5, 2.5, 3.5, 40.0])
    >>> round_clamp_(v, -8, 7) is v, v
    (True, tensor([-8.,  2.,  4.,  7.]))
    """
    round_half_even(v, out=v)
    if isinstance(v, torch.Tensor):
        return v.clamp_(qmin, qmax)
    return np.clip(v, qmin, qmax, out=v)


def quantize_float(x: Array, step: Step, qmin: int, qmax: int, out: torch.Tensor | None = None) -> Array:
    """Codes ``clamp(round(x / step), qmin, qmax)`` as floats of ``x / step``'s dtype.

    The fake-quant forward multiplies them by ``step``; one new tensor (the
    quotient), rounded and clamped in place, so it costs three passes over ``x``.
    ``out`` (a tensor of the quotient's shape and dtype) receives the quotient instead:
    a search calling this once per candidate step reuses one buffer.

    >>> quantize_float(torch.tensor([-0.3, 0.26, 0.625, 9.0]), 0.25, 0, 15)
    tensor([ 0.,  1.,  2., 15.])
    """
    return round_clamp_(x / step if out is None else torch.div(x, step, out=out), qmin, qmax)


def quantize_codes(x: Array, step: Step, qmin: int, qmax: int, narrow_dtype: bool = False) -> Array:
    """Integer codes ``clamp(round(x / step), qmin, qmax)`` (what a deployed model stores).

    int64, or with ``narrow_dtype`` the narrowest signed integer type that holds
    ``[qmin, qmax]`` (:func:`code_dtype`), as stored weights are.

    >>> quantize_codes(torch.tensor([-0.3, 0.26, 0.625, 9.0]), torch.tensor(0.25), -8, 7)
    tensor([-1,  1,  2,  7])
    >>> quantize_codes(np.array([-0.3, 0.26, 0.625, 9.0], dtype=np.float32), np.float32(0.25), -8, 7)
    array([-1,  1,  2,  7])
    >>> quantize_codes(torch.tensor([0.3, -9.0]), 0.25, -8, 7, narrow_dtype=True)
    tensor([ 1, -8], dtype=torch.int8)
    """
    q = quantize_float(x, step, qmin, qmax)
    dtype = code_dtype(qmin, qmax) if narrow_dtype else torch.int64
    return q.to(dtype) if isinstance(q, torch.Tensor) else q.astype(torch.empty((), dtype=dtype).numpy().dtype)


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest signed integer type holding every code in ``[qmin, qmax]``.

    >>> code_dtype(-128, 127), code_dtype(0, 255), code_dtype(-7, 7)
    (torch.int8, torch.int16, torch.int8)
    """
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


# --------------------------------------------------------------------------- adder layers


def adder_weight_step_ratio(act_bits: int, weight_bits: int) -> int:
    """Integer ``ratio`` of an adder group's weight step to its activation step.

    ``ratio = max(1, floor((2^a - 1) / (2^(w-1) - 1)))``: the largest integer at which
    ``w``-bit narrow signed codes still reach the group range ``r_g = (2^a - 1) *
    act_step``, so a weight at ``±r_g`` is not clipped. Integer so that ``|a_q -
    ratio * w_q|`` stays integer arithmetic. Equals 2 when ``a == w >= 3``, the
    reference code's factor (docs/design.md §4.5).

    >>> adder_weight_step_ratio(4, 4), adder_weight_step_ratio(8, 8), adder_weight_step_ratio(8, 4)
    (2, 2, 36)
    >>> adder_weight_step_ratio(4, 8)  # finer weights than activations: never below one step
    1
    """
    if weight_bits < 2:  # a 1-bit narrow code is only 0
        raise ValueError(f"adder weights need at least 2 bits, got {weight_bits}")
    return max(1, (2**act_bits - 1) // (2 ** (weight_bits - 1) - 1))


def adder_act_codes(x: Array, act_step: Step, bits: int) -> Array:
    """Unsigned ``bits``-bit activation codes of an adder group (floats holding integers).

    >>> adder_act_codes(torch.tensor([-0.1, 0.3, 0.99, 5.0]), 1 / 15, 4)
    tensor([ 0.,  4., 15., 15.])
    """
    return quantize_float(x, act_step, *int_range(bits, signed=False))


def adder_weight_codes(w: Array, weight_step: Step, bits: int) -> Array:
    """Signed weight codes of an adder group on the narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``.

    The range is symmetric so a weight at ``±r_g`` gets ``±qmax`` whatever rounding
    noise puts it on or either side of a tie: at ``a == w`` bits ``r_g`` sits at
    exactly ``qmax + 0.5`` steps, where the full range rounds ``+`` to ``qmax`` but
    ``-`` to ``-(qmax + 1)``.

    >>> step = 2 / 15  # r_g = 1 at 4-bit activations, ratio 2
    >>> adder_weight_codes(torch.tensor([1.0, -1.0, 0.3]), step, 4)
    tensor([ 7., -7.,  2.])
    """
    return quantize_float(w, weight_step, *int_range(bits, signed=True, narrow=True))


# --------------------------------------------------------------------------- integer arithmetic


def shift_round_half_even(acc: Integers, shift: int) -> Integers:
    """``acc / 2^shift`` rounded half to even, on integers (``int``, int64 arrays or tensors).

    An arithmetic right shift (floor) plus a carry decided from the shifted-out bits;
    exact for any int64 input (nothing is scaled up, so nothing overflows).

    >>> [shift_round_half_even(v, 1) for v in (5, 7, -5, -7, 6)]
    [2, 4, -2, -4, 3]
    >>> shift_round_half_even(np.array([5, 7, -5, -7, 13], dtype=np.int64), 2)
    array([ 1,  2, -1, -2,  3])
    >>> shift_round_half_even(torch.tensor([5, 7, -5, -7]), 1)
    tensor([ 2,  4, -2, -4])
    >>> shift_round_half_even(np.array([5, 5, 6, 7]), np.array([0, 1, 2, 1]))  # per-element shifts
    array([5, 2, 2, 4])
    >>> shift_round_half_even(np.array([2**62 + 1, 2**62, -(2**62) - 1, 5]), np.array([63, 63, 63, 70]))
    array([ 1,  0, -1,  0])
    """
    if isinstance(shift, np.ndarray):  # one shift per element (broadcast): per-channel requantization
        if np.any(shift < 0):
            raise ValueError(f"shift must be >= 0, got {int(shift.min())}")
        s = np.minimum(shift, 62)  # int64 shifts of 63 or more wrap: those are decided below
        floor = acc >> s
        rest = acc & ((1 << s) - 1)
        half = (1 << s) >> 1  # 0 where shift == 0: nothing was shifted out, no carry
        out = floor + ((rest > half) | ((rest == half) & (half > 0) & ((floor & 1) == 1)))
        if np.any(shift > 62):  # |acc / 2^63| <= 1: +-1 beyond a quarter of the range, else 0 (ties to even)
            top = (acc > 2**62).astype(out.dtype) - (acc < -(2**62))
            out = np.where(shift > 62, np.where(shift == 63, top, 0), out)
        return out
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return acc
    floor = acc >> shift
    rest = acc & ((1 << shift) - 1)  # the shifted-out bits, in [0, 2^shift) also for negative acc
    half = 1 << (shift - 1)
    return floor + ((rest > half) | ((rest == half) & ((floor & 1) == 1)))


def fixed_point_multiplier(real: float, bits: int = 31) -> tuple[int, int]:
    """``(multiplier, shift)`` with ``real ≈ multiplier * 2^-shift``, for integer requantization.

    For ``real != 0``, ``|multiplier|`` lies in ``[2^(bits-1), 2^bits)`` and the relative
    error ``|multiplier * 2^-shift - real| / |real|`` is at most ``2^-bits`` (the
    multiplier is rounded half to even, and is at least ``2^(bits-1)``). ``shift`` is
    negative when ``|real| >= 2^bits``. The sign goes with the multiplier (batch norm
    can make a channel's scale negative); ``real = 0`` gives ``(0, 0)``.

    >>> fixed_point_multiplier(0.75, bits=8)
    (192, 8)
    >>> m, s = fixed_point_multiplier(0.1)
    >>> m, s, abs(m * 2.0**-s - 0.1) / 0.1 <= 2.0**-31
    (1717986918, 34, True)
    """
    real = float(real)
    if not math.isfinite(real):
        raise ValueError(f"cannot represent {real} as a fixed-point multiplier")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(abs(real))  # |real| = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = round(mantissa * 2.0**bits)  # exact scaling by a power of two, then half-even
    if multiplier == 2**bits:  # the mantissa rounded up to the next power of two
        multiplier, exponent = 2 ** (bits - 1), exponent + 1
    return (multiplier if real > 0 else -multiplier), bits - exponent


def fixed_point_multipliers(real: np.ndarray, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fixed_point_multiplier` elementwise on a float64 array: int64 ``(multiplier, shift)``.

    The same arithmetic (``frexp``, exact scaling by ``2^bits``, half-even rounding,
    carry into the exponent), vectorized for per-sample requantization under ASQ.

    >>> m, s = fixed_point_multipliers(np.array([0.75, -0.1, 0.0]), bits=8)
    >>> m.tolist(), s.tolist()
    ([192, -205, 0], [8, 11, 0])
    """
    real = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(real)):
        raise ValueError("cannot represent a non-finite value as a fixed-point multiplier")
    mantissa, exponent = np.frexp(np.abs(real))
    multiplier = np.rint(np.ldexp(mantissa, bits)).astype(np.int64)
    carry = multiplier == 2**bits  # the mantissa rounded up to the next power of two
    multiplier = np.where(carry, 2 ** (bits - 1), multiplier)
    exponent = exponent.astype(np.int64) + carry
    zero = real == 0.0
    return np.where(zero, 0, np.where(real > 0, multiplier, -multiplier)), np.where(zero, 0, bits - exponent)


# --------------------------------------------------------------------------- power grids (POT / POST)

GRID_BASES = {"pot": 2.0, "post": math.sqrt(2.0)}

POST_MANTISSA = 0xB504F3
"""float32's ``1/sqrt(2)`` is exactly ``POST_MANTISSA * 2^-POST_SHIFT``."""
POST_SHIFT = 24


def post_constant() -> float:
    """The POST factor ``1/sqrt(2)`` exactly as the fake-quant module uses it (float32's value).

    >>> post_constant() == float(torch.tensor(2**-0.5, dtype=torch.float32))
    True
    >>> post_constant() == 2**-0.5  # float64's value differs: a bit-true backend needs this one
    False
    """
    return POST_MANTISSA * 2.0**-POST_SHIFT


def post_table(max_code: int) -> np.ndarray:
    """``LUT[A] = A * POST_MANTISSA`` for activation codes ``A = 0 .. max_code`` (int64, exact).

    Indexed by the activation code, it multiplies by :func:`post_constant` at the
    fixed-point scale ``2^-POST_SHIFT`` without rounding (docs/design.md §4.4).

    >>> post_table(3).tolist()
    [0, 11863283, 23726566, 35589849]
    """
    return np.arange(max_code + 1, dtype=np.int64) * POST_MANTISSA


def power_levels(bits: int, base: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Magnitudes of the grid in ascending order: the level set, as a table.

    The quantizer projects in closed form; this table is the specification it is
    tested against and what backends can emit as a look-up table.

    ``levels[0] = 0`` and ``levels[i] = base^-(K - i)`` for ``i = 1..K``, so the last
    level is 1.

    >>> power_levels(3, 2.0).tolist()
    [0.0, 0.25, 0.5, 1.0]
    >>> float(power_levels(3, 2 ** 0.5, torch.float64)[2]) == POST_MANTISSA * 2.0 ** -POST_SHIFT
    True
    """
    k = 2 ** (bits - 1) - 1  # positive levels
    exps = torch.arange(k - 1, -1, -1, dtype=torch.float64)
    mags = torch.cat([torch.zeros(1, dtype=torch.float64), base ** (-exps)])
    # The levels are float32 numbers in every dtype: the deployed table multiplies by
    # float32's 1/sqrt 2 (POST_MANTISSA * 2^-POST_SHIFT), so a float64 run of the
    # module (the integer backend's reference) must use the very same levels.
    return mags.to(torch.float32).to(dtype)


@dataclass(frozen=True)
class GridThresholds:
    """Where the nearest-level projection onto a power grid switches level.

    Writing ``a = m * 2^e`` with ``m`` in ``[1, 2)``, the nearest level's exponent is
    ``k = -(e + [m > mid_low])`` for ``r = 2`` and ``k = -(2e + [m > mid_low] + [m >
    mid_high])`` for ``r = sqrt 2``, clamped to ``[0, max_exponent]``; ``a <= zero_below``
    projects to zero. The midpoints are stored rounded *down* to the input's dtype,
    which makes ``m > t`` exactly ``m > (true midpoint)``: ties go to the smaller
    magnitude, and the eager code and the fused kernel decide every weight alike.
    The field order is the fused kernels' argument order.
    """

    sqrt2: bool
    max_exponent: int
    mid_low: float
    mid_high: float
    zero_below: float


def _at_most(t: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value ``<= t``."""
    f = torch.tensor(t, dtype=dtype)
    if float(f) > t:
        f = torch.nextafter(f, torch.tensor(-math.inf, dtype=dtype))
    return float(f)


@functools.lru_cache(maxsize=None)
def grid_thresholds(bits: int, base: float, dtype: torch.dtype = torch.float32) -> GridThresholds:
    """The projection's decision points for a ``bits``-bit grid of ``base`` 2 or sqrt 2, for ``dtype`` inputs.

    >>> grid_thresholds(3, 2.0)
    GridThresholds(sqrt2=False, max_exponent=2, mid_low=1.5, mid_high=2.0, zero_below=0.125)
    """
    if base not in GRID_BASES.values():
        raise ValueError(f"power grids have base 2 or sqrt(2), got {base}")
    positive_levels = 2 ** (bits - 1) - 1
    sqrt2 = base != 2.0
    # inside one octave [1, 2): levels 1, sqrt2, 2 (sqrt 2) or 1, 2 (r = 2)
    mids = ((1 + base) / 2, (base + 2) / 2) if sqrt2 else (1.5, 2.0)
    return GridThresholds(
        sqrt2=sqrt2,
        max_exponent=positive_levels - 1,
        mid_low=_at_most(mids[0], dtype),
        mid_high=_at_most(mids[1], dtype),
        zero_below=_at_most(base ** (-(positive_levels - 1)) / 2, dtype),
    )


@functools.lru_cache(maxsize=None)
def _level_of_exponent(bits: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """``base^-k`` for ``k = 0 .. K-1``: :func:`power_levels` largest first."""
    return power_levels(bits, base, dtype)[1:].flip(0).contiguous()


def grid_exponents(a: torch.Tensor, bits: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For magnitudes ``a = |u|``: the nearest level's exponent ``k`` (int64) and the zero mask.

    Decided from the float's exponent and mantissa (:class:`GridThresholds`) rather
    than a table search (``bucketize`` is ~10x slower here, and this runs on every
    weight at every QAT step) or ``log2`` (whose rounding can flip a near-tie).

    >>> grid_exponents(torch.tensor([1.0, 0.3, 0.05]), 3, 2.0)
    (tensor([0, 2, 2]), tensor([False, False,  True]))
    """
    g = grid_thresholds(bits, base, a.dtype)
    mant, exp = torch.frexp(a)  # a = mant * 2^exp with mant in [0.5, 1): m = 2 mant, e = exp - 1
    octave = (exp - 1).long()
    if g.sqrt2:
        k = (mant > g.mid_low / 2).long().add_(mant > g.mid_high / 2).add_(octave, alpha=2).neg_()
    else:
        k = (mant > g.mid_low / 2).long().add_(octave).neg_()
    return k.clamp_(0, g.max_exponent), a <= g.zero_below


def grid_levels(a: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Nearest level magnitude of ``a = |u|`` (in units of alpha).

    >>> grid_levels(torch.tensor([0.9, 0.3, 0.05]), 3, 2.0)
    tensor([1.0000, 0.2500, 0.0000])
    """
    k, zero = grid_exponents(a, bits, base)
    return _level_of_exponent(bits, base, a.dtype).to(a.device)[k].masked_fill_(zero, 0.0)


def grid_codes(u: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Signed magnitude codes ``sign * m``: ``m = 0`` is zero, else the level is ``base^-(m-1)``.

    >>> grid_codes(torch.tensor([0.9, -0.3, 0.05]), 3, 2.0)
    tensor([ 1, -3,  0])
    """
    k, zero = grid_exponents(u.abs(), bits, base)
    return (k + 1).masked_fill_(zero, 0) * torch.sign(u).long()


def largest_exponent(codes: torch.Tensor | np.ndarray) -> int:
    """The largest exponent ``k = |m| - 1`` among nonzero power-grid codes, -1 if all are zero.

    A bit-true accumulator needs about this many extra fraction bits (docs/design.md §4.4).

    >>> largest_exponent(torch.tensor([1, -3, 0])), largest_exponent(np.zeros(2, dtype=np.int64))
    (2, -1)
    """
    magnitudes = abs(codes).reshape(-1)
    if len(magnitudes) == 0:
        return -1
    return int(magnitudes.max()) - 1  # zero codes give -1, below any used exponent


__all__ = [
    "GRID_BASES",
    "GridThresholds",
    "POST_MANTISSA",
    "POST_SHIFT",
    "adder_act_codes",
    "adder_weight_codes",
    "adder_weight_step_ratio",
    "fixed_point_multiplier",
    "fixed_point_multipliers",
    "grid_codes",
    "grid_exponents",
    "grid_levels",
    "grid_thresholds",
    "int_range",
    "offset_range",
    "largest_exponent",
    "post_constant",
    "post_table",
    "power_levels",
    "quantize_codes",
    "quantize_float",
    "round_clamp_",
    "round_half_even",
    "shift_round_half_even",
]
