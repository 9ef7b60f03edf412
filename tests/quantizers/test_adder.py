"""QAdderConv2d: weight codes on the group grid, symmetric extremes, and the straight-through estimator."""

import pytest
import torch

from qcompiler.nn.adder import AdderConv2d
from qcompiler.numerics import adder_weight_step_ratio
from qcompiler.quantizers.adder import QAdderConv2d


def _layer(weight: torch.Tensor, r_g: float, act_bits: int, weight_bits: int) -> QAdderConv2d:
    """One scale group of range ``r_g``, with the act step computed as the pass does."""
    float_layer = AdderConv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=1)
    with torch.no_grad():
        float_layer.weight.copy_(weight)
    groups = torch.zeros(weight.shape[0], dtype=torch.int64)
    return QAdderConv2d.from_float(float_layer, groups, torch.tensor([r_g / (2**act_bits - 1)]), act_bits, weight_bits)


@pytest.mark.parametrize("act_bits, weight_bits", [(3, 3), (4, 4), (5, 5), (8, 8), (8, 4), (6, 3)])
@pytest.mark.parametrize("r_g", [0.35, 1.0, 2.6, 3.4723034])
def test_weights_at_the_group_range_get_symmetric_extreme_codes(act_bits, weight_bits, r_g):
    """±r_g, exactly and one float32 ulp either side, is ±qmax: ties cannot make the extremes asymmetric."""
    r = torch.tensor(r_g, dtype=torch.float32)
    extremes = torch.stack([r, torch.nextafter(r, torch.tensor(9.0)), torch.nextafter(r, torch.tensor(0.0))])
    weight = torch.cat([extremes, -extremes, torch.zeros(3)]).view(1, 1, 3, 3)
    q = _layer(weight, float(r), act_bits, weight_bits)
    codes = q.weight_codes().flatten()
    qmax = 2 ** (weight_bits - 1) - 1
    assert codes[:3].tolist() == [qmax] * 3 and codes[3:6].tolist() == [-qmax] * 3
    assert q.weight_step_ratio == adder_weight_step_ratio(act_bits, weight_bits)


def test_training_output_is_the_quantized_one_and_gradients_are_the_float_layers():
    torch.manual_seed(0)
    weight = torch.rand(4, 3, 3, 3) * 2 - 1
    q = _layer(weight, 1.0, 4, 4)
    float_layer = AdderConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        float_layer.weight.copy_(weight)
    x = torch.rand(2, 3, 5, 5) * 1.2
    upstream = torch.randn(2, 4, 5, 5)

    with torch.no_grad():
        eval_out = q.eval()(x)
    x_q = x.clone().requires_grad_()
    out = q.train()(x_q)
    assert torch.equal(out.detach(), eval_out)
    out.backward(upstream)

    x_f = x.clone().requires_grad_()
    float_layer(x_f).backward(upstream)
    torch.testing.assert_close(x_q.grad, x_f.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.weight.grad, float_layer.weight.grad, rtol=0, atol=0)


def test_eval_and_no_grad_forward_build_no_graph():
    q = _layer(torch.rand(2, 1, 3, 3), 1.0, 4, 4)
    x = torch.rand(1, 1, 4, 4, requires_grad=True)
    assert not q.eval()(x).requires_grad
    with torch.no_grad():
        assert not q.train()(x).requires_grad


@pytest.mark.parametrize("adaptive_lr", [True, False])
def test_training_gradients_follow_the_layers_adaptive_lr_setting(adaptive_lr):
    """The straight-through gradients are the float layer's with the same ``eta`` and ``adaptive_lr``."""
    torch.manual_seed(0)
    weight = torch.rand(4, 3, 3, 3) * 2 - 1
    float_layer = AdderConv2d(3, 4, 3, padding=1, eta=0.5, adaptive_lr=adaptive_lr)
    with torch.no_grad():
        float_layer.weight.copy_(weight)
    q = QAdderConv2d.from_float(float_layer, torch.zeros(4, dtype=torch.int64), torch.tensor([1 / 15]), 4, 4)
    x, upstream = torch.rand(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    q.train()(x).backward(upstream)
    reference = AdderConv2d(3, 4, 3, padding=1, eta=0.5, adaptive_lr=adaptive_lr)
    with torch.no_grad():
        reference.weight.copy_(weight)
    reference(x).backward(upstream)
    torch.testing.assert_close(q.weight.grad, reference.weight.grad, rtol=0, atol=0)
    other = AdderConv2d(3, 4, 3, padding=1, eta=0.5, adaptive_lr=not adaptive_lr)
    with torch.no_grad():
        other.weight.copy_(weight)
    other(x).backward(upstream)
    assert not torch.allclose(q.weight.grad, other.weight.grad)  # the setting matters for this input


@pytest.mark.parametrize("train", [False, True])
def test_bias_adds_per_output_channel_and_restores_the_clamped_float_layer(train):
    """The lossless clamp at the layer: weights clipped to +-r, the bias b[c] = -sum max(|W[c]| - r, 0)
    (docs/design.md §4.5 step 3); on inputs in [0, r] the 16-bit layer is the float layer."""
    torch.manual_seed(0)
    r = 1.0
    weight = (torch.rand(5, 3, 3, 3) * 2 - 1) * 3  # most channels reach past r
    float_layer = AdderConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        float_layer.weight.copy_(weight)
    x = torch.rand(2, 3, 6, 6) * r
    with torch.no_grad():
        reference = float_layer(x)
    compensation = -(weight.abs() - r).clamp_min(0).flatten(1).sum(1)
    clamped = AdderConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        clamped.weight.copy_(weight.clamp(-r, r))
    clamped.bias = torch.nn.Parameter(compensation.clone())
    q = QAdderConv2d.from_float(clamped, torch.zeros(5, dtype=torch.int64), torch.tensor([r / (2**16 - 1)]), 16, 16)
    q.train(train)
    with torch.set_grad_enabled(train):
        out = q(x)
    no_bias = q.quantized_forward(x)
    torch.testing.assert_close(out.detach(), no_bias + compensation.view(1, -1, 1, 1), rtol=0, atol=1e-5)
    assert float((out.detach() - reference).norm() / reference.norm()) < 1e-3


def test_from_float_stores_int64_groups_and_float32_steps():
    layer = AdderConv2d(2, 3, 3, padding=1)
    q = QAdderConv2d.from_float(layer, torch.tensor([0, 1, 0], dtype=torch.int32), torch.tensor([0.1, 0.2], dtype=torch.float64), 4, 4)
    assert q.group_of_channel.dtype == torch.int64 and q.group_of_channel.tolist() == [0, 1, 0]
    assert q.act_steps.dtype == torch.float32 and torch.equal(q.act_steps, torch.tensor([0.1, 0.2]))
