"""``nn.MultiheadAttention`` as ``nn.Linear`` layers and tensor ops that ``torch.fx`` traces through.

``nn.MultiheadAttention`` is one opaque leaf holding its projections as raw parameters
(``in_proj_weight`` or ``q/k/v_proj_weight``, and ``out_proj``), so no pass can reach
them. :class:`TracedMultiheadAttention` computes the same function from four
``nn.Linear`` layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) holding copies of
those parameters, which the passes then quantize like any linear layer, inputs included.
The products between activations (``q k^T`` and ``attn v``) are quantized on both
operands by the ``quantize-matmuls`` pass; the softmax stays float, and the report says so.

The front end (:func:`expand_attention`) replaces a module only where every call of it
is one this class computes exactly (:func:`unsupported_reason`); any other stays a float
leaf, and its row in the layer table gives the reason.

Example:
    >>> torch.manual_seed(0) and None
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> traced = TracedMultiheadAttention.from_module(mha).eval()
    >>> bool(torch.allclose(traced(x, x, x)[0], mha(x, x, x)[0], atol=1e-6))
    True
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

__all__ = ["TracedMultiheadAttention", "call_reason", "mark_unsupported", "unsupported_reason"]

_UNSUPPORTED = "_qc_float_reason"  # set on a module by the front end when one of its calls is not supported


def unsupported_reason(m: nn.MultiheadAttention) -> str | None:
    """Why ``m`` cannot become a :class:`TracedMultiheadAttention`, or None when it can."""
    if getattr(m, _UNSUPPORTED, None):
        return getattr(m, _UNSUPPORTED)
    if m.bias_k is not None or m.add_zero_attn:
        return "MultiheadAttention with add_bias_kv or add_zero_attn stays float (no traceable form here)"
    return None


def mark_unsupported(m: nn.MultiheadAttention, reason: str) -> None:
    """Record on ``m`` why it stays float (a plain attribute: no state dict entry)."""
    setattr(m, _UNSUPPORTED, reason)


def call_reason(query_rank: int | None, need_weights: object, average: object, is_causal: object, has_mask: bool) -> str | None:
    """Why one call of an ``nn.MultiheadAttention`` is not one :class:`TracedMultiheadAttention` computes, or None."""
    if query_rank != 3:
        return "MultiheadAttention called on unbatched (2-d) inputs stays float; give (N, L, E) or (L, N, E) inputs"
    if not all(isinstance(v, bool) for v in (need_weights, average, is_causal)):
        return "MultiheadAttention called with need_weights/average_attn_weights/is_causal computed at run time stays float"
    if is_causal and not has_mask:
        return "MultiheadAttention called with is_causal=True but no attn_mask stays float (torch requires the mask)"
    return None


@torch.fx.wrap
def _masked(scores: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (N, H, L, S) plus the additive forms of the masks, as torch merges them.

    A boolean mask's True entries are excluded (``-inf``); a float mask is added as is. A
    3-d ``attn_mask`` is per batch and head, ``(N * H, L, S)``. Wrapped: fx records one call,
    run on the real masks, whose dtype and rank tracing cannot see.
    """
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(scores.dtype)

    n, h, l, s = scores.shape
    if attn_mask is not None:
        mask = additive(attn_mask)
        scores = scores + (mask.reshape(n, h, l, s) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        scores = scores + additive(key_padding_mask).reshape(n, 1, 1, s)
    return scores


class TracedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s function (batched inputs, with or without masks) from four ``nn.Linear``s.

    Follows ``F.multi_head_attention_forward``'s order of float operations: the query is
    scaled by ``sqrt(1 / head_dim)`` before ``q k^T``, masks are added, softmax, dropout (an
    ``nn.Dropout``, active in training only, as in the original), ``attn v``, ``out_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, dropout: float,
                 batch_first: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> TracedMultiheadAttention:
        """The equivalent of ``m``, with copies of its parameters (in its dtype and device, and mode)."""
        t = cls(m.embed_dim, m.num_heads, m.kdim, m.vdim, m.in_proj_bias is not None, m.dropout, m.batch_first)
        t = t.to(device=m.out_proj.weight.device, dtype=m.out_proj.weight.dtype)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                weights = m.in_proj_weight.chunk(3)
            else:
                weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            biases = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
            for proj, w, b in zip((t.q_proj, t.k_proj, t.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            t.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                t.out_proj.bias.copy_(m.out_proj.bias)
        return t.train(m.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, H, L, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        if not self.batch_first:  # (L, N, E) -> (N, L, E): the projections act per token either way
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if attn_mask is not None or key_padding_mask is not None:
            scores = _masked(scores, attn_mask, key_padding_mask)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = self.out_proj(torch.matmul(attn, v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn
