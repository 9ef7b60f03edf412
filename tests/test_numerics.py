"""Property tests of qcompiler.numerics against exact rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import numerics
from qcompiler.numerics import (
    GRID_BASES,
    POST_MANTISSA,
    POST_SHIFT,
    adder_act_codes,
    adder_weight_codes,
    adder_weight_step_ratio,
    code_dtype,
    fixed_point_multiplier,
    fixed_point_multipliers,
    grid_codes,
    int_range,
    grid_levels,
    grid_thresholds,
    largest_exponent,
    power_levels,
    post_constant,
    post_table,
    quantize_codes,
    quantize_float,
    round_half_even,
    shift_round_half_even,
)

PROPERTY = settings(max_examples=200, deadline=None)

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
shifts = st.integers(min_value=0, max_value=62)


def _exact_half_even(value: Fraction) -> int:
    """``value`` rounded to the nearest integer, ties to even, in exact arithmetic."""
    floor = math.floor(value)
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor


# --------------------------------------------------------------------------- shift rounding


@pytest.mark.parametrize("acc, shift, expected", [(5, 1, 2), (7, 1, 4), (-5, 1, -2), (-7, 1, -4), (6, 2, 2), (-6, 2, -2), (3, 0, 3)])
def test_shift_rounds_ties_to_even(acc, shift, expected):
    assert shift_round_half_even(acc, shift) == expected


@PROPERTY
@given(int64s, shifts)
def test_shift_is_exact_half_even_division_on_ints(acc, shift):
    assert shift_round_half_even(acc, shift) == _exact_half_even(Fraction(acc, 2**shift))


@PROPERTY
@given(st.lists(int64s, min_size=1, max_size=16), shifts)
def test_shift_agrees_on_ints_numpy_and_torch(values, shift):
    expected = [_exact_half_even(Fraction(v, 2**shift)) for v in values]
    on_numpy = shift_round_half_even(np.array(values, dtype=np.int64), shift)
    on_torch = shift_round_half_even(torch.tensor(values, dtype=torch.int64), shift)
    assert isinstance(on_numpy, np.ndarray) and on_numpy.dtype == np.int64
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.int64
    assert on_numpy.tolist() == expected and on_torch.tolist() == expected


def test_negative_shift_is_refused():
    with pytest.raises(ValueError, match="shift must be >= 0, got -1"):
        shift_round_half_even(4, -1)
    with pytest.raises(ValueError, match="shift must be >= 0, got -2"):
        shift_round_half_even(np.array([4, 4]), np.array([0, -2]))


@PROPERTY
@given(st.lists(st.tuples(int64s, st.integers(min_value=0, max_value=80)), min_size=1, max_size=16))
def test_per_element_shifts_are_exact_half_even_division(pairs):
    """One shift per element (per-channel requantization), 0 and past 63 included, in exact arithmetic."""
    acc = np.array([a for a, _ in pairs], dtype=np.int64)
    shift = np.array([s for _, s in pairs], dtype=np.int64)
    got = shift_round_half_even(acc, shift)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == acc.shape
    assert got.tolist() == [_exact_half_even(Fraction(a, 2**s)) for a, s in pairs]


@pytest.mark.parametrize("acc, shift, expected", [
    (5, 0, 5), (5, 1, 2), (7, 1, 4), (-5, 1, -2), (-7, 1, -4), (6, 2, 2), (-6, 2, -2), (2, 2, 0), (-2, 2, 0),
    (2**62 + 1, 63, 1), (2**62, 63, 0), (-(2**62) - 1, 63, -1), (-(2**62), 63, 0), (2**63 - 1, 64, 0),
    (-(2**63), 63, -1), (-(2**63), 64, 0), (2**63 - 1, 62, 2), (-(2**63), 62, -2),
])
def test_per_element_shift_edge_cases(acc, shift, expected):
    """Ties either way, shift 0, and the shifts an int64 shift cannot do (63 and past)."""
    got = shift_round_half_even(np.array([acc, 3], dtype=np.int64), np.array([shift, 1], dtype=np.int64))
    assert got.tolist() == [expected, 2] == [_exact_half_even(Fraction(acc, 2**shift)), 2]


# --------------------------------------------------------------------------- fixed-point multipliers


@PROPERTY
@given(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False).filter(lambda r: r != 0.0),
    st.integers(min_value=2, max_value=62),
)
def test_fixed_point_multiplier_within_its_error_bound(real, bits):
    multiplier, shift = fixed_point_multiplier(real, bits)
    assert isinstance(multiplier, int) and isinstance(shift, int)
    assert 2 ** (bits - 1) <= abs(multiplier) < 2**bits
    assert (multiplier > 0) == (real > 0)
    approx = Fraction(multiplier) * Fraction(2) ** -shift
    assert abs(approx - Fraction(real)) <= Fraction(abs(real)) * Fraction(1, 2**bits)


def test_fixed_point_multiplier_edge_cases():
    assert fixed_point_multiplier(0.0) == (0, 0)
    assert fixed_point_multiplier(1.0) == (2**30, 30)
    # a mantissa that rounds up to the next power of two moves to the next octave
    assert fixed_point_multiplier(1 - 2.0**-40, bits=8) == (128, 7)
    with pytest.raises(ValueError, match="cannot represent inf as a fixed-point multiplier"):
        fixed_point_multiplier(math.inf)



reals = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(st.lists(reals, min_size=1, max_size=16), st.integers(min_value=2, max_value=31))
def test_fixed_point_multipliers_are_the_scalar_function_elementwise(xs, bits):
    m, s = fixed_point_multipliers(np.array(xs), bits)
    assert m.dtype == np.int64 and s.dtype == np.int64 and m.shape == s.shape == (len(xs),)
    assert [(int(a), int(b)) for a, b in zip(m, s)] == [fixed_point_multiplier(x, bits) for x in xs]


def test_fixed_point_multipliers_edge_cases():
    # zero, both signs, a mantissa rounding up into the next octave, a value >= 2^bits
    real = np.array([0.0, 1.0, -1.0, 1 - 2.0**-40, -(1 - 2.0**-40), 2.0**40, 0.75, -0.1])
    m, s = fixed_point_multipliers(real, bits=8)
    assert m.tolist() == [0, 128, -128, 128, -128, 128, 192, -205]
    assert s.tolist() == [0, 7, 7, 7, 7, -33, 8, 11]
    m31, s31 = fixed_point_multipliers(np.array([1.0]))  # 31 bits by default
    assert (m31.tolist(), s31.tolist()) == ([2**30], [30])
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(ValueError, match="^cannot represent a non-finite value as a fixed-point multiplier$"):
            fixed_point_multipliers(np.array([1.0, bad]))


@pytest.mark.parametrize("qmin, qmax, dtype, np_dtype", [
    (-8, 7, torch.int8, np.int8), (0, 255, torch.int16, np.int16), (-(2**15), 2**15 - 1, torch.int16, np.int16),
    (0, 2**16 - 1, torch.int32, np.int32),
])
def test_narrow_codes_have_the_narrowest_dtype_and_the_same_values(qmin, qmax, dtype, np_dtype):
    x = torch.linspace(qmin - 3, qmax + 3, 50) * 0.5
    wide = quantize_codes(x, 0.5, qmin, qmax)
    narrow = quantize_codes(x, 0.5, qmin, qmax, narrow_dtype=True)
    assert wide.dtype == torch.int64 and narrow.dtype == dtype
    assert torch.equal(narrow.long(), wide) and int(narrow.min()) == qmin and int(narrow.max()) == qmax
    on_numpy = quantize_codes(x.numpy(), np.float32(0.5), qmin, qmax, narrow_dtype=True)
    assert on_numpy.dtype == np_dtype and on_numpy.tolist() == wide.tolist()


@pytest.mark.parametrize("qmin, qmax, dtype", [
    (-128, 127, torch.int8), (-7, 7, torch.int8), (0, 127, torch.int8),
    (0, 255, torch.int16), (-129, 0, torch.int16), (-32768, 32767, torch.int16),
    (0, 32768, torch.int32), (-(2**31), 2**31 - 1, torch.int32),
    (0, 2**31, torch.int64), (-(2**31) - 1, 0, torch.int64),
])
def test_code_dtype_is_the_narrowest_signed_type_holding_the_range(qmin, qmax, dtype):
    assert code_dtype(qmin, qmax) == dtype


# --------------------------------------------------------------------------- uniform codes


values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@PROPERTY
@given(
    st.lists(values, min_size=1, max_size=24),
    st.floats(min_value=2.0**-10, max_value=128.0, width=32),
    st.integers(2, 8),
    st.booleans(),
    st.sampled_from([np.float32, np.float64]),
)
def test_quantize_codes_agree_on_torch_and_numpy(xs, step, bits, signed, dtype):
    qmin, qmax = int_range(bits, signed)
    x_np, step_np = np.array(xs, dtype=dtype), dtype(step)
    x_t, step_t = torch.from_numpy(x_np.copy()), torch.tensor(step_np)
    on_numpy = quantize_codes(x_np, step_np, qmin, qmax)
    on_torch = quantize_codes(x_t, step_t, qmin, qmax)
    assert on_numpy.dtype == np.int64 and on_torch.dtype == torch.int64
    assert on_numpy.tolist() == on_torch.tolist()
    assert quantize_float(x_np, step_np, qmin, qmax).tolist() == on_numpy.tolist()
    # exact reference: the quotient as the float the division produced, rounded half to even
    quotient = x_np / step_np
    assert on_numpy.tolist() == [min(max(_exact_half_even(Fraction(float(v))), qmin), qmax) for v in quotient]


def test_quantize_codes_round_ties_to_even_and_clamp():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0])
    assert quantize_codes(x, 1.0, -8, 7).tolist() == [0, 2, 2, 0, -2, 7, -8]
    assert quantize_codes(torch.from_numpy(x), 1.0, -8, 7).tolist() == [0, 2, 2, 0, -2, 7, -8]


def test_narrow_range_is_symmetric():
    for bits in range(2, 17):
        lo, hi = int_range(bits, signed=True, narrow=True)
        assert lo == -hi and (hi, int_range(bits, signed=True)[0]) == (2 ** (bits - 1) - 1, lo - 1)
    assert int_range(4, signed=False, narrow=True) == (0, 15)  # narrow only concerns signed codes


# --------------------------------------------------------------------------- adder codes


@pytest.mark.parametrize("act_bits", range(2, 9))
@pytest.mark.parametrize("weight_bits", range(2, 9))
def test_adder_weight_codes_reach_the_group_range(act_bits, weight_bits):
    """A weight at ±r_g gets the largest code the ratio lets it reach, never clipping more than one step."""
    ratio = adder_weight_step_ratio(act_bits, weight_bits)
    assert ratio >= 1 and isinstance(ratio, int)
    if act_bits == weight_bits >= 3:
        assert ratio == 2
    qmax = 2 ** (weight_bits - 1) - 1
    # r_g in weight steps: at least qmax (the codes span the range) unless the ratio hit its floor of 1
    assert (2**act_bits - 1) / ratio >= qmax or ratio == 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_adder_extreme_weights_get_symmetric_codes(bits):
    r_g = torch.tensor(0.7)
    act_step = r_g / (2**bits - 1)
    step = float(adder_weight_step_ratio(bits, bits) * act_step)
    w = torch.stack([r_g, torch.nextafter(r_g, torch.tensor(2.0)), torch.nextafter(r_g, torch.tensor(0.0))])
    codes = adder_weight_codes(torch.cat([w, -w]), step, bits)
    top = codes[:3]
    assert torch.equal(codes[3:], -top)
    assert int(top.max()) == int(top.min()) == min(2 ** (bits - 1) - 1, round((2**bits - 1) / adder_weight_step_ratio(bits, bits)))


def test_adder_codes_agree_on_torch_and_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.random(50, dtype=np.float32) * 1.2, (rng.random(50, dtype=np.float32) * 2 - 1)
    step = np.float32(1 / 15)
    assert adder_act_codes(x, step, 4).tolist() == adder_act_codes(torch.from_numpy(x), torch.tensor(step), 4).tolist()
    assert adder_weight_codes(w, 2 * step, 4).tolist() == adder_weight_codes(torch.from_numpy(w), torch.tensor(2 * step), 4).tolist()


# --------------------------------------------------------------------------- power grids and POST


def test_post_constant_is_float32_inverse_sqrt2_exactly():
    c = post_constant()
    assert c == float(torch.tensor(2**-0.5, dtype=torch.float32)) == float(np.float32(2**-0.5))
    assert Fraction(c) == Fraction(POST_MANTISSA, 2**POST_SHIFT)
    assert POST_MANTISSA.bit_length() == POST_SHIFT  # a full 24-bit float32 mantissa


def test_post_table_multiplies_codes_exactly():
    table = post_table(255)
    assert table.dtype == np.int64 and table.shape == (256,)
    a = np.arange(256)
    # each entry is A times the constant at scale 2^-24, with no rounding
    assert [Fraction(int(t), 2**POST_SHIFT) for t in table] == [Fraction(int(v)) * Fraction(post_constant()) for v in a]
    # and agrees with what the float32 fake-quant module computes (A * c is exact in float64)
    assert np.array_equal(table * 2.0**-POST_SHIFT, a * np.float64(np.float32(2**-0.5)))


def test_largest_exponent():
    assert largest_exponent(torch.tensor([0, 0])) == -1
    assert largest_exponent(np.array([], dtype=np.int64)) == -1
    assert largest_exponent(np.array([1, -4, 0, 3])) == 3
    codes = grid_codes(torch.tensor([1.0, -0.5, 0.26, 0.0]), 4, 2.0)
    assert largest_exponent(codes) == int((codes.abs() - 1).max())


# --------------------------------------------------------------------------- power-grid decision points


@PROPERTY
@given(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_at_most_is_the_largest_value_of_the_dtype_not_above(t, dtype):
    got = numerics._at_most(t, dtype)
    assert float(torch.tensor(got, dtype=dtype)) == got  # a value of that dtype
    assert got <= t
    above = torch.nextafter(torch.tensor(got, dtype=dtype), torch.tensor(math.inf, dtype=dtype))
    assert float(above) > t  # and the next one up is past t
    if float(torch.tensor(t, dtype=dtype)) == t:
        assert got == t  # representable: t itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid", sorted(GRID_BASES))
def test_grid_thresholds_are_the_midpoints_rounded_down_in_the_input_dtype(grid, dtype):
    numerics.grid_thresholds.cache_clear()  # compute them here, not from an earlier caller's cache
    base, bits = GRID_BASES[grid], 4
    g = grid_thresholds(bits, base, dtype)
    mids = ((1 + base) / 2, (base + 2) / 2) if grid == "post" else (1.5, 2.0)
    zero = base ** -(2 ** (bits - 1) - 2) / 2
    for got, exact in ((g.mid_low, mids[0]), (g.mid_high, mids[1]), (g.zero_below, zero)):
        assert got == numerics._at_most(exact, dtype) and got <= exact
        if dtype == torch.float64:
            assert got == exact  # Python floats are float64: exact
    assert g.max_exponent == 2 ** (bits - 1) - 2 and g.sqrt2 == (grid == "post")
    with pytest.raises(ValueError, match="base 2 or sqrt"):
        grid_thresholds(bits, 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_levels_decide_float64_ties_on_float64_thresholds(dtype):
    """A magnitude at the exact midpoint between the levels 1/2 and 1/sqrt 2 (in the input's dtype)
    goes to 1/2, the next value up to 1/sqrt 2. Float32 thresholds would misplace float64 inputs in between."""
    numerics.grid_thresholds.cache_clear()
    numerics._level_of_exponent.cache_clear()
    base = GRID_BASES["post"]
    mid = torch.tensor(numerics._at_most((1 + base) / 2, dtype) / 2, dtype=dtype)  # the octave [1/2, 1)
    up = torch.nextafter(mid, torch.tensor(2.0, dtype=dtype))
    levels = grid_levels(torch.stack([mid, up]), 4, base)
    table = power_levels(4, base, dtype)
    assert levels.dtype == dtype
    assert levels.tolist() == [float(table[-3]), float(table[-2])] == [0.5, float(np.float32(2**-0.5))]


def test_power_levels_are_float32_values_in_every_dtype():
    """The grid is the fake-quant module's float32 grid: a float64 table holds the same values."""
    for base in GRID_BASES.values():
        for bits in range(2, 9):
            wide = power_levels(bits, base, torch.float64)
            assert wide.dtype == torch.float64
            assert torch.equal(wide, wide.float().double())
            assert torch.equal(wide.float(), power_levels(bits, base))


def test_shifts_of_62_and_63_in_one_array():
    """The branch for shifts past 62 must leave the elements shifted by 62 alone."""
    acc = np.array([2**63 - 1, 2**63 - 1, -(2**63), 3 * 2**60], dtype=np.int64)
    got = shift_round_half_even(acc, np.array([62, 63, 62, 62], dtype=np.int64))
    assert got.tolist() == [2, 1, -2, 1]


@pytest.mark.parametrize("act_bits", range(2, 9))
@pytest.mark.parametrize("weight_bits", range(2, 9))
def test_adder_weight_step_ratio_is_the_documented_floor(act_bits, weight_bits):
    """docs/design.md §4.5: ``ratio = max(1, floor((2^a - 1) / (2^(w-1) - 1)))``."""
    expected = max(1, math.floor(Fraction(2**act_bits - 1, 2 ** (weight_bits - 1) - 1)))
    assert adder_weight_step_ratio(act_bits, weight_bits) == expected


def test_adder_weight_step_ratio_needs_two_weight_bits():
    with pytest.raises(ValueError, match="^adder weights need at least 2 bits, got 1$"):
        adder_weight_step_ratio(4, 1)


@pytest.mark.parametrize("as_array", [np.array, torch.tensor])
def test_round_half_even_without_an_output_buffer(as_array):
    v = as_array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 3.0])
    got = round_half_even(v)
    assert type(got) is type(v) and got is not v
    assert got.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 3.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_offset_range_spans_every_zero_point_from_unsigned_to_signed(bits: int) -> None:
    half = 2 ** (bits - 1)
    assert numerics.offset_range(bits, 0) == int_range(bits, signed=False)
    assert numerics.offset_range(bits, half) == int_range(bits, signed=True)
    for z in range(half + 1):
        lo, hi = numerics.offset_range(bits, z)
        assert (lo, hi - lo) == (-z, 2**bits - 1)  # 2^b codes, z of them below zero
    for z in (-1, half + 1, 2**bits):
        with pytest.raises(ValueError, match=rf"^zero point {z} outside \[0, {half}\] for {bits}-bit codes$"):
            numerics.offset_range(bits, z)
