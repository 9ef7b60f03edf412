"""QAT layers recompute their quantized inputs in backward instead of keeping them (issue #16, memory).

The recomputed tensors must be the very bits the forward pass used, so every
gradient is unchanged: checked on compiled ResNet-20s, on the fused kernels and on
the eager quantizers.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler import kernels
from qcompiler.nn import saved
from qcompiler.nn.qat import QConv2d, QLinear
from qcompiler.quantizers import UniformQuantizer
from qcompiler.zoo import resnet20


def _compiled(passes: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet20(in_channels=3, num_classes=10, width=8)
    spec = qcompiler.QuantSpec(passes=passes, weight_bits=4, act_bits=4)
    return qcompiler.compile(model, spec, calib_data=torch.randn(16, 3, 16, 16)).module


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("passes", ["lsq", "asq,post"])
def test_gradients_are_bit_identical_with_and_without_recomputation(passes, fused):
    model = _compiled(passes)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with contextlib.nullcontext() if fused else kernels.disabled():
        loss, grads = _grads(model, x, y)
        model.load_state_dict(state)  # batch-norm running statistics moved
        with saved.disabled():
            ref_loss, ref = _grads(model, x, y)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref.keys() and len(ref) > 40
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters and ``x`` excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def record(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    inner = saved._pack
    saved._pack = lambda t: record(inner(t))  # what the QAT layers' own hooks keep
    try:
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            out = model(x)
    finally:
        saved._pack = inner
    del out
    return sum(seen.values())


def test_quantized_weights_and_inputs_are_not_kept_for_backward():
    torch.manual_seed(0)
    float_model = resnet20(in_channels=3, num_classes=10, width=8).train()
    x = torch.randn(8, 3, 16, 16)
    model = _compiled("lsq").train()
    kept = _saved_bytes(model, x)
    with saved.disabled():
        before = _saved_bytes(model, x)
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    assert before - kept >= weights  # at least every float32 copy of a weight is gone
    # The fused kernels keep only their input and step; the eager quantizers (the reference,
    # QCOMPILER_FUSED=0) also keep per-element gradient factors, which the target does not cover.
    from qcompiler import kernels

    bound = 1.1 if kernels.fused() is not None else 1.3
    assert kept <= bound * _saved_bytes(float_model, x)  # about what the float model keeps


def test_weight_changed_in_place_before_backward_is_an_error():
    layer = QConv2d(2, 3, 3)
    layer.weight_quant = UniformQuantizer(4, signed=True, channels=3)
    layer.weight_quant.init_from(layer.weight.detach())
    out = layer(torch.randn(1, 2, 5, 5, requires_grad=True)).sum()
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_eval_and_no_grad_forward_save_no_recipes():
    layer = QLinear(4, 3)
    layer.weight_quant = UniformQuantizer(4, signed=True, channels=3)
    assert not saved.active(layer.eval())
    layer.train()
    assert saved.active(layer)
    with torch.no_grad():
        assert not saved.active(layer)


def test_linear_saves_a_view_of_the_quantized_weight_as_a_recipe():
    layer = QLinear(4, 3)
    layer.weight_quant = UniformQuantizer(4, signed=True, channels=3)
    layer.weight_quant.init_from(layer.weight.detach())
    packed = []
    inner = saved._pack
    saved._pack = lambda t: packed.append(inner(t)) or packed[-1]
    try:
        x = torch.randn(5, 4, requires_grad=True)
        layer(x).sum().backward()
    finally:
        saved._pack = inner
    assert any(isinstance(p, saved._Recipe) and p.view is not None for p in packed)
    grad = x.grad.clone()
    x.grad = None
    with saved.disabled():
        layer(x).sum().backward()
    assert torch.equal(grad, x.grad)


def test_a_remembered_tensor_changed_in_place_is_saved_as_it_is():
    bn = torch.nn.BatchNorm2d(2).train()
    saved.recompute_output(bn)
    q = UniformQuantizer(4, signed=True).train()
    q.init_from(torch.randn(8))
    x = torch.randn(2, 2, 3, 3, requires_grad=True)

    def grads(in_place: bool):
        x.grad = None
        h = bn(x)
        if in_place:
            h.mul_(3.0)  # h is no longer the batch norm's output: its recipe must not be used
        (q(h) * torch.arange(h.numel()).view(h.shape)).sum().backward()
        return x.grad.clone(), q.step.grad.clone()

    for in_place in (False, True):
        q.step.grad = None
        got = grads(in_place)
        q.step.grad = None
        with saved.disabled():
            want = grads(in_place)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("grid", ["uniform", "post"])
def test_a_quantizer_called_outside_a_layer_leaves_the_callers_gradient_alone(grid):
    from qcompiler.quantizers.power_grid import PowerGridQuantizer

    q = UniformQuantizer(4, signed=True, channels=4) if grid == "uniform" else PowerGridQuantizer(4, "post", channels=4)
    w = torch.randn(4, 9)
    q.init_from(w)
    w.requires_grad_()
    g = torch.randn(4, 9)
    before = g.clone()
    q(w).backward(g)
    assert torch.equal(g, before) and w.grad.data_ptr() != g.data_ptr()


def _batch_norm_recipe(bn: torch.nn.Module, x: torch.Tensor):
    """The recipe ``recompute_output`` leaves on the batch norm's output, and that output."""
    saved.recompute_output(bn)
    out = bn(x)
    recipe = saved._recipe_of(out)
    assert recipe is not None
    return saved._Recipe(recipe, None), out


@pytest.mark.skipif(kernels.batch_norm_form() is None, reason="no fused batch-norm form here (kernels off or unbuilt)")
@pytest.mark.parametrize("shape", [(7, 6), (3, 5, 37), (4, 8, 9, 11), (16, 64, 16, 16), (2, 4, 3, 5, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_a_batch_norm_output_is_remade_from_its_saved_statistics_bit_for_bit(shape, affine):
    bn_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    bn = bn_class[len(shape)](shape[1], affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(-2, 2), bn.bias.normal_()
    x = (torch.randn(shape) * 5 + 3).requires_grad_()
    recipe, out = _batch_norm_recipe(bn, x)
    # one pass from the mean and 1/std the batch norm saved, not the batch norm again
    assert recipe.fn is kernels.fused().batch_norm_output
    assert torch.equal(recipe.run(), out)


def test_a_batch_norm_output_without_a_fused_form_runs_the_batch_norm_again(monkeypatch):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    # a channels-last input is not the layout the fused form reads
    recipe, out = _batch_norm_recipe(torch.nn.BatchNorm2d(3).train(), x.to(memory_format=torch.channels_last))
    assert recipe.fn is saved._batch_norm_values
    assert torch.equal(recipe.run(), out)
    monkeypatch.setattr(kernels, "batch_norm_form", lambda: None)  # kernels off, or no form matched ATen's
    recipe, out = _batch_norm_recipe(torch.nn.BatchNorm2d(3).train(), x)
    assert recipe.fn is saved._batch_norm_values
    assert torch.equal(recipe.run(), out)
