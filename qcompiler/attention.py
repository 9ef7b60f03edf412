"""Front-end step: ``F.scaled_dot_product_attention`` spelled out as its two products.

The fused call hides ``q @ k^T`` and ``attn @ v`` from every pass; it is what
``nn.MultiheadAttention``-free models and transformers' default attention
(``attn_implementation="sdpa"``) compute. Written out as

    softmax(q @ k.transpose(-2, -1) * scale + mask) @ v

(a boolean mask becomes an additive one: 0 where attended, the dtype's minimum
elsewhere) the two products are ordinary ``matmul`` nodes that ``quantize-matmuls``
puts on grids. Only the eval-mode form is spelled out: a call with dropout, with
``is_causal`` or ``enable_gqa`` set, or with an argument computed in ``forward``
other than q, k, v and the mask stays fused (float, with the reason in the report).
Outputs agree with the fused kernel to float rounding.

Example:
    >>> import torch.nn.functional as F
    >>> class Attn(nn.Module):
    ...     def forward(self, q):
    ...         return F.scaled_dot_product_attention(q, q, q)
    >>> gm = fx.symbolic_trace(Attn()); x = torch.randn(2, 3, 4)
    >>> _ = ShapeProp(gm).propagate(x)
    >>> spell_out_attention(gm)
    1
    >>> torch.allclose(gm(x), F.scaled_dot_product_attention(x, x, x), atol=1e-6)
    True
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn  # noqa: F401 - the example's
from torch.fx.passes.shape_prop import ShapeProp  # noqa: F401 - the example's

from . import ir

_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _refusal(args: dict[str, object], head_dim: int | None) -> str | None:
    if args["dropout_p"] != 0.0:
        return "dropout inside attention (a training-mode call)"
    if args["is_causal"] is not False or args["enable_gqa"] is not False:
        return "is_causal or enable_gqa set (give the causal mask as attn_mask)"
    if isinstance(args["scale"], fx.Node) or (args["scale"] is None and head_dim is None):
        return "its scale is computed in forward or the query's shape is unknown"
    return None


def spell_out_attention(gm: fx.GraphModule) -> int:
    """Replace each eval-mode ``scaled_dot_product_attention`` by its ops (shapes must be propagated); returns how many."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        args = _DEFAULTS | dict(zip(_ARGS, node.args)) | dict(node.kwargs)
        q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
        meta = q.meta.get("tensor_meta") if isinstance(q, fx.Node) else None
        why = _refusal(args, meta.shape[-1] if meta is not None else None)
        if why is not None:
            node.meta[ir.FLOAT] = ir.FloatRegion(f"fused scaled_dot_product_attention: {why}")
            continue
        scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(meta.shape[-1])
        with graph.inserting_before(node):
            scores = graph.call_function(operator.matmul, (q, graph.call_method("transpose", (k, -2, -1))))
            scores = graph.call_function(operator.mul, (scores, float(scale)))
            if isinstance(mask, fx.Node):
                mask_meta = mask.meta.get("tensor_meta")
                if mask_meta is not None and mask_meta.dtype == torch.bool:  # True attends: 0, else the minimum
                    dtype = meta.dtype
                    mask = graph.call_method("to", (graph.call_method("logical_not", (mask,)), dtype))
                    mask = graph.call_function(operator.mul, (mask, torch.finfo(dtype).min))
                scores = graph.call_function(operator.add, (scores, mask))
            weights = graph.call_function(torch.softmax, (scores,), {"dim": -1})
            out = graph.call_function(operator.matmul, (weights, v))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


__all__ = ["spell_out_attention"]
