"""``TracedMultiheadAttention``: the same function as ``nn.MultiheadAttention`` (float, 1e-6), and where the front end uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompiler import ir
from qcompiler.frontend import trace
from qcompiler.nn.attention import TracedMultiheadAttention, unsupported_reason


def _pair(batch_first: bool, **kwargs) -> tuple[nn.MultiheadAttention, TracedMultiheadAttention]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs).eval()
    return mha, TracedMultiheadAttention.from_module(mha).eval()


def _inputs(batch_first: bool, kdim: int = 8, vdim: int = 8) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 4, kdim), torch.randn(3, 4, vdim)
    return (q, k, v) if batch_first else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


def _close(a, b) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_equals_the_original_without_masks(batch_first: bool, need_weights: bool, average: bool) -> None:
    mha, traced = _pair(batch_first)
    q, k, v = _inputs(batch_first)
    for grad in (False, True):  # no_grad takes torch's fused fast path where it applies
        with torch.set_grad_enabled(grad):
            want = mha(q, k, v, need_weights=need_weights, average_attn_weights=average)
            got = traced(q, k, v, need_weights=need_weights, average_attn_weights=average)
        _close(got[0], want[0])
        _close(got[1], want[1])


MASKS = {
    "bool attn_mask": lambda: {"attn_mask": torch.triu(torch.ones(5, 4, dtype=torch.bool), diagonal=1)},
    "float attn_mask": lambda: {"attn_mask": torch.randn(5, 4)},
    "per-head attn_mask": lambda: {"attn_mask": torch.randn(3 * 2, 5, 4)},
    "bool key_padding_mask": lambda: {"key_padding_mask": torch.tensor([[False] * 4, [False, False, False, True], [False, True, True, True]])},
    "both": lambda: {"attn_mask": torch.triu(torch.ones(5, 4, dtype=torch.bool), diagonal=1),
                     "key_padding_mask": torch.tensor([[False] * 3 + [True]] * 3)},
}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_equals_the_original_with_masks(mask: str, need_weights: bool) -> None:
    mha, traced = _pair(batch_first=True)
    q, k, v = _inputs(True)
    torch.manual_seed(2)
    kwargs = MASKS[mask]()
    with torch.no_grad():
        want, got = mha(q, k, v, need_weights=need_weights, **kwargs), traced(q, k, v, need_weights=need_weights, **kwargs)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_separate_key_and_value_widths_and_no_bias() -> None:
    mha, traced = _pair(batch_first=True, kdim=6, vdim=3, bias=False)
    q, k, v = _inputs(True, kdim=6, vdim=3)
    with torch.no_grad():
        _close(traced(q, k, v)[0], mha(q, k, v)[0])
    assert traced.k_proj.in_features == 6 and traced.v_proj.in_features == 3 and traced.q_proj.bias is None


def test_dropout_follows_the_mode() -> None:
    mha, traced = _pair(batch_first=True, dropout=0.5)
    q, k, v = _inputs(True)
    _close(traced(q, k, v)[0], mha(q, k, v)[0])  # eval: no dropout in either
    traced.train()
    torch.manual_seed(3)
    a = traced(q, k, v)[0]
    torch.manual_seed(4)
    assert not torch.equal(a, traced(q, k, v)[0])


class _Block(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn, self.fc = mha, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x)
        return self.fc(y.mean(-2))


def test_the_front_end_replaces_it_and_the_graph_computes_the_same() -> None:
    torch.manual_seed(0)
    model = _Block(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    x = torch.randn(3, 5, 8)
    gm = trace(model, (x,))
    assert [n.name for n in ir.compute_layers(gm)] == ["attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_out_proj", "fc"]
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is untouched
    # the head-averaged weights nothing reads are not in the graph
    assert not [n for n in gm.graph.nodes if n.target == "mean" and "attn" in str(n.meta.get("nn_module_stack", ""))]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,x,reason", [
    ({"add_bias_kv": True}, torch.randn(3, 5, 8), "add_bias_kv or add_zero_attn"),
    ({}, torch.randn(5, 8), "unbatched (2-d) inputs"),
])
def test_unsupported_forms_stay_a_float_leaf_with_the_reason(kwargs: dict, x: torch.Tensor, reason: str) -> None:
    torch.manual_seed(0)
    gm = trace(_Block(nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)).eval(), (x,))
    assert [n.name for n in ir.compute_layers(gm)] == ["fc"]
    assert reason in unsupported_reason(gm.get_submodule("attn"))
