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


# ---- a QAT convolution and its POT/POST weight quantizer as one autograd node ------------------

from torch import nn  # noqa: E402

from qcompiler import kernels  # noqa: E402
from qcompiler.nn.qat import QConv1d, QConv2d, QConv3d  # noqa: E402

CONVS = {1: (QConv1d, 9), 2: (QConv2d, 7), 3: (QConv3d, 5)}


def _qconv(dims: int, grid: str = "post", bits: int = 4, **conv) -> nn.Module:
    cls, _ = CONVS[dims]
    torch.manual_seed(dims)
    layer = cls(4, 6, 3, **conv)
    layer.weight_quant = PowerGridQuantizer(bits, grid, channels=6)
    layer.weight_quant.init_from(layer.weight)
    return layer.train()


def _two_nodes(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward as it is without the one-node path: quantizer, then convolution."""
    return layer._conv_forward(x, layer.weight_quant(layer.weight), layer.bias)


def _grads(layer: nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, list]:
    for p in [x, *layer.parameters()]:
        p.grad = None
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in (x, *layer.parameters())]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("conv", [{}, {"stride": 2, "padding": 1, "bias": False}, {"dilation": 2, "groups": 2, "padding": 2}])
@pytest.mark.parametrize("grid", ["pot", "post"])
def test_one_node_conv_gives_the_two_nodes_values_bit_for_bit(dims, conv, grid):
    layer = _qconv(dims, grid, **conv)
    x = torch.randn(3, 4, *[CONVS[dims][1]] * dims, requires_grad=True)
    y1, g1 = _grads(layer, x, layer)
    y2, g2 = _grads(layer, x, lambda v: _two_nodes(layer, v))
    assert torch.equal(y1, y2)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    assert g1[0] is not None and all(g is not None for g in g1[1:])  # x, weight, (bias), alpha
    fused = kernels.usable(layer.weight, layer.weight_quant.alpha, build=False, per_row=True) is not None
    assert (type(layer(x).grad_fn).__name__ == "_FusedConvPowerGridBackward") == fused


@pytest.mark.parametrize("frozen", ["input", "weight", "alpha", "all but bias"])
def test_one_node_conv_computes_only_the_gradients_asked_for(frozen):
    layer = _qconv(2)
    x = torch.randn(2, 4, 7, 7, requires_grad=frozen != "input")
    if frozen in ("weight", "all but bias"):
        layer.weight.requires_grad_(False)
    if frozen in ("alpha", "all but bias"):
        layer.weight_quant.alpha.requires_grad_(False)
    y1, g1 = _grads(layer, x, layer)
    y2, g2 = _grads(layer, x, lambda v: _two_nodes(layer, v))
    assert torch.equal(y1, y2)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    assert (g1[0] is None) == (frozen == "input")
    assert g1[2] is not None  # the bias always learns here


def test_one_node_conv_is_skipped_where_the_two_nodes_must_run():
    x = torch.randn(2, 4, 7, 7)
    # a hook on the quantizer sees its call; reflect padding and padding="same" go through _conv_forward
    hooked = _qconv(2)
    seen = []
    hooked.weight_quant.register_forward_hook(lambda m, i, o: seen.append(o))
    hooked(x)
    assert len(seen) == 1
    for layer in (_qconv(2, padding=1, padding_mode="reflect"), _qconv(2, padding="same")):
        assert torch.equal(layer(x), _two_nodes(layer, x))
        assert type(layer(x).grad_fn).__name__ != "_FusedConvPowerGridBackward"
    with torch.no_grad():  # nothing to differentiate: no autograd node at all
        plain = _qconv(2)
        assert torch.equal(plain(x), _two_nodes(plain, x))
