"""Weights with the output channel first: the one layout every weight quantizer, code record and backend reads.

Conv and linear weights already are ``(out, in/groups, *kernel)``. A transposed conv
stores ``(in, out/groups, *kernel)``; its per-output-channel quantizer, its codes
(``qc.codes``) and the exactness bounds (:func:`qcompiler.nn.exact.exact_in`, one sum per
output channel) all use the equivalent conv's layout instead, so none of them needs a
channel axis of its own. :func:`channel_first` and :func:`from_channel_first` convert.

Example:
    >>> from torch import nn
    >>> m = nn.ConvTranspose1d(4, 6, 3, groups=2)
    >>> tuple(m.weight.shape), tuple(channel_weight(m).shape)
    ((4, 3, 3), (6, 2, 3))
    >>> torch.equal(from_channel_first(channel_first(m.weight, 2), 2), m.weight)
    True
"""

from __future__ import annotations

import torch
from torch import nn


def is_transposed(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvTransposeNd)


def channel_first(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv's ``(in, out/groups, *k)`` weight as ``(out, in/groups, *k)`` (group by group)."""
    n_in, out_g, kernel = w.shape[0], w.shape[1], w.shape[2:]
    return w.reshape(groups, n_in // groups, out_g, *kernel).transpose(1, 2).reshape(groups * out_g, n_in // groups, *kernel)


def from_channel_first(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`channel_first`: ``(out, in/groups, *k)`` back to ``(in, out/groups, *k)``."""
    n_out, in_g, kernel = w.shape[0], w.shape[1], w.shape[2:]
    return w.reshape(groups, n_out // groups, in_g, *kernel).transpose(1, 2).reshape(groups * in_g, n_out // groups, *kernel)


def channel_weight(m: nn.Module) -> torch.Tensor:
    """``m.weight`` with the output channel first (what ``m.weight_quant`` quantizes)."""
    return channel_first(m.weight, m.groups) if is_transposed(m) else m.weight


__all__ = ["channel_first", "channel_weight", "from_channel_first", "is_transposed"]
