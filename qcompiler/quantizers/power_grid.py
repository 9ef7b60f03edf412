"""POT and POST weight grids: ``alpha * {0, ±r^-k}`` with ``r = 2`` or ``r = sqrt(2)``.

DESIGN.md §3.3. A b-bit code is a sign plus a (b-1)-bit magnitude index ``m``;
``m = 0`` means zero and ``m >= 1`` means ``r^-(m-1)``, so ``k = 0 .. 2^(b-1) - 2``
and the grid has ``2^b - 1`` distinct levels. (The papers list ``2^b + 1`` levels,
which cannot be stored in b bits.) Projection is to the nearest level; a value
exactly between two levels goes to the smaller magnitude. ``W`` gets a
straight-through gradient inside ``[-alpha, alpha]`` and none outside; ``alpha``
gets the LSQ-style gradient ``q(u) - u`` inside and ``sign(u)`` outside (``u = W /
alpha``), scaled by ``1 / sqrt(N * K)`` with ``N`` the weights of one output
channel and ``K = 2^(b-1) - 1`` the positive levels.

Hardware view: even ``k = 2j`` is a right shift by ``j``; odd ``k = 2j + 1`` is a
shift plus one multiply by ``1/sqrt(2)`` (a small table for POST).
"""

from __future__ import annotations

import math

import torch
from torch import nn

GRID_BASES = {"pot": 2.0, "post": math.sqrt(2.0)}


def power_levels(bits: int, base: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Magnitudes of the grid in ascending order: the level set, as a table.

    The quantizer projects in closed form; this table is the specification it is
    tested against and what backends can emit as a look-up table.

    ``levels[0] = 0`` and ``levels[i] = base^-(K - i)`` for ``i = 1..K``, so the last
    level is 1.

    >>> power_levels(3, 2.0).tolist()
    [0.0, 0.25, 0.5, 1.0]
    """
    k = 2 ** (bits - 1) - 1  # positive levels
    exps = torch.arange(k - 1, -1, -1, dtype=torch.float64)
    mags = torch.cat([torch.zeros(1, dtype=torch.float64), base ** (-exps)])
    return mags.to(dtype)


def _exponents(a: torch.Tensor, bits: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For magnitudes ``a = |u|``: the nearest level's exponent ``k`` and the zero mask.

    Closed form instead of a table search (``bucketize`` is ~10x slower here, and
    this runs on every weight at every QAT step): with ``t = -log_r a`` the nearest
    level lies between ``k0 = floor(t)`` and ``k0 + 1``, and it is ``k0 + 1`` exactly
    when ``frac(t) >= theta = -log_r((1 + 1/r) / 2)``, i.e. ``k = floor(t - theta) + 1``.
    Ties go to the smaller magnitude; ``a >= 1`` clips to ``k = 0``; at or below half
    the smallest level the weight is zero.
    """
    positive = 2 ** (bits - 1) - 1
    log_r = math.log2(base)
    theta = -math.log2((1 + 1 / base) / 2) / log_r
    k = torch.log2(a).mul_(-1 / log_r).sub_(theta - 1).floor_().clamp_(0, positive - 1)
    return k, a <= base ** (-(positive - 1)) / 2


def _levels(a: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Nearest level magnitude of ``a = |u|`` (in units of alpha)."""
    k, zero = _exponents(a, bits, base)
    return torch.where(zero, 0.0, torch.exp2(k.mul_(-math.log2(base))))


def _codes(u: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Signed magnitude codes ``sign * m``: ``m = 0`` is zero, else the level is ``base^-(m-1)``."""
    k, zero = _exponents(u.abs(), bits, base)
    m = (k + 1).masked_fill_(zero, 0.0)
    return (m * torch.sign(u)).to(torch.int64)


class _PowerGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha, bits: int, base: float, grad_scale: float):  # type: ignore[override]
        u = w / alpha
        a = u.abs()
        q = torch.copysign(_levels(a, bits, base), u)
        inside = a <= 1
        # d(q * alpha)/d alpha: q - u inside; outside q is exactly sign(u) = the clip.
        ctx.save_for_backward(inside, torch.where(inside, q - u, q), alpha)
        ctx.grad_scale = grad_scale
        return q * alpha

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, dalpha, alpha = ctx.saved_tensors
        grad_alpha = (dalpha * grad).sum_to_size(alpha.shape) * ctx.grad_scale
        return grad * inside, grad_alpha, None, None, None


class PowerGridQuantizer(nn.Module):
    """Per-output-channel POT / POST weight quantizer with a learned clip ``alpha``.

    Example:
        >>> q = PowerGridQuantizer(bits=3, grid="pot", channels=1)
        >>> q.alpha.data.fill_(1.0)
        tensor([1.])
        >>> q(torch.tensor([[0.9, -0.3, 0.05, 0.2]])).tolist()
        [[1.0, -0.25, 0.0, 0.25]]
    """

    def __init__(self, bits: int, grid: str, channels: int, init_quantile: float = 0.99) -> None:
        super().__init__()
        if grid not in GRID_BASES:
            raise ValueError(f"grid must be one of {sorted(GRID_BASES)}, got {grid!r}")
        self.bits, self.grid, self.base = bits, grid, GRID_BASES[grid]
        self.positive_levels = 2 ** (bits - 1) - 1
        self.init_quantile = init_quantile
        self.alpha = nn.Parameter(torch.ones(channels))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid={self.grid}, per-channel({self.alpha.numel()})"

    def _alpha_view(self, w: torch.Tensor) -> torch.Tensor:
        return self.alpha.abs().clamp_min(1e-8).view(-1, *([1] * (w.dim() - 1)))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """``alpha`` = a high quantile of ``|W|`` per output channel."""
        flat = w.detach().abs().flatten(1).float()
        self.alpha.copy_(torch.quantile(flat, self.init_quantile, dim=1).clamp_min(1e-6))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n = w[0].numel()
        scale = 1.0 / math.sqrt(n * self.positive_levels)
        return _PowerGrid.apply(w, self._alpha_view(w), self.bits, self.base, scale)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Signed magnitude codes ``sign * m`` (``m = 0`` is zero, else ``k = m - 1``)."""
        return _codes(w / self._alpha_view(w), self.bits, self.base)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Weights from codes: ``alpha * sign * base^-(m-1)`` (zero for ``m = 0``)."""
        m = codes.abs().double()
        mag = torch.where(m > 0, self.base ** (-(m - 1)), torch.zeros_like(m))
        alpha = self.alpha.abs().clamp_min(1e-8).double().view(-1, *([1] * (codes.dim() - 1)))
        return (torch.sign(codes).double() * mag * alpha).to(self.alpha.dtype)
