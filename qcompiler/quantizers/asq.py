"""ASQ: activation quantization whose step adapts to each input sample.

DESIGN.md §3.2: ``beta = adapter(x)`` per sample, ``s_a = s * beta``, then LSQ with
step ``s_a`` (quantize and dequantize with ``s_a``). Because ``s_a`` is an ordinary
product, autograd gives exactly the method's gradients, ``d/ds = beta * g`` and
``d/dbeta = s * g``, with ``g`` the LSQ step gradient per sample (reduced over that
sample's elements by :func:`lsq_quantize`).

The adapter guard. The published adapter ends in a ReLU with a floor of 1e-8: once
its pre-activation goes negative, ``beta`` is stuck at 1e-8, every code saturates,
the ReLU passes no gradient and the layer is dead for good. We end the adapter in
``beta = exp(L * tanh(z / L))`` with ``L = ln(8)`` instead: positive, equal to 1 with
slope 1 at ``z = 0`` (so it behaves like ``exp`` near the initial point), bounded to
``[1/8, 8]`` so the step can neither vanish nor explode, and with a gradient that is
never exactly zero, so the adapter can always recover. The last linear layer starts
near zero, so ``beta ≈ 1`` at initialisation and ASQ starts as plain LSQ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .uniform import UniformQuantizer, lsq_quantize, positive, quantize_codes

BETA_BOUND = math.log(8.0)  # beta stays in [1/8, 8]
MIN_HIDDEN = 4  # small-channel fallback: never fewer hidden units than this


def adapter_hidden(channels: int) -> int:
    """Hidden width of the adapter: ``C/4``, but at least ``MIN_HIDDEN``.

    >>> adapter_hidden(64), adapter_hidden(3)
    (16, 4)
    """
    return max(channels // 4, MIN_HIDDEN)


class Adapter(nn.Module):
    """Global average pool → Linear(C, C/4) → ReLU → Linear(C/4, 1) → bounded positive ``beta``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = adapter_hidden(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.normal_(self.fc2.weight, std=1e-3)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        z = self.fc2(torch.relu(self.fc1(pooled))).squeeze(-1)
        return torch.exp(BETA_BOUND * torch.tanh(z / BETA_BOUND))

    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def ops(self) -> int:
        """Multiplications per sample, counted like the paper's eq. 13 (``N_in * N_out``).

        The pooling is additions only, which the paper's operation count leaves out.
        """
        c, h = self.fc1.in_features, self.fc1.out_features
        return c * h + h


class ASQQuantizer(UniformQuantizer):
    """LSQ activation quantizer whose per-tensor step is scaled per sample by an adapter.

    Example:
        >>> q = ASQQuantizer(bits=4, signed=False, channels=8)
        >>> x = torch.rand(3, 8, 5, 5)
        >>> q.init_from(x)
        >>> q.beta(x).shape
        torch.Size([3])
    """

    def __init__(self, bits: int, signed: bool, channels: int) -> None:
        super().__init__(bits, signed)
        self.adapter = Adapter(channels)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample step factor, shape ``(batch,)``."""
        return self.adapter(x)

    def sample_step(self, x: torch.Tensor) -> torch.Tensor:
        """``s * beta`` shaped to broadcast over each sample of ``x``."""
        beta = self.beta(x)
        return (positive(self.step) * beta).view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(x, self.sample_step(x), self.qmin, self.qmax, self.grad_scale(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, self.sample_step(x), self.qmin, self.qmax)
