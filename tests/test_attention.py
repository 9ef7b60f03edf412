"""qcompiler.attention: fused scaled-dot-product attention spelled out as two quantizable products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.frontend import trace
from numeric_checks import relative_error


class Fused(nn.Module):
    """Projections around one fused attention call, with a mask of the given kind."""

    def __init__(self, mask: str = "none", **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.o, self.mask, self.kwargs = nn.Linear(8, 24), nn.Linear(8, 8), mask, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = None
        if self.mask == "bool":  # True attends: a causal mask
            mask = torch.ones((x.size(1), x.size(1)), dtype=torch.bool).tril()
        elif self.mask == "float":
            mask = torch.ones((x.size(1), x.size(1))).triu(1) * -1e4
        return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs))


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_the_spelled_out_attention_computes_the_fused_call(mask: str) -> None:
    model, x = Fused(mask).eval(), torch.randn(4, 6, 8)
    gm = trace(model, (x[:1],))
    assert not [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len([n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "matmul"]) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_both_products_are_quantized_and_close_to_float_at_8_bits() -> None:
    model, x = Fused("bool").eval(), torch.randn(64, 6, 8)
    compiled = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq", weight_bits=8, act_bits=8), calib_data=x)
    assert [r.kind for r in compiled.report.layers] == ["linear", "matmul", "matmul", "linear"]
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 0.02


@pytest.mark.parametrize("kwargs, why", [({"is_causal": True}, "is_causal"), ({"dropout_p": 0.1}, "dropout")])
def test_other_forms_stay_fused_and_say_why(kwargs: dict, why: str) -> None:
    gm = trace(Fused(**kwargs), (torch.randn(1, 6, 8),))
    node = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert why in ir.get(node, ir.FLOAT, ir.FloatRegion).reason
