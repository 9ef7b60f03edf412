"""ASQ: per-sample beta, beta ≈ 1 at init, the method's gradients, and the adapter guard."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.numerics import quantize_float
from qcompiler.quantizers.asq import BETA_BOUND, Adapter, ASQQuantizer, adapter_hidden, init_linear
from qcompiler.quantizers.uniform import lsq_quantize, positive


def test_beta_is_per_sample_and_one_at_init():
    torch.manual_seed(0)
    q = ASQQuantizer(bits=4, signed=False, channels=16)
    x = torch.rand(5, 16, 6, 6) * torch.tensor([0.1, 1, 3, 10, 30]).view(-1, 1, 1, 1)
    beta = q.beta(x)
    assert beta.shape == (5,)
    torch.testing.assert_close(beta, torch.ones(5), atol=0.01, rtol=0)


def test_beta_differs_between_samples_once_trained():
    torch.manual_seed(0)
    q = ASQQuantizer(bits=4, signed=False, channels=8)
    torch.nn.init.normal_(q.adapter.fc2.weight, std=1.0)
    x = torch.rand(4, 8, 3, 3) * torch.arange(1, 5).view(-1, 1, 1, 1)
    beta = q.beta(x)
    assert beta.unique().numel() == 4


def test_step_and_beta_gradients_match_the_method():
    """d/ds = beta * g and d/dbeta = s * g, with g the per-sample LSQ step gradient."""
    torch.manual_seed(0)
    x = torch.rand(3, 4, 2, 2, dtype=torch.float64) * 3
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.8, 1.0, 1.3], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(x)
    qmin, qmax, scale = 0, 15, 0.5
    out = lsq_quantize(x, (s * beta).view(-1, 1, 1, 1), qmin, qmax, scale)
    (out * upstream).sum().backward()

    # g per sample: the LSQ step gradient at step s*beta, reduced over the sample.
    g = []
    for b in range(3):
        sa = (s * beta[b]).item()
        v = x[b] / sa
        q = quantize_float(x[b], sa, qmin, qmax)
        inside = (v >= qmin) & (v <= qmax)
        g.append(float((torch.where(inside, q - v, q) * upstream[b]).sum() * scale))
    g = torch.tensor(g, dtype=torch.float64)
    torch.testing.assert_close(s.grad, (beta.detach() * g).sum())
    torch.testing.assert_close(beta.grad, s.detach() * g)


def test_asq_quantizer_dequantizes_with_the_adapted_step():
    torch.manual_seed(0)
    q = ASQQuantizer(bits=3, signed=False, channels=4)
    x = torch.rand(2, 4, 5, 5)
    q.init_from(x)
    out = q(x)
    step = (q.step.abs() * q.beta(x)).view(-1, 1, 1, 1)
    codes = out / step
    torch.testing.assert_close(codes, torch.round(codes), atol=1e-5, rtol=0)
    assert codes.min() >= 0 and codes.max() <= 7


def test_adapter_cannot_die():
    """Where the published ReLU adapter is dead (negative pre-activation: beta = 1e-8 and
    no gradient), ours keeps beta in [1/8, 8] with a gradient that pulls it back."""
    a = Adapter(8)
    x = torch.rand(2, 8, 3, 3)
    with torch.no_grad():
        a.fc2.bias.fill_(-1.0)
    beta = a(x)
    assert (beta > 0.2).all() and (beta < 1).all()
    beta.sum().backward()
    assert a.fc2.bias.grad.item() > 0


def test_saturated_adapter_leaves_a_working_quantizer():
    """Even fully saturated, beta stays >= 1/8: the layer quantizes with step s/8 and s
    still learns, so the layer cannot be silently switched off."""
    q = ASQQuantizer(bits=4, signed=False, channels=8)
    x = torch.rand(2, 8, 3, 3)
    q.init_from(x)
    with torch.no_grad():
        q.adapter.fc2.bias.fill_(-1e4)
    beta = q.beta(x)
    torch.testing.assert_close(beta, torch.full((2,), 1 / 8))  # the documented floor, not the code's constant
    out = q(x)
    assert out.abs().sum() > 0
    out.sum().backward()
    assert q.step.grad.abs().item() > 0


def test_small_channel_fallback():
    assert adapter_hidden(2) == 4
    a = Adapter(2)
    assert a.fc1.out_features == 4
    assert a(torch.rand(3, 2)).shape == (3,)  # linear-layer inputs (no spatial dims) work too


def _hand_asq(q: ASQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """ASQ on ``(B, T, C)`` by hand: one beta per sample from the features averaged over the tokens."""
    w1, b1, w2, b2 = (t.detach() for t in q.adapter.weights())
    pooled = x.mean(dim=1)  # (B, C): over tokens, not over features
    z = torch.relu(pooled @ w1.T + b1) @ w2.T + b2
    beta = torch.exp(math.log(8.0) * torch.tanh(z.squeeze(-1) / math.log(8.0)))
    step = positive(q.step.detach()) * beta
    codes = torch.clamp(torch.round(x / step.view(-1, 1, 1)), q.qmin, q.qmax)
    return codes * step.view(-1, 1, 1)


def test_token_inputs_pool_over_tokens_and_match_a_hand_computation():
    from qcompiler import kernels

    torch.manual_seed(0)
    for tokens in (5, 12):  # 12 == features: a wrong axis would not crash, it would be silently wrong
        q = ASQQuantizer(bits=4, signed=True, channels=12, feature_axis=-1)
        torch.nn.init.normal_(q.adapter.fc2.weight, std=1.0)
        x = torch.randn(3, tokens, 12) * torch.tensor([0.5, 1.0, 4.0]).view(-1, 1, 1)
        q.init_from(x)
        expected = _hand_asq(q, x)
        for fused in (True, False):
            with (kernels.disabled() if not fused else torch.no_grad()):
                got = q(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert q.beta(x).shape == (3,) and q.beta(x).unique().numel() == 3


def test_token_input_gradients_agree_between_fused_and_eager():
    from qcompiler import kernels

    torch.manual_seed(1)
    q = ASQQuantizer(bits=4, signed=True, channels=6, feature_axis=-1)
    torch.nn.init.normal_(q.adapter.fc2.weight, std=0.5)
    x0 = torch.randn(4, 7, 6)
    q.init_from(x0)
    grads = []
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        q.zero_grad()
        with (kernels.disabled() if not fused else torch.enable_grad()):
            (q(x) * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append([x.grad.clone(), q.step.grad.clone(), *(p.grad.clone() for p in q.adapter.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre_activation, bound", [(1e4, 8.0), (-1e4, 1 / 8), (30.0, 8.0), (-30.0, 1 / 8)])
def test_beta_saturates_at_the_documented_bounds(pre_activation, bound):
    """docs/design.md §4.3: beta lies in [1/8, 8] and reaches its ends when the adapter saturates.

    The expectation is the specification's 8 and 1/8, not the module's own constant,
    so a bound of 4 or 64 (ln 4, ln 64) fails here.
    """
    a = Adapter(8)
    with torch.no_grad():
        a.fc2.weight.zero_()
        a.fc2.bias.fill_(pre_activation)
    beta = a(torch.rand(3, 8, 2, 2))
    torch.testing.assert_close(beta, torch.full((3,), bound), rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(z=st.floats(-1e6, 1e6, allow_nan=False))
def test_beta_stays_inside_the_bounds_and_is_one_at_zero(z):
    a = Adapter(4)
    with torch.no_grad():
        a.fc2.weight.zero_()
        a.fc2.bias.fill_(z)
    beta = a(torch.rand(1, 4)).detach().item()
    assert 1 / 8 - 1e-6 <= beta <= 8 + 1e-5
    if abs(z) < 1e-3:  # slope 1 at z = 0: beta = exp(z) to first order
        assert beta == pytest.approx(math.exp(z), rel=1e-5)


@pytest.mark.parametrize("channels, hidden", [(64, 16), (20, 5), (19, 4), (16, 4), (3, 4), (1, 4)])
def test_adapter_hidden_is_a_quarter_of_the_channels_but_at_least_four(channels, hidden):
    assert adapter_hidden(channels) == hidden
    assert Adapter(channels).fc1.out_features == hidden


def test_init_linear_draws_what_nn_linear_draws_from_the_generator():
    """The same weights and bias as ``nn.Linear``'s own initialisation, from the given generator alone."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 5)
    torch.manual_seed(123)  # the global RNG must play no part
    layer = torch.nn.utils.skip_init(torch.nn.Linear, 12, 5)
    init_linear(layer, torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)


def test_asq_quantizer_adapters_follow_the_generator_not_the_global_rng():
    torch.manual_seed(1)
    a = ASQQuantizer(4, signed=False, channels=8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = ASQQuantizer(4, signed=False, channels=8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.adapter.parameters(), b.adapter.parameters()))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_asq_codes_stay_in_range_for_signed_and_unsigned_inputs(signed, fused):
    """Outputs are the LSQ quantization at the per-sample step ``s * beta``, clamped to the code range."""
    from qcompiler import kernels

    torch.manual_seed(0)
    q = ASQQuantizer(3, signed=signed, channels=4)
    x = torch.randn(3, 4, 5, 5) * 4  # far past the range on both sides
    q.init_from(x.abs())
    torch.nn.init.normal_(q.adapter.fc2.weight, std=0.5)
    with torch.no_grad(), (contextlib.nullcontext() if fused else kernels.disabled()):
        out = q(x)
        step = q.sample_step(x)
    qmin, qmax = (-4, 3) if signed else (0, 7)
    assert (q.qmin, q.qmax) == (qmin, qmax)
    assert torch.equal(out, quantize_float(x, step, qmin, qmax) * step)
    codes = torch.round(out / step)
    assert codes.min() == qmin and codes.max() == qmax  # both ends reached, nothing beyond


def test_beta_pools_each_sample_over_all_positions():
    """beta depends on the channel means only: (N, C, L) and (N, C, H, W) of the same means give the same beta."""
    torch.manual_seed(0)
    a = Adapter(4)
    torch.nn.init.normal_(a.fc2.weight, std=0.5)
    means = torch.rand(3, 4)
    flat = means.view(3, 4, 1).expand(3, 4, 6).contiguous()
    square = means.view(3, 4, 1, 1).expand(3, 4, 2, 3).contiguous()
    torch.testing.assert_close(a(flat), a(means))
    torch.testing.assert_close(a(square), a(means))


def test_deployed_sample_step_is_the_float64_adapter_rounded_once() -> None:
    """Deployed (eval, no autograd), each sample's step is s * beta with the adapter run in float64
    from the module's weights and rounded once; in training the float32 adapter gives the same up to
    float32 rounding. Spelled out here from the adapter's formula, beta = exp(L tanh(z / L))."""
    torch.manual_seed(0)
    q = ASQQuantizer(4, signed=True, channels=6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q.step.fill_(-0.05)  # positive() takes |step|
        q.adapter.fc2.weight.normal_(0, 0.7)
        q.adapter.fc2.bias.fill_(0.2)
    x = torch.randn(5, 6, 4, 4) * 2
    w1, b1, w2, b2 = (t.detach().double() for t in q.adapter.weights())
    pooled = x.double().mean(dim=(2, 3))
    z = torch.relu(pooled @ w1.t() + b1) @ w2.t() + b2
    beta = torch.exp(BETA_BOUND * torch.tanh(z.squeeze(-1) / BETA_BOUND))
    want = (0.05 * beta).float().view(5, 1, 1, 1)
    q.eval()
    with torch.no_grad():
        deployed = q.sample_step(x)
    assert deployed.dtype == torch.float32 and deployed.shape == (5, 1, 1, 1)
    assert torch.equal(deployed, want)
    with torch.no_grad():  # the deployed forward: codes on those steps
        assert torch.equal(q(x), quantize_float(x, want, q.qmin, q.qmax) * want)
    q.train()
    training = q.sample_step(x)
    assert training.shape == (5, 1, 1, 1) and torch.allclose(training, want, rtol=1e-5)
    assert not torch.equal(want, torch.full_like(want, 0.05))  # the betas are away from 1: a lost beta would show
