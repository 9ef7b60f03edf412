"""POT / POST weight grids: exact level sets, nearest projection, gradients, codes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.numerics import GRID_BASES, power_levels
from qcompiler.quantizers.power_grid import PowerGridQuantizer


@pytest.mark.parametrize("grid", ["pot", "post"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_level_set_is_exactly_the_specified_values(grid, bits):
    r = GRID_BASES[grid]
    q = PowerGridQuantizer(bits, grid, channels=1)
    q.alpha.data.fill_(1.0)
    expected = {0.0} | {s * r ** (-k) for k in range(0, 2 ** (bits - 1) - 1) for s in (1.0, -1.0)}
    assert len(expected) == 2**bits - 1  # a true b-bit code
    # Every level maps to itself, and every output is one of the levels.
    levels = torch.tensor(sorted(expected), dtype=torch.float64).view(1, -1)
    out = q(levels.float()).double()
    torch.testing.assert_close(out, levels.float().double(), rtol=1e-6, atol=0)
    # Random inputs (log-uniform magnitudes, so tiny levels are hit too) land on levels.
    g = torch.Generator().manual_seed(bits)
    mags = torch.exp(torch.empty(1, 4000).uniform_(math.log(1e-6), math.log(2.0), generator=g))
    signs = torch.randint(0, 2, (1, 4000), generator=g) * 2 - 1
    got = set(q(mags * signs).flatten().tolist())
    assert all(min(abs(v - e) for e in expected) < 1e-6 * max(abs(v), 1e-3) for v in got)


def test_power_levels_table():
    assert power_levels(2, 2.0).tolist() == [0.0, 1.0]
    assert power_levels(3, 2.0).tolist() == [0.0, 0.25, 0.5, 1.0]
    post = power_levels(3, math.sqrt(2)).double()
    expected = [0.0] + [math.sqrt(2) ** (-k) for k in (2, 1, 0)]
    assert post.tolist() == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 6),
    grid=st.sampled_from(["pot", "post"]),
    alpha=st.floats(0.05, 4.0),
    seed=st.integers(0, 10_000),
)
def test_projection_picks_the_nearest_level(bits, grid, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 40, generator=g, dtype=torch.float64) * alpha
    q = PowerGridQuantizer(bits, grid, channels=3).double()
    q.alpha.data.fill_(alpha)
    out = q(w)
    levels = power_levels(bits, GRID_BASES[grid], torch.float64) * alpha
    candidates = torch.cat([levels, -levels[1:]])
    dist_best = (w.clamp(-alpha, alpha).unsqueeze(-1) - candidates).abs().min(-1).values
    dist_got = (w.clamp(-alpha, alpha) - out).abs()
    torch.testing.assert_close(dist_got, dist_best, rtol=0, atol=1e-9 * alpha)


def test_codes_round_trip_and_fit_in_bits():
    torch.manual_seed(0)
    for grid in ("pot", "post"):
        q = PowerGridQuantizer(4, grid, channels=5)
        w = torch.randn(5, 3, 3, 3)
        q.init_from(w)
        codes = q.codes(w)
        assert codes.abs().max() <= 2 ** 3 - 1  # sign + 3-bit magnitude index
        torch.testing.assert_close(q.decode(codes), q(w).detach())


def test_gradients_match_their_formulas():
    torch.manual_seed(1)
    bits, grid = 3, "post"
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    q = PowerGridQuantizer(bits, grid, channels=2).double()
    q.alpha.data = torch.tensor([0.7, 1.1], dtype=torch.float64)
    g = torch.randn(2, 6, dtype=torch.float64)
    (q(w) * g).sum().backward()

    alpha = q.alpha.detach().view(-1, 1)
    u = w.detach() / alpha
    inside = u.abs() <= 1
    level = q(w).detach() / alpha  # signed level in units of alpha
    k = 2 ** (bits - 1) - 1
    scale = 1 / math.sqrt(w.shape[1] * k)
    expected_alpha = (torch.where(inside, level - u, torch.sign(u)) * g).sum(1) * scale
    torch.testing.assert_close(w.grad, g * inside)  # straight through inside, zero outside
    torch.testing.assert_close(q.alpha.grad, expected_alpha)


def test_alpha_init_is_a_high_quantile():
    w = torch.arange(1, 101, dtype=torch.float32).view(1, -1)
    q = PowerGridQuantizer(4, "post", channels=1)
    q.init_from(w)
    assert 98.0 <= q.alpha.item() <= 100.0
