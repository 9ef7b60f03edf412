"""Every quantizer's training output carries a recipe that makes it again bit for bit.

A QAT layer saves that recipe instead of the quantized tensor and reruns it in backward
(:mod:`qcompiler.nn.saved`); a recipe with a wrong argument would give the layer's backward
other values than its forward used. Checked here for each quantizer, on the fused kernels
and on the eager formulas."""

import contextlib

import pytest
import torch

from qcompiler import kernels
from qcompiler.nn import saved
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.power_grid import PowerGridQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer


def rerun(y: torch.Tensor) -> torch.Tensor:
    recipe = saved._recipe_of(y)
    assert recipe is not None, "the quantizer's output carries no recipe"
    return saved._Recipe(recipe, None).run()


def quantizers() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    act = torch.randn(4, 6, 5, 5) * 2
    weight = torch.randn(6, 3, 3, 3)
    per_tensor = UniformQuantizer(4, signed=True)
    per_tensor.init_from(act)
    unsigned = UniformQuantizer(3, signed=False)
    unsigned.init_from(act.relu())
    per_channel = UniformQuantizer(4, signed=True, channels=6)
    per_channel.init_weight(weight, "mse")
    asq = ASQQuantizer(4, signed=True, channels=6, generator=torch.Generator().manual_seed(1))
    asq.init_from(act)
    with torch.no_grad():
        asq.adapter.fc2.weight.normal_(0, 0.5)  # betas away from 1, so a wrong step shows
    pot, post = PowerGridQuantizer(4, "pot", channels=6), PowerGridQuantizer(4, "post", channels=6)
    for q in (pot, post):
        q.init_weight(weight, "mse")
    return {"lsq per tensor": (per_tensor, act), "lsq unsigned": (unsigned, act), "lsq per channel": (per_channel, weight),
            "asq": (asq, act), "pot": (pot, weight), "post": (post, weight)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("name", list(quantizers()))
def test_the_recipe_remakes_the_output(name: str, fused: bool) -> None:
    q, x = quantizers()[name]
    q.train()
    x = x.clone().requires_grad_(True)
    with contextlib.nullcontext() if fused else kernels.disabled():
        y = q(x)
    again = rerun(y)
    assert again.dtype == y.dtype and torch.equal(again, y.detach())


def test_a_recipe_fed_by_a_recipe_keeps_the_chain() -> None:
    """A quantizer reading another's output (a join's) saves the first one's recipe inside its own."""
    torch.manual_seed(0)
    first, second = UniformQuantizer(8, signed=True), UniformQuantizer(4, signed=True)
    x = (torch.randn(2, 3, 4, 4) * 3).requires_grad_(True)
    first.init_from(x.detach())
    second.init_from(x.detach())
    y = second(first(x))
    assert torch.equal(rerun(y), y.detach())
