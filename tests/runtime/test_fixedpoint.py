"""Requantization in fixed point: exact integer semantics, saturation and half-to-even ties."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.numerics import shift_round_half_even
from qcompiler.runtime.fixedpoint import F32_PROOF_LIMIT, apply, apply_f32, f32_constants, multipliers


def round_half_even(q: Fraction) -> int:
    return round(q)  # Python rounds a Fraction half to even, exactly


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(0, 40))
def test_shift_round_half_even_is_exact_rounding(acc, shift):
    assert shift_round_half_even(np.array([acc], dtype=np.int64), shift)[0] == round_half_even(Fraction(acc, 2**shift))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=3),
    st.lists(st.floats(1e-6, 4.0), min_size=3, max_size=3),
    st.floats(-100.0, 100.0),
    st.sampled_from([(-8, 7), (0, 15), (-128, 127), (0, 255)]),
)
def test_requant_is_exact_on_its_integers_and_saturates(xs, reals, offset, qrange):
    reals = reals[: len(xs)]
    ms, sh, b = multipliers([np.array(r) for r in reals], np.array(offset))
    got = apply([np.array([x]) for x in xs], ms, sh, b, *qrange)[0]
    total = sum(x * int(m) for x, m in zip(xs, ms)) + int(b)
    exact = round_half_even(Fraction(total, 2 ** int(sh)))
    assert got == min(max(exact, qrange[0]), qrange[1])  # the integer semantics, saturated
    real = sum(Fraction(x) * Fraction(r) for x, r in zip(xs, reals)) + Fraction(offset)
    # within a hair of the real value: the lead multiplier is relative 2^-31, the other terms and the
    # bias are rounded to the lead's shift (half a unit of 2^-sh each)
    err = abs(Fraction(total, 2 ** int(sh)) - real)
    unit = Fraction(1, 2 ** int(sh))
    assert err <= sum(abs(x) * (abs(Fraction(r)) / 2**30 + unit) for x, r in zip(xs, reals)) + unit


@given(st.integers(-1000, 1000))
def test_requant_ties_go_to_even(x):
    ms, sh, b = multipliers([np.array(0.5)], np.array(0.0))  # 0.5 is exact: odd x lands on a tie
    got = int(apply([np.array([x])], ms, sh, b, -(2**31), 2**31)[0])
    assert got == round(Fraction(x, 2))


def test_requant_per_channel_shifts():
    reals = np.array([1e-3, 0.7, 3.0]).reshape(3, 1)
    ms, sh, b = multipliers([reals], np.array([0.25, -0.5, 0.0]).reshape(3, 1))
    assert len(set(sh.ravel().tolist())) == 3
    x = np.arange(-4, 5).reshape(1, 1, 9).repeat(3, axis=1)
    got = apply([x], ms, sh, b, -100, 100)
    want = np.rint(x * reals + np.array([0.25, -0.5, 0.0]).reshape(3, 1))
    assert np.array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(0, 80)), min_size=1, max_size=20))
def test_shift_round_half_even_per_element_shifts_is_exact_rounding(pairs):
    # per-channel requantization shifts one array by many amounts, past int64's 63 too (POST accumulators)
    acc = np.array([a for a, _ in pairs], dtype=np.int64)
    sh = np.array([s for _, s in pairs], dtype=np.int64)
    got = shift_round_half_even(acc, sh)
    assert [int(g) for g in got] == [round_half_even(Fraction(a, 2**s)) for a, s in pairs]


def test_requant_paths_agree_on_large_accumulators():
    # int64, float64 (below 2^53) and exact Python integers give the same codes
    rng = np.random.default_rng(0)
    reals = [rng.uniform(-1, 1, size=(4, 1)) * 2.0**-40, rng.uniform(-1, 1, size=(4, 1)) * 2.0**-60]
    ms, sh, b = multipliers(reals, rng.uniform(-1, 1, size=(4, 1)) * 2.0**-25)  # b within int64
    xs = [rng.integers(-(2**30), 2**30, size=(3, 4, 5)), rng.integers(-(2**20), 2**20, size=(3, 4, 5))]
    want = apply(xs, ms, sh, b, -128, 127, wide=True)
    assert np.array_equal(apply(xs, ms, sh, b, -128, 127), want)
    small = [x >> 10 for x in xs]
    assert np.array_equal(apply(small, ms, sh, b, -128, 127, exact_f64=True), apply(small, ms, sh, b, -128, 127, wide=True))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(1e-4, 2.0), min_size=1, max_size=2),
    st.floats(-20.0, 20.0),
    st.sampled_from([(-8, 7), (0, 15), (-128, 127), (0, 255)]),
    st.lists(st.integers(1, 3000), min_size=2, max_size=2),
    st.integers(0, 2**32 - 1),
)
def test_float32_requant_where_proven_equals_the_integer_one(reals, offset, qrange, reach, seed):
    """Whenever the proof accepts float32 constants, apply_f32 is the requant on every allowed input."""
    reach = reach[: len(reals)]
    if len(reals) == 2:
        reach = [min(r, 300) for r in reach]  # keep the two-term enumeration small
    ms, sh, b = multipliers([np.full((3, 1), r) * (1 + np.arange(3)[:, None]) for r in reals], np.full((3, 1), offset))
    fast = f32_constants(ms, sh, b, *qrange, [np.full((3, 1), float(r)) for r in reach])
    if fast is None:
        return  # not proven: the interpreter keeps float64, nothing to check
    rng = np.random.default_rng(seed)
    xs = [rng.integers(-r, r + 1, size=(5, 3, 7)).astype(np.float32) for r in reach]
    got = apply_f32(xs, *fast, *qrange)
    assert got.dtype == np.float32
    assert np.array_equal(got, apply([x.astype(np.int64) for x in xs], ms, sh, b, *qrange))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3),
    st.floats(-20.0, 20.0),
    st.sampled_from([(-8, 7), (0, 15), (-128, 127), (0, 255)]),
    st.integers(1, 5000),
    st.booleans(),
)
def test_one_term_float32_proof_on_transition_inputs_holds_on_every_input(reals, offset, qrange, reach, unsigned):
    """With the enumeration switched off, the one-term proof checks only the inputs around the
    exact requant's code changes; whatever it accepts must still agree on every input."""
    reals = np.array([r if abs(r) > 1e-3 else 0.0 for r in reals]).reshape(3, 1)  # a zero multiplier too
    ms, sh, b = multipliers([reals], np.full((3, 1), offset))
    floor = 0 if unsigned else None
    import qcompiler.runtime.fixedpoint as fixedpoint

    limit = fixedpoint.F32_PROOF_LIMIT
    fixedpoint.F32_PROOF_LIMIT = 0
    try:
        fast = f32_constants(ms, sh, b, *qrange, [np.full((3, 1), float(reach))], [floor])
    finally:
        fixedpoint.F32_PROOF_LIMIT = limit
    if fast is None:
        return
    x = np.broadcast_to(np.arange(0 if unsigned else -reach, reach + 1, dtype=np.float32), (3, 1 + reach * (1 if unsigned else 2)))
    got = apply_f32([x], fast[0], fast[1], *(np.float32(q) for q in qrange))
    assert np.array_equal(got, apply([x.astype(np.int64)], ms, sh, b, *qrange))


def test_one_term_float32_proof_covers_a_first_layers_wide_accumulator():
    """An 18-bit accumulator (8-bit input codes and weights) is past the enumeration, yet proven."""
    rng = np.random.default_rng(3)
    ms, sh, b = multipliers([rng.uniform(1e-5, 4e-5, size=(16, 1))], rng.uniform(-2, 2, size=(16, 1)))
    reach = 221824
    fast = f32_constants(ms, sh, b, 0, 255, [np.full((16, 1), float(reach))])
    assert 16 * (2 * reach + 1) > F32_PROOF_LIMIT and fast is not None
    x = np.broadcast_to(np.arange(-reach, reach + 1, dtype=np.float32), (16, 2 * reach + 1))
    assert np.array_equal(apply_f32([x], fast[0], fast[1], np.float32(0), np.float32(255)),
                          apply([x.astype(np.int64)], ms, sh, b, 0, 255))


def test_float32_requant_is_refused_where_float32_rounds_wrong_or_the_proof_is_too_big():
    # |x| up to 2^20 times a many-bit multiplier: products far past float32's 24 bits, and
    # the enumeration finds inputs whose float32 value rounds the other way
    ms, sh, b = multipliers([np.array([0.3183098861837907])], np.array([0.1]))
    assert f32_constants(ms, sh, b, -(2**31), 2**31 - 1, [np.array(2.0**20)]) is None
    # more two-term inputs than the proof enumerates: not attempted
    ms, sh, b = multipliers([np.ones((64, 1)), np.ones((64, 1))], np.zeros((64, 1)))
    assert f32_constants(ms, sh, b, -128, 127, [np.full((64, 1), 300.0)] * 2) is None
    # and where it is small and float32 is exact (a power-of-two step), it is accepted
    ms, sh, b = multipliers([np.array([0.25])], np.array([0.0]))
    assert f32_constants(ms, sh, b, -128, 127, [np.array(1000.0)]) is not None
