"""The compiled module trains on a CUDA device: compile on the CPU, move, step, compare.

The fused kernels are CPU-only (:func:`qcompiler.kernels.usable` declines other
devices), so on CUDA every quantizer runs its eager formulation. Each test runs
the same thing on the CPU (eager quantizers too) and on the GPU and compares.
Exact equality is not expected: cuDNN sums in another order, and a sum that
lands on the other side of a rounding boundary moves one code by one step. So
the checks are "almost every element equal, the rest close".

Skipped without CUDA. ``DEVICE`` can be pointed at ``cpu`` to check the test logic
itself on a machine without a GPU (``QCOMPILER_TEST_DEVICE=cpu``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler import kernels
from qcompiler.data import load_digits
from qcompiler.quantizers import UniformQuantizer
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.power_grid import PowerGridQuantizer
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import adder_resnet20, plain_cnn, resnet20

DEVICE = os.environ.get("QCOMPILER_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _full_fp32():
    """No TF32: its 10-bit mantissas would move far more codes than summation order does."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_mostly_equal(got: torch.Tensor, want: torch.Tensor, share: float = 0.99, rtol: float = 1e-4) -> None:
    """At least ``share`` of the elements within ``rtol`` of ``want``'s scale, and all within 20 % of it."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    scale = max(float(want.abs().max()), 1e-12)
    diff = (got - want).abs() / scale
    assert float((diff <= rtol).double().mean()) >= share, f"only {float((diff <= rtol).double().mean()):.4f} close"
    assert float(diff.max()) <= 0.2, f"max relative difference {float(diff.max()):.3g}"


QUANTIZERS = {
    "lsq-per-tensor": (lambda: UniformQuantizer(4, signed=False), (8, 6, 5, 5)),
    "lsq-per-channel": (lambda: UniformQuantizer(4, signed=True, channels=6), (6, 3, 3, 3)),
    "asq": (lambda: ASQQuantizer(4, signed=False, channels=6, generator=torch.Generator().manual_seed(0)), (8, 6, 5, 5)),
    "pot": (lambda: PowerGridQuantizer(4, "pot", channels=6), (6, 3, 3, 3)),
    "post": (lambda: PowerGridQuantizer(4, "post", channels=6), (6, 3, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizer_forward_and_gradients_match_the_cpu(name: str) -> None:
    make, shape = QUANTIZERS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).abs()
    cpu = make()
    cpu.init_from(x)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    xc, xg = x.clone().requires_grad_(), x.to(DEVICE).requires_grad_()
    with kernels.disabled():  # the reference: eager on the CPU
        yc = cpu(xc)
        yc.square().sum().backward()
    yg = gpu(xg)
    assert yg.device.type == torch.device(DEVICE).type
    yg.square().sum().backward()
    assert_mostly_equal(yg, yc)
    assert_mostly_equal(xg.grad, xc.grad)
    for (pname, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        assert pg.grad is not None and pg.grad.device == pg.device, pname
        assert_mostly_equal(pg.grad, pc.grad, share=0.9, rtol=1e-3)


SPECS = {
    "lsq": (lambda: plain_cnn(1, 10, width=4), qcompiler.QuantSpec(passes="lsq", weight_bits=4, act_bits=4)),
    "asq-post": (lambda: resnet20(1, 10, width=4), qcompiler.QuantSpec(passes="asq,post", weight_bits=4, act_bits=4)),
    "adder": (
        lambda: adder_resnet20(1, 10, width=4),
        qcompiler.QuantSpec(passes="outlier-clamp,adder-groups", weight_bits=4, act_bits=4),
    ),
}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _compiled(name: str, digits) -> torch.fx.GraphModule:
    make, spec = SPECS[name]
    torch.manual_seed(0)
    return qcompiler.compile(make(), spec, calib_data=digits.x_train[:128]).module


def _qat_step(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step in training mode; returns the logits of the step."""
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    module.train()
    out = module(x)
    F.cross_entropy(out, y).backward()
    opt.step()
    module.eval()
    return out


@pytest.mark.parametrize("name", sorted(SPECS))
def test_compiled_module_trains_on_the_device_like_on_the_cpu(name: str, digits) -> None:
    """Compile on the CPU, move to the device: eval forward, one QAT step and its updates agree with the CPU."""
    cpu = _compiled(name, digits)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x, y = digits.x_train[:64], digits.y_train[:64]
    with torch.no_grad(), kernels.disabled():
        want = cpu(x)
    with torch.no_grad():
        got = gpu(x.to(DEVICE))
    assert got.device.type == torch.device(DEVICE).type
    assert_mostly_equal(got, want, share=0.95)
    assert float((got.argmax(1).cpu() == want.argmax(1)).double().mean()) >= 0.95

    before = {k: v.detach().clone() for k, v in gpu.named_parameters()}
    with kernels.disabled():
        out_cpu = _qat_step(cpu, x, y)
    out_gpu = _qat_step(gpu, x.to(DEVICE), y.to(DEVICE))
    assert torch.isfinite(out_gpu).all()
    assert_mostly_equal(out_gpu, out_cpu, share=0.95)
    moved = [k for k, v in gpu.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert any(k.endswith((".step", ".alpha")) for k in moved), "no quantizer parameter was updated"
    cpu_params = dict(cpu.named_parameters())
    for k in moved:
        update_gpu, update_cpu = gpu.get_parameter(k).detach().cpu() - before[k].cpu(), cpu_params[k].detach() - before[k].cpu()
        # the same direction: a flipped code changes a gradient, not the whole update
        cos = F.cosine_similarity(update_gpu.flatten().double(), update_cpu.flatten().double(), dim=0)
        assert float(cos) > 0.9 or float(update_cpu.abs().max()) < 1e-6, k


def test_train_and_evaluate_on_the_device(digits) -> None:
    """``qcompiler.train`` moves each batch to the module's device."""
    module = _compiled("lsq", digits).to(DEVICE)
    small = qcompiler.data.Dataset(digits.x_train[:256], digits.y_train[:256], digits.x_test[:128], digits.y_test[:128])
    losses = train(module, small, TrainConfig(epochs=2, lr=0.05), progress=False)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert 0.0 <= evaluate(module, small) <= 100.0
    assert all(p.device.type == torch.device(DEVICE).type for p in module.parameters())
