"""AdderConv2d: forward and AdderNet gradients against naive unfold-and-broadcast
definitions, bounded-memory chunking, training, tracing, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import DataError, QCompileError
from qcompiler.nn import AdderConv2d, adder_conv2d, adder_conv2d_train
from qcompiler.nn import adder as adder_mod

# (in, out, kernel, stride, padding, dilation, groups, batch, (H, W))
CONFIGS = [
    pytest.param(4, 6, 3, 1, 1, 1, 1, 3, (7, 6), id="3x3-s1-p1"),
    pytest.param(4, 6, 3, 2, 0, 1, 1, 1, (8, 9), id="3x3-s2-p0-b1"),
    pytest.param(4, 8, (3, 2), (2, 1), (1, 0), 1, 2, 3, (7, 5), id="3x2-s21-g2"),
    pytest.param(4, 4, 3, 1, 1, 1, 4, 3, (6, 6), id="depthwise"),
    pytest.param(3, 5, 3, 1, 2, 2, 1, 1, (7, 8), id="dilation2"),
    pytest.param(4, 4, (2, 4), 1, "same", (1, 2), 2, 3, (5, 7), id="same-even-kernel"),
    pytest.param(2, 3, 1, 2, 0, 1, 1, 3, (5, 5), id="1x1-s2"),
]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pads(padding, kernel, dilation):
    """(top, bottom, left, right), as nn.Conv2d resolves 'same'."""
    if padding == "same":
        th, tw = (d * (k - 1) for d, k in zip(_pair(dilation), _pair(kernel)))
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def naive_patches(x, weight, stride, padding, dilation):
    """Explicitly padded input and its patches (B, C*kh*kw, L)."""
    top, bottom, left, right = _pads(padding, weight.shape[2:], dilation)
    xp = F.pad(x, (left, right, top, bottom))
    return xp, F.unfold(xp, weight.shape[2:], dilation=dilation, stride=stride)


def naive_forward(x, weight, stride, padding, dilation, groups):
    xp, cols = naive_patches(x, weight, stride, padding, dilation)
    b, g, cout = x.shape[0], groups, weight.shape[0]
    cols = cols.view(b, g, 1, -1, cols.shape[-1])  # B, G, 1, Kg, L
    w = weight.reshape(g, cout // g, -1, 1)  # G, Cg, Kg, 1
    y = -(cols - w).abs().sum(3)  # B, G, Cg, L
    ref = F.conv2d(xp, weight, stride=stride, dilation=dilation, groups=groups)
    return y.reshape(ref.shape)


def naive_grads(x, weight, grad_out, stride, padding, dilation, groups):
    """AdderNet gradients by definition: dY/dW = X - W, dY/dX = HardTanh(W - X)."""
    xp, cols = naive_patches(x, weight, stride, padding, dilation)
    b, g, cout = x.shape[0], groups, weight.shape[0]
    cols = cols.view(b, g, 1, -1, cols.shape[-1])  # B, G, 1, Kg, L
    w = weight.reshape(g, cout // g, -1, 1)  # G, Cg, Kg, 1
    gy = grad_out.reshape(b, g, cout // g, 1, -1)  # B, G, Cg, 1, L
    grad_w = (gy * (cols - w)).sum(dim=(0, 4)).reshape(weight.shape)
    grad_cols = (gy * (w - cols).clamp(-1, 1)).sum(2).reshape(b, -1, cols.shape[-1])
    grad_xp = F.fold(grad_cols, xp.shape[2:], weight.shape[2:], dilation=dilation, stride=stride)
    top, _, left, _ = _pads(padding, weight.shape[2:], dilation)
    grad_x = grad_xp[:, :, top : top + x.shape[2], left : left + x.shape[3]]
    return grad_x, grad_w


def make(cin, cout, k, stride, padding, dilation, groups, batch, hw, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = AdderConv2d(cin, cout, k, stride, padding, dilation, groups, adaptive_lr=False, dtype=dtype)
    # Activations and weights on a scale where both clamp branches of HardTanh occur.
    x = (1.5 * torch.randn(batch, cin, *hw, dtype=dtype)).requires_grad_()
    return layer, x


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,batch,hw", CONFIGS)
def test_forward_matches_naive(cin, cout, k, stride, padding, dilation, groups, batch, hw, dtype):
    layer, x = make(cin, cout, k, stride, padding, dilation, groups, batch, hw, dtype)
    expected = naive_forward(x.detach(), layer.weight.detach(), stride, padding, dilation, groups)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False, dtype=dtype)
    assert layer(x).shape == conv(x).shape == expected.shape
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, **tol)
    args = (stride, padding, dilation, groups)
    torch.testing.assert_close(adder_conv2d(x.detach(), layer.weight.detach(), *args), expected, **tol)
    # With autograd requested the reference takes its differentiable (cdist) path.
    torch.testing.assert_close(adder_conv2d(x, layer.weight, *args), expected, **tol)


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,batch,hw", CONFIGS)
def test_gradients_match_addernet_definitions(cin, cout, k, stride, padding, dilation, groups, batch, hw):
    layer, x = make(cin, cout, k, stride, padding, dilation, groups, batch, hw)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    grad_x, grad_w = naive_grads(x.detach(), layer.weight.detach(), grad_out, stride, padding, dilation, groups)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-10, atol=1e-10)


def test_hardtanh_actually_clips():
    """The configs exercise both |W - X| <= 1 and > 1, so the clamp matters."""
    layer, x = make(4, 6, 3, 1, 1, 1, 1, 3, (7, 6))
    _, cols = naive_patches(x.detach(), layer.weight.detach(), 1, 1, 1)
    diff = layer.weight.detach().reshape(6, -1, 1).unsqueeze(0) - cols.unsqueeze(1)
    inside = (diff.abs() <= 1).double().mean()
    assert 0.2 < inside < 0.8


def test_adaptive_lr_scales_weight_grad_to_eta_sqrt_numel():
    cfg = (4, 6, 3, 1, 1, 1, 1, 3, (7, 6))
    plain, x = make(*cfg)
    adaptive, _ = make(*cfg)
    adaptive.adaptive_lr, adaptive.eta = True, 0.3
    grad_out = torch.randn(3, 6, 7, 6, dtype=torch.float64)
    plain(x).backward(grad_out)
    grad_x_plain = x.grad.clone()
    x.grad = None
    adaptive(x).backward(grad_out)
    gw = adaptive.weight.grad
    assert math.isclose(gw.norm().item(), 0.3 * math.sqrt(gw.numel()), rel_tol=1e-9)
    cosine = F.cosine_similarity(gw.flatten(), plain.weight.grad.flatten(), dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(x.grad, grad_x_plain)  # the input gradient is not rescaled


def test_adaptive_lr_zero_gradient_stays_zero():
    layer = AdderConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    layer(torch.randn(2, 2, 5, 5, dtype=torch.float64)).backward(torch.zeros(2, 3, 5, 5, dtype=torch.float64))
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,batch,hw", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[5]])
def test_tiny_chunk_budget_gives_same_results(monkeypatch, cin, cout, k, stride, padding, dilation, groups, batch, hw):
    layer, x = make(cin, cout, k, stride, padding, dilation, groups, batch, hw, dtype=torch.float32)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = (y.detach(), x.grad.clone(), layer.weight.grad.clone())
    calls = []
    original = adder_mod._rows_per_block
    monkeypatch.setattr(adder_mod, "_rows_per_block", lambda *a: calls.append(original(*a)) or calls[-1])
    for budget in (1, 3 * layer.weight.numel() * 4 + 7):  # one position per block; three per block
        monkeypatch.setattr(adder_mod, "CHUNK_BUDGET_BYTES", budget)
        calls.clear()
        x.grad, layer.weight.grad = None, None
        y = layer(x)
        y.backward(grad_out)
        assert calls and max(calls) == max(1, budget // (layer.weight.numel() * 4))
        torch.testing.assert_close(y, expected[0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(x.grad, expected[1], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad, expected[2], rtol=1e-6, atol=1e-5)


def test_block_buffer_respects_budget():
    weight3 = torch.zeros(1, 16, 144)
    budget = adder_mod.CHUNK_BUDGET_BYTES
    assert budget <= adder_mod.DEVICE_CHUNK_BUDGET_BYTES <= 64 * 2**20
    blocks, buf = adder_mod._blocks(64 * 32 * 32, weight3, budget)
    assert buf.numel() * buf.element_size() <= budget
    assert blocks[0][0] == 0 and blocks[-1][1] == 64 * 32 * 32
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert adder_mod._rows_per_block(weight3, 1) == 1  # never less than one position


def test_only_needed_gradients_are_computed():
    layer, x = make(4, 6, 3, 1, 1, 1, 1, 2, (5, 5))
    layer(x.detach()).sum().backward()  # input without grad
    assert layer.weight.grad is not None
    layer.weight.requires_grad_(False)
    layer(x).sum().backward()  # frozen weight
    assert x.grad is not None and x.grad.shape == x.shape


def test_bias_unbatched_and_extra_repr():
    layer = AdderConv2d(3, 4, 3, padding=1, bias=True)
    x = torch.randn(3, 6, 6)
    y = layer(x)
    assert y.shape == (4, 6, 6)
    expected = naive_forward(x[None], layer.weight.detach(), 1, 1, 1, 1)[0] + layer.bias.detach().view(-1, 1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert repr(layer) == "AdderConv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=True)"
    assert "groups=2" in repr(AdderConv2d(4, 4, 3, groups=2, adaptive_lr=False))
    assert AdderConv2d(4, 4, 3).bias is None


def test_reference_gradient_is_the_true_l1_gradient():
    """adder_conv2d differentiates -|x - w| exactly (sign), unlike training."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    adder_conv2d(x, w, padding=1).sum().backward()
    _, cols = naive_patches(x, w.detach(), 1, 1, 1)
    expected = torch.sign(cols.unsqueeze(1) - w.detach().reshape(1, 4, -1, 1)).sum(dim=(0, 3))
    torch.testing.assert_close(w.grad, expected.reshape(w.shape))


def test_integer_inputs_are_exact():
    x = torch.randint(0, 16, (2, 3, 6, 6))
    w = torch.randint(-8, 8, (4, 3, 3, 3))
    y = adder_conv2d(x, w, stride=1, padding=1)
    assert y.dtype == torch.int64
    assert torch.equal(y, naive_forward(x.double(), w.double(), 1, 1, 1, 1).long())


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = nn.Sequential(AdderConv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), AdderConv2d(8, 1, 3, padding=1), nn.BatchNorm2d(1))
    x = torch.randn(16, 2, 6, 6)
    target = F.avg_pool2d(x[:, :1], 3, 1, 1).sign()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fx_trace_not_as_leaf_and_as_leaf():
    model = nn.Sequential(AdderConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = torch.fx.symbolic_trace(model)  # enters forward: one wrapped call_function
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [adder_conv2d_train]
    torch.testing.assert_close(gm(x), model(x))

    class Leaf(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, AdderConv2d) or super().is_leaf_module(m, qualname)

    graph = Leaf().trace(model)
    assert [n.op for n in graph.nodes if n.op.startswith("call")] == ["call_module", "call_module"]
    torch.testing.assert_close(torch.fx.GraphModule(model, graph)(x), model(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, groups=4),
        dict(in_channels=0, out_channels=6, kernel_size=3),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 3, 3)),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=0),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=-1),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="full"),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", stride=2),
        dict(in_channels=4, out_channels=6, kernel_size=3, eta=0.0),
    ],
)
def test_bad_configuration_raises(kwargs):
    with pytest.raises(adder_mod.AdderConfigError) as info:
        AdderConv2d(**kwargs)
    assert isinstance(info.value, (QCompileError, ValueError)) and "\n" not in str(info.value)


def test_bad_inputs_raise_data_error():
    layer = AdderConv2d(3, 4, 3)
    with pytest.raises(DataError, match="input channels"):
        layer(torch.randn(1, 2, 5, 5))
    with pytest.raises(DataError, match="smaller than"):
        layer(torch.randn(1, 3, 2, 5))
    with pytest.raises(DataError, match="dtype"):
        layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(DataError, match="floating-point"):
        layer(torch.ones(1, 3, 5, 5, dtype=torch.int64))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        layer(torch.randn(5, 5))
    with pytest.raises(DataError, match="tensors"):
        adder_conv2d([[1.0]], layer.weight)


def test_empty_batch_and_no_output_channels():
    layer = AdderConv2d(3, 4, 3, padding=1)
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 4, 5, 5) and x.grad.shape == x.shape
    assert adder_conv2d(torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3), padding=1).shape == (2, 0, 5, 5)
