"""Tests for qcompiler.quantizers.init: the least-error clip search and the signedness rule."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.numerics import int_range, offset_range, quantize_float
from qcompiler.observers import RangeObserver
from qcompiler.quantizers import UniformQuantizer
from qcompiler.quantizers.init import ASYMMETRIC_GAIN, act_clip, choose_grid, choose_signed, fit_act_grid, histogram_sse, search_scale
from qcompiler.quantizers.power_grid import PowerGridQuantizer

PROPERTY = settings(max_examples=40, deadline=None)


def _observed(x: torch.Tensor, bins: int = 2048):
    obs = RangeObserver(bins)
    obs.update(x)
    return obs.summary()


def _empirical_mse(x: torch.Tensor, step: float, bits: int, signed: bool) -> float:
    qmin, qmax = int_range(bits, signed)
    x = x.double()
    return float(((quantize_float(x, torch.tensor(step, dtype=torch.float64), qmin, qmax) * step - x) ** 2).mean())


def _laplace(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.Laplace(0.0, 1.0).sample((n,))


@PROPERTY
@given(st.integers(2, 8), st.booleans(), st.floats(0.05, 2.0), st.integers(0, 2**16))
def test_histogram_error_is_the_error_of_the_samples(bits: int, signed: bool, rel_step: float, seed: int) -> None:
    """Within-bin spreading is the only approximation: with 2048 bins the expected error of a
    grid is the samples' own error to a few per cent, for clipped and unclipped grids alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50_000, generator=g) * 2 + 0.5
    rng = _observed(x)
    qmin, qmax = int_range(bits, signed)
    step = rel_step * float(x.abs().max()) / qmax
    pos = torch.tensor(rng.hist.positive, dtype=torch.float64)
    neg = torch.tensor(rng.hist.negative, dtype=torch.float64)
    s = torch.tensor([[step]], dtype=torch.float64)
    expected = float(histogram_sse(pos, rng.hist.edge, s, qmax) + histogram_sse(neg, rng.hist.edge, s, -qmin)) / x.numel()
    assert expected == pytest.approx(_empirical_mse(x, step, bits, signed), rel=0.03, abs=1e-3 * step**2)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_search_finds_the_brute_force_optimum_on_laplace_samples(bits: int) -> None:
    x = _laplace()
    fit = fit_act_grid(_observed(x).hist, bits, signed=True)
    qmin, qmax = int_range(bits, True)
    clips = torch.linspace(0.02, 1.0, 400) * float(x.abs().max())
    errors = torch.tensor([_empirical_mse(x, float(c) / qmax, bits, True) for c in clips])
    best = float(clips[errors.argmin()])
    found = fit.step * qmax
    assert found == pytest.approx(best, rel=0.02)
    assert _empirical_mse(x, fit.step, bits, True) <= float(errors.min()) * 1.001
    # the heavy tail: clipped hard at 4 bits, hardly at 8
    top = float(x.abs().max())
    if bits == 4:
        assert found < 0.5 * top
    else:
        assert 0.7 * top < found < top


def test_search_scale_is_per_row_and_never_past_full() -> None:
    full = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([[0.25], [5.0], [1.7]])  # the second optimum lies beyond its full scale
    best = search_scale(full, lambda s: (s - target) ** 2)
    assert best.tolist() == pytest.approx([0.25, 2.0, 1.7], abs=1e-3)


@PROPERTY
@given(st.integers(2, 8), st.integers(1, 16), st.integers(4, 300), st.integers(0, 2**16))
def test_per_channel_mse_weight_steps_beat_lsq_steps(bits: int, channels: int, fan_in: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, fan_in, generator=g) * torch.rand(channels, 1, generator=g).add(0.1)
    mse, lsq = UniformQuantizer(bits, True, channels), UniformQuantizer(bits, True, channels)
    mse.init_weight(w, "mse")
    lsq.init_weight(w, "lsq")
    with torch.no_grad():
        err_mse = ((mse(w) - w) ** 2).sum(1)
        err_lsq = ((lsq(w) - w) ** 2).sum(1)
    assert bool((err_mse <= err_lsq * (1 + 1e-5) + 1e-12).all())  # channel by channel


def test_lsq_weight_init_is_the_paper_formula() -> None:
    w = torch.randn(5, 3, 3, 3)
    q = UniformQuantizer(4, True, 5)
    q.init_weight(w, "lsq")
    torch.testing.assert_close(q.step.detach(), 2 * w.abs().flatten(1).mean(1) / math.sqrt(7))
    q.init_weight(w, "max")
    torch.testing.assert_close(q.step.detach(), w.abs().flatten(1).max(1).values / 7)


@pytest.mark.parametrize("grid", ["pot", "post"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_power_grid_mse_alpha_beats_the_quantile_start(grid: str, bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(8, 64)
    mse, start = PowerGridQuantizer(bits, grid, 8), PowerGridQuantizer(bits, grid, 8)
    mse.init_weight(w, "mse")
    start.init_weight(w, "lsq")
    with torch.no_grad():
        err_mse = ((mse(w) - w) ** 2).sum(1)
        err_start = ((start(w) - w) ** 2).sum(1)
    assert bool((err_mse <= err_start * (1 + 1e-5)).all())
    assert float(err_mse.sum()) < float(err_start.sum())
    assert bool((mse.alpha.detach() <= w.abs().max(1).values * (1 + 1e-6)).all())


def test_silu_output_with_a_few_negatives_goes_unsigned() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.silu(torch.randn(100_000) + 3)  # about 0.1 % below zero, none below -0.28
    rng = _observed(x)
    assert rng.signed  # some values are negative ...
    for bits in (4, 8):
        assert choose_signed(rng, bits) is False  # ... but dropping them costs less than a sign bit
        unsigned, signed = fit_act_grid(rng.hist, bits, False), fit_act_grid(rng.hist, bits, True)
        assert unsigned.mse < signed.mse


def test_symmetric_input_goes_signed_and_positive_input_unsigned() -> None:
    torch.manual_seed(0)
    x = torch.randn(100_000)
    for bits in (2, 4, 8):
        assert choose_signed(_observed(x), bits) is True
        assert choose_signed(_observed(x.relu()), bits) is False


def test_standard_normal_silu_tips_with_the_width() -> None:
    """Half its values are small negatives: worth a sign bit on a fine grid, not on a coarse one."""
    torch.manual_seed(0)
    rng = _observed(torch.nn.functional.silu(torch.randn(100_000)))
    assert choose_signed(rng, 8) is True
    assert choose_signed(rng, 3) is False


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zero_point_search_finds_the_least_error_of_all(bits: int) -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.hardswish(torch.randn(100_000) * 2 + 1)  # down to -0.375, up to ~10
    rng = _observed(x)
    every = {z: fit_act_grid(rng.hist, bits, z > 0, z).mse for z in range(2 ** (bits - 1) + 1)}
    signed, zero_point = choose_grid(rng, bits, asymmetric=True)
    chosen = 2 ** (bits - 1) * signed if zero_point is None else zero_point
    if zero_point is not None:  # the least error of all, well below both plain grids
        assert every[chosen] <= min(every.values()) * (1 + 1e-9)
        assert every[zero_point] < ASYMMETRIC_GAIN * min(every[0], every[2 ** (bits - 1)])
    else:  # no zero point gains enough over the plain grid choose_signed picks
        assert min(every.values()) > ASYMMETRIC_GAIN * every[chosen]
    # and its expected error is the error of the samples on that grid
    qmin, qmax = offset_range(bits, chosen)
    step = fit_act_grid(rng.hist, bits, chosen > 0, None if zero_point is None else chosen).step
    sampled = float(((quantize_float(x.double(), torch.tensor(step, dtype=torch.float64), qmin, qmax) * step - x.double()) ** 2).mean())
    assert sampled == pytest.approx(every[chosen], rel=0.05)


def test_hardswish_at_8_bits_takes_a_small_zero_point() -> None:
    torch.manual_seed(0)
    rng = _observed(torch.nn.functional.hardswish(torch.randn(100_000) * 2 + 1))
    signed, zero_point = choose_grid(rng, 8, asymmetric=True)
    assert signed and 0 < zero_point < 32
    clip = act_clip(rng, 8, True, "max", zero_point)  # "max": the step reaches both ends
    step = clip / (255 - zero_point)
    assert step * zero_point >= -rng.min - 1e-9 and clip >= rng.max - 1e-9


def test_without_asymmetric_or_negatives_the_plain_grids_stay() -> None:
    torch.manual_seed(0)
    x = torch.randn(100_000)
    assert choose_grid(_observed(x), 8) == (True, None)  # asymmetric off: choose_signed alone
    assert choose_grid(_observed(x.relu()), 8, asymmetric=True) == (False, None)
    assert choose_grid(_observed(x), 8, asymmetric=True) == (True, None)  # symmetric data: the signed grid


def test_records_without_a_histogram_keep_the_old_rule() -> None:
    rng = _observed(torch.nn.functional.silu(torch.randn(1000) + 3))
    old = type(rng)(rng.min, rng.max, rng.mean_abs, rng.abs_p999, rng.abs_p9999, rng.count)
    assert old.hist is None and choose_signed(old, 8) is True


def test_observer_counts_negatives_apart() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0, 2.0])
    rng = _observed(x, bins=8)
    assert sum(rng.hist.negative) == 2 and sum(rng.hist.positive) == 4
    assert rng.hist.edge == 4.0 and rng.hist.bins == 8
    assert rng.hist.negative[6] == 1 and rng.hist.negative[1] == 1  # |-3| and |-0.5| in bins of width 0.5


# ---------------------------------------------------------------- exact values of the search's parts


def test_act_clip_for_every_init() -> None:
    torch.manual_seed(0)
    x = torch.randn(50_000) * 2 + 0.5
    rng = _observed(x)
    for bits, signed in ((8, True), (4, True), (4, False)):
        qmax = int_range(bits, signed)[1]
        assert act_clip(rng, bits, signed, "mse") == fit_act_grid(rng.hist, bits, signed).step * qmax
    assert act_clip(rng, 8, True, "percentile") == rng.abs_p9999
    assert act_clip(rng, 8, True, "max") == max(-rng.min, rng.max)
    assert act_clip(rng, 8, False, "max") == rng.max
    assert act_clip(rng, 8, True, "lsq") is None
    with pytest.raises(AssertionError):
        act_clip(rng, 8, True, "median")
    z = 20  # an asymmetric grid: codes [-20, 235]
    assert act_clip(rng, 8, True, "mse", z) == fit_act_grid(rng.hist, 8, True, z).step * 235
    assert act_clip(rng, 8, True, "max", z) == pytest.approx(max(rng.max / 235, -rng.min / 20) * 235, rel=1e-12)
    # without a histogram "mse" has nothing to search: it reaches the ends as "max" does
    old = type(rng)(rng.min, rng.max, rng.mean_abs, rng.abs_p999, rng.abs_p9999, rng.count)
    assert act_clip(old, 8, True, "mse") == act_clip(rng, 8, True, "max")
    assert act_clip(old, 8, True, "mse", z) == act_clip(rng, 8, True, "max", z)
    # one-sided data: the empty side asks for nothing
    negative, positive = _observed(-x.abs() - 0.1), _observed(x.abs() + 0.1)
    assert act_clip(negative, 8, False, "max") == 0.0
    assert act_clip(positive, 8, True, "max", z) == pytest.approx(positive.max, rel=1e-12)
    assert act_clip(negative, 8, True, "max", z) == pytest.approx(-negative.min / 20 * 235, rel=1e-12)


@pytest.mark.parametrize("bits, expected", [
    (2, [0, 1, 2]),
    (4, [0, 1, 2, 3, 4, 6, 8]),  # 8 * 2^(-k/2), k = 0..6, rounded: 8, 5.7, 4, 2.8, 2, 1.4, 1
    (8, [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128]),
])
def test_zero_point_candidates_are_powers_of_sqrt2_below_the_middle(bits: int, expected: list[int]) -> None:
    from qcompiler.quantizers.init import zero_point_candidates

    assert zero_point_candidates(bits) == expected


def test_top_is_the_upper_edge_of_the_last_filled_bin() -> None:
    from qcompiler.quantizers.init import _top

    assert _top(torch.tensor([0.0, 3.0, 0.0, 2.0, 0.0]), 0.5) == 2.0
    assert _top(torch.tensor([1.0, 0.0, 0.0]), 0.25) == 0.25
    assert _top(torch.zeros(4), 0.5) == 0.0


def _exact_bin_sse(lo: Fraction, hi: Fraction, s: Fraction, levels: int) -> Fraction:
    """Mean of (t - q(t))^2 for t uniform in [lo, hi), q the nearest of {0, s, ..., levels s}: piecewise exact."""
    cuts = sorted({lo, hi, *(s * j + s / 2 for j in range(levels) if lo < s * j + s / 2 < hi)})
    total = Fraction(0)
    for u, v in zip(cuts, cuts[1:]):
        mid = (u + v) / 2
        c = min(s * round(mid / s), s * levels)
        total += ((v - c) ** 3 - (u - c) ** 3) / 3
    return total / (hi - lo)


@pytest.mark.parametrize("levels", [0, 3, 7])
def test_histogram_sse_is_exact(levels: int) -> None:
    counts = [3.0, 0.0, 2.0, 5.0, 1.0, 0.0, 0.0]
    edge = 1.75
    steps = [0.1, 0.37, 0.61]
    got = histogram_sse(torch.tensor(counts), edge, torch.tensor(steps, dtype=torch.float64).view(-1, 1), levels)
    width = Fraction(edge) / len(counts)
    for k, s in enumerate(steps):
        want = sum(Fraction(c) * _exact_bin_sse(width * i, width * (i + 1), Fraction(s), levels)
                   for i, c in enumerate(counts) if c)
        assert float(got[k]) == pytest.approx(float(want), rel=1e-12)


def test_search_scale_hits_an_exact_candidate_and_a_closed_form_start() -> None:
    full = torch.tensor([1.0], dtype=torch.float64)
    third = lambda s: (s - 1 / 3) ** 2  # noqa: E731  (1/3 is round one's first candidate when there are 3)
    assert float(search_scale(full, third, candidates=3)) == 1 / 3
    start = torch.tensor([0.123456], dtype=torch.float64)
    at_start = lambda s: (s - 0.123456) ** 2  # noqa: E731
    assert float(search_scale(full, at_start, also=start, candidates=4, rounds=1)) == 0.123456
    # ties keep the first best: a flat error returns round one's first candidate
    assert float(search_scale(full, lambda s: torch.zeros_like(s), candidates=8)) == 1 / 8


@pytest.mark.parametrize("rounds", [2, 3])
def test_search_scale_narrows_by_the_candidate_count_each_round(rounds: int) -> None:
    target = 1 / math.sqrt(7)
    full = torch.tensor([1.0], dtype=torch.float64)
    best = float(search_scale(full, lambda s: (s - target) ** 2, candidates=8, rounds=rounds))
    assert abs(best - target) <= 1 / 8**rounds
