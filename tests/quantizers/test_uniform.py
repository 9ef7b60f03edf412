"""Property tests of the LSQ quantizer (qcompiler.quantizers.uniform), docs/design.md §4.2."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.numerics import int_range, quantize_codes, quantize_float
from qcompiler.quantizers.uniform import UniformQuantizer, lsq_quantize, positive

PROPERTY = settings(max_examples=80, deadline=None)

values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
xs = st.lists(values, min_size=1, max_size=24)
steps = st.floats(min_value=1e-3, max_value=1e2, allow_nan=False, allow_infinity=False)
bits = st.integers(min_value=2, max_value=8)
signs = st.booleans()


def _reference_step_grad(x: torch.Tensor, s: torch.Tensor, g: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per element: round(v) - v inside [qmin, qmax], qmin below, qmax above; times the upstream gradient."""
    v = x / s
    inside = (v >= qmin) & (v <= qmax)
    term = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    return g * term


@pytest.mark.parametrize(
    "b, signed, expected",
    [(2, False, (0, 3)), (2, True, (-2, 1)), (4, False, (0, 15)), (4, True, (-8, 7)), (8, True, (-128, 127)), (8, False, (0, 255))],
)
def test_int_range(b: int, signed: bool, expected: tuple[int, int]) -> None:
    assert int_range(b, signed) == expected


@PROPERTY
@given(xs, steps, bits, signs)
def test_codes_in_int_range(x: list[float], s: float, b: int, signed: bool) -> None:
    qmin, qmax = int_range(b, signed)
    t, step = torch.tensor(x, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    codes = quantize_codes(t, step, qmin, qmax)
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    q = UniformQuantizer(b, signed).double()
    with torch.no_grad():
        q.step.fill_(s)
    assert torch.equal(q.codes(t), codes)


@PROPERTY
@given(xs, steps, bits, signs, st.sampled_from([torch.float32, torch.float64]))
def test_idempotent_and_multiple_of_step(x: list[float], s: float, b: int, signed: bool, dtype: torch.dtype) -> None:
    qmin, qmax = int_range(b, signed)
    t, step = torch.tensor(x, dtype=dtype), torch.tensor(s, dtype=dtype)
    once = lsq_quantize(t, step, qmin, qmax, 1.0)
    twice = lsq_quantize(once, step, qmin, qmax, 1.0)
    assert torch.equal(once, twice)
    codes = quantize_codes(t, step, qmin, qmax)
    assert torch.equal(once, codes.to(dtype) * step)
    ratio = once / step
    assert torch.allclose(ratio, torch.round(ratio), rtol=0, atol=1e-3)
    assert float(once.min()) >= qmin * float(step) * (1 + 1e-6) - 1e-12
    assert float(once.max()) <= qmax * float(step) * (1 + 1e-6)


@PROPERTY
@given(xs, steps, bits, signs, st.floats(min_value=1e-3, max_value=10.0), st.integers(0, 2**16))
def test_step_and_x_gradients_match_the_spec(
    x: list[float], s: float, b: int, signed: bool, grad_scale: float, seed: int
) -> None:
    qmin, qmax = int_range(b, signed)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    step = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    g = torch.randn(len(x), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (lsq_quantize(t, step, qmin, qmax, grad_scale) * g).sum().backward()

    expected = _reference_step_grad(t.detach(), step.detach(), g, qmin, qmax).sum() * grad_scale
    torch.testing.assert_close(step.grad, expected, rtol=1e-12, atol=1e-12)
    v = t.detach() / s
    inside = (v >= qmin) & (v <= qmax)
    # Straight-through inside the range, zero outside.
    torch.testing.assert_close(t.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=0, atol=0)


def test_step_gradient_hand_computed() -> None:
    """4-bit unsigned, s = 0.5: v = [-2, 0.6, 3.2, 40] -> terms [0 (qmin), 1 - 0.6, 3 - 3.2, 15 (qmax)]."""
    x = torch.tensor([-1.0, 0.3, 1.6, 20.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    lsq_quantize(x, s, 0, 15, 0.25).sum().backward()
    assert float(s.grad) == pytest.approx((0.0 + 0.4 - 0.2 + 15.0) * 0.25)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # Signed: the lower clamp contributes qmin = -8.
    s2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    lsq_quantize(torch.tensor([-10.0], dtype=torch.float64), s2, -8, 7, 1.0).sum().backward()
    assert float(s2.grad) == -8.0


@PROPERTY
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    bits,
    st.lists(st.floats(min_value=1e-2, max_value=2.0), min_size=4, max_size=4),
    st.integers(0, 2**16),
)
def test_per_channel_step_gradient_reduces_per_channel(
    channels: int, k: int, b: int, step_values: list[float], seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(channels, k, 3, dtype=torch.float64, generator=gen) * 2).requires_grad_(True)
    g = torch.randn(channels, k, 3, dtype=torch.float64, generator=gen)
    q = UniformQuantizer(b, signed=True, channels=channels).double()
    with torch.no_grad():
        q.step.copy_(torch.tensor(step_values[:channels], dtype=torch.float64))
    (q(w) * g).sum().backward()

    s = q.step.detach().view(-1, 1, 1)
    n_per_channel = k * 3
    assert q.elements_per_step(w) == n_per_channel
    scale = 1.0 / math.sqrt(n_per_channel * q.qmax)
    assert q.grad_scale(w) == pytest.approx(scale)
    expected = _reference_step_grad(w.detach(), s, g, q.qmin, q.qmax).sum(dim=(1, 2)) * scale
    torch.testing.assert_close(q.step.grad, expected, rtol=1e-12, atol=1e-12)
    # Each channel used its own step.
    manual = quantize_float(w.detach(), s, q.qmin, q.qmax) * s
    torch.testing.assert_close(q(w).detach(), manual, rtol=0, atol=0)


def test_activation_grad_scale_is_per_sample() -> None:
    q = UniformQuantizer(4, signed=False)
    x = torch.rand(5, 3, 4, 4)
    assert q.elements_per_step(x) == 3 * 4 * 4
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(48 * 15))
    assert q.elements_per_step(torch.rand(6)) == 6


def test_per_tensor_activation_step_gradient() -> None:
    q = UniformQuantizer(3, signed=False).double()
    with torch.no_grad():
        q.step.fill_(0.3)
    x = torch.rand(2, 5, dtype=torch.float64) * 3
    g = torch.randn(2, 5, dtype=torch.float64)
    (q(x) * g).sum().backward()
    expected = _reference_step_grad(x, torch.tensor(0.3, dtype=torch.float64), g, 0, 7).sum() / math.sqrt(5 * 7)
    torch.testing.assert_close(q.step.grad, expected)


@pytest.mark.parametrize("s", [1.0, 0.25, 0.5, 2.0])
def test_round_half_to_even(s: float) -> None:
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5], dtype=torch.float64) * s
    step = torch.tensor(s, dtype=torch.float64)
    out = lsq_quantize(x, step, -8, 7, 1.0)
    assert (out / s).tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0]
    assert quantize_codes(x, step, -8, 7).tolist() == [0, 2, 2, 4, 0, -2, -2]


def test_lsq_init() -> None:
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q = UniformQuantizer(4, signed=True, channels=2)
    q.init_from(w)
    torch.testing.assert_close(q.step.detach(), torch.tensor([2 * 2.0, 2 * 0.5]) / math.sqrt(7))
    a = UniformQuantizer(4, signed=False)
    a.init_from(mean_abs=1.5)
    assert float(a.step.detach()) == pytest.approx(2 * 1.5 / math.sqrt(15))
    a.init_from(mean_abs=0.0)
    assert float(a.step.detach()) > 0  # a dead input still gets a usable step


def test_positive_step() -> None:
    s = torch.tensor([-0.5, 0.0, 2.0], requires_grad=True)
    p = positive(s)
    assert torch.equal(p, torch.tensor([0.5, 1e-8, 2.0]))  # |s|, floored at float32's 1e-8
    q = UniformQuantizer(4, signed=True)
    with torch.no_grad():
        q.step.fill_(-0.5)  # an SGD step past zero must not flip or zero the grid
    torch.testing.assert_close(q(torch.tensor([1.0, -1.0])), torch.tensor([1.0, -1.0]))


def test_a_batch_of_one_is_quantized_like_any_batch():
    """The gradient scale counts the elements of one sample, also when there is only one sample."""
    q = UniformQuantizer(4, signed=True)
    x = torch.randn(1, 3, 4)
    q.init_from(x)
    assert q.elements_per_step(x) == 12 and q.elements_per_step(torch.randn(5, 3, 4)) == 12
    out = q(x)
    assert torch.equal(out, quantize_codes(x, q.step.detach(), -8, 7).float() * q.step.detach())


def test_deployed_forward_is_codes_times_step_tagged_for_the_next_layer() -> None:
    from qcompiler.nn import exact

    torch.manual_seed(0)
    for q, x in ((UniformQuantizer(4, signed=True), torch.randn(3, 5, 4, 4)),
                 (UniformQuantizer(8, signed=True, channels=5, channel_axis=1), torch.randn(3, 5, 4, 4) * 3)):
        q.init_from(x)
        q.eval()
        with torch.no_grad():
            y = q(x)
        step = q.step_view(x).detach()
        assert torch.equal(y, quantize_float(x, step, q.qmin, q.qmax) * step)
        grid = exact.grid_of(y)
        assert grid is not None and torch.equal(grid.step, step) and grid.bound == max(-q.qmin, q.qmax)
        q.train()


def test_zero_point_gives_the_offset_code_range() -> None:
    q = UniformQuantizer(8, signed=True, zero_point=20)
    assert (q.bits, q.qmin, q.qmax, q.signed, q.asymmetric, q.zero_point) == (8, -20, 235, True, True, 20)
    q = UniformQuantizer(8, signed=True, zero_point=0)  # no code below zero: the unsigned grid
    assert (q.qmin, q.qmax, q.signed, q.asymmetric, q.zero_point) == (0, 255, False, False, None)
    q = UniformQuantizer(4, signed=False, zero_point=8)  # half below: the signed grid
    assert (q.qmin, q.qmax, q.signed, q.asymmetric, q.zero_point) == (-8, 7, True, False, None)
    q = UniformQuantizer(4, signed=True, zero_point=1)  # one code below zero is still signed
    assert (q.qmin, q.qmax, q.signed) == (-1, 14, True)


def test_elements_per_step_counts_one_sample() -> None:
    x = torch.zeros(4, 6, 5, 5)
    assert UniformQuantizer(4, signed=True).elements_per_step(x) == 150  # one step: a sample's features
    assert UniformQuantizer(4, signed=True, channels=6, channel_axis=1).elements_per_step(x) == 25  # per channel, per sample
    assert UniformQuantizer(4, signed=True, channels=4).elements_per_step(x) == 150  # a weight's output channel
    assert UniformQuantizer(4, signed=True, channels=5, channel_axis=-1).elements_per_step(torch.zeros(2, 3, 5)) == 3
    assert UniformQuantizer(4, signed=True).elements_per_step(torch.zeros(7)) == 7
    q = UniformQuantizer(4, signed=True, channels=6, channel_axis=1)
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(25 * 7))


def test_quantize_float_into_a_buffer() -> None:
    torch.manual_seed(0)
    x, step = torch.randn(64), torch.tensor(0.1)
    buffer = torch.full_like(x, float("nan"))
    got = quantize_float(x, step, -8, 7, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, quantize_float(x, step, -8, 7))
