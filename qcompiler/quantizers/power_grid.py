"""POT and POST weight grids: ``alpha * {0, ±r^-k}`` with ``r = 2`` or ``r = sqrt(2)``.

docs/design.md §4.4. A b-bit code is a sign plus a (b-1)-bit magnitude index ``m``;
``m = 0`` means zero and ``m >= 1`` means ``r^-(m-1)``, so ``k = 0 .. 2^(b-1) - 2``
and the grid has ``2^b - 1`` distinct levels. (The papers list ``2^b + 1`` levels,
which cannot be stored in b bits.) Projection is to the nearest level; a value
exactly between two levels goes to the smaller magnitude. ``W`` gets a
straight-through gradient inside ``[-alpha, alpha]`` and none outside; ``alpha``
gets the LSQ-style gradient ``q(u) - u`` inside and ``sign(u)`` outside (``u = W /
alpha``), scaled by ``1 / sqrt(N * K)`` with ``N`` the weights of one output
channel and ``K = 2^(b-1) - 1`` the positive levels.

Hardware view: even ``k = 2j`` is a right shift by ``j``; odd ``k = 2j + 1`` is a
shift plus one multiply by ``1/sqrt(2)`` (a small table for POST). The projection,
the level table and the POST constant are in :mod:`qcompiler.numerics`; this module
holds the learned clip and the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from .. import kernels
from . import init
from ..nn import exact
from ..nn.qat import WeightKernels
from ..nn.saved import remember
from ..numerics import GRID_BASES, GridThresholds, grid_codes, grid_levels, grid_thresholds, largest_exponent, power_levels
from .uniform import MIN_STEP, positive

# The grid machinery lives in qcompiler.numerics; these names stay importable from here.
__all__ = ["GRID_BASES", "GridThresholds", "PowerGridQuantizer", "grid_thresholds", "power_levels"]

@functools.lru_cache(maxsize=None)
def _kernel_grid(bits: int, base: float) -> tuple:
    """The grid's thresholds as the kernels take them (``GridThresholds``' fields in order),
    made once: ``dataclasses.astuple`` deep-copies, ~4 us per call on every QAT forward."""
    return dataclasses.astuple(grid_thresholds(bits, base))


class _PowerGrid(torch.autograd.Function):
    """The reference formulation; :class:`_FusedPowerGrid` runs it on :mod:`qcompiler.kernels`."""

    @staticmethod
    def forward(ctx, w, alpha, bits: int, base: float, grad_scale: float):  # type: ignore[override]
        u = w / alpha
        a = u.abs()
        q = torch.copysign(grid_levels(a, bits, base), u)
        inside = a <= 1
        # d(q * alpha)/d alpha: q - u inside; outside q is exactly sign(u) = the clip.
        ctx.save_for_backward(inside, torch.where(inside, q - u, q), alpha)
        ctx.grad_scale = grad_scale
        # a layer saving the values keeps this recipe for them instead (the same ops again)
        return remember(q * alpha, _grid_values, w, alpha, bits, base)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, dalpha, alpha = ctx.saved_tensors
        grad_alpha = (dalpha * grad).sum_to_size(alpha.shape) * ctx.grad_scale
        return grad * inside, grad_alpha, None, None, None


def _grid_values(w: torch.Tensor, alpha: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """The forward values of :class:`_PowerGrid`, computed as it does."""
    u = w / alpha
    return torch.copysign(grid_levels(u.abs(), bits, base), u) * alpha


class _FusedPowerGrid(torch.autograd.Function):
    """:class:`_PowerGrid` on the fused kernels, taking the raw learned ``alpha`` (one per output channel).

    ``positive(alpha)`` happens inside, so the quantizer is one autograd node; the
    kernels recompute the gradient factors in backward from the saved weights.
    """

    @staticmethod
    def forward(ctx, w, alpha, grid: tuple, grad_scale: float, kernel):  # type: ignore[override]
        w, rows = w.contiguous(), kernel.positive_rows(alpha, MIN_STEP)  # positive(alpha)
        ctx.kernel, ctx.grad_scale = kernel, grad_scale
        ctx.grid = grid  # _kernel_grid: GridThresholds' fields, the kernels' argument order
        ctx.save_for_backward(w, rows, alpha)
        return remember(kernel.power_forward(w, rows, *ctx.grid), kernel.power_forward, w, rows, *ctx.grid)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, rows, alpha = ctx.saved_tensors
        grad_w, grad_rows = ctx.kernel.power_backward(grad, w, rows, *ctx.grid, ctx.grad_scale)
        grad_alpha = ctx.kernel.positive_grad(alpha, grad_rows, MIN_STEP) if ctx.needs_input_grad[1] else None
        return grad_w if ctx.needs_input_grad[0] else None, grad_alpha, None, None, None


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
        return positive(self.alpha).view(-1, *([1] * (w.dim() - 1)))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """``alpha`` = a high quantile of ``|W|`` per output channel."""
        flat = w.detach().abs().flatten(1).float()
        self.alpha.copy_(torch.quantile(flat, self.init_quantile, dim=1).clamp_min(1e-6))

    @torch.no_grad()
    def init_mse(self, w: torch.Tensor) -> None:
        """``alpha`` per output channel with the least squared error on ``w``, through the grid's own
        values; never worse than the quantile start (:meth:`init_from`), which the search also tries."""
        flat = w.detach().abs().flatten(1).float()
        full, start = flat.max(1).values, torch.quantile(flat, self.init_quantile, dim=1)
        # the fused forward where it is built (the same values bit for bit, one pass and no temporaries
        # per candidate: ~13x faster); the eager formula elsewhere
        w = w.detach().contiguous()
        kernel = kernels.usable(w, self._alpha_view(w).detach(), build=False) if self.bits <= 8 else None
        if kernel is not None:
            grid = _kernel_grid(self.bits, self.base)
            values = lambda v, a: kernel.power_forward(v, a.reshape(-1).contiguous(), *grid)  # noqa: E731
        else:
            values = lambda v, a: _grid_values(v, a, self.bits, self.base)  # noqa: E731
        best = init.search_scale(full, init.channel_error(w, values), also=start)
        self.alpha.copy_(best.to(self.alpha.dtype).clamp_min(init.MIN_SCALE))

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor, how: str) -> None:
        """Start ``alpha`` as ``how`` says: ``"lsq"`` is this grid's QAT start, the
        ``init_quantile`` of ``|W|`` (docs/design.md §3.3); ``"percentile"`` the
        99.99th percentile, as for the uniform grids; ``"max"`` ``max |W|``."""
        if how == "mse":
            self.init_mse(w)
        elif how == "lsq":
            self.init_from(w)
        else:
            assert how in ("percentile", "max"), how
            q = init.PERCENTILE if how == "percentile" else 1.0
            self.alpha.copy_(torch.quantile(w.detach().abs().flatten(1).float(), q, dim=1).clamp_min(init.MIN_SCALE))

    def _grad_scale(self, w: torch.Tensor) -> float:
        return 1.0 / math.sqrt(math.prod(w.shape[1:]) * self.positive_levels)

    def _kernel(self, w: torch.Tensor):
        # the kernels decide in float32 bits, up to 8-bit grids (exponents to 2^-126)
        return kernels.usable(w, self.alpha, per_row=True) if self.bits <= 8 else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(w)
        if kernel is not None:
            return _FusedPowerGrid.apply(w, self.alpha, _kernel_grid(self.bits, self.base), self._grad_scale(w), kernel)
        return _PowerGrid.apply(w, self._alpha_view(w), self.bits, self.base, self._grad_scale(w))

    def weight_kernels(self, w: torch.Tensor) -> WeightKernels | None:
        """The POT/POST kernels bound to this grid, for a QAT convolution that runs with its weight
        quantizer as one autograd node; ``None`` where the fused kernels do not apply."""
        kernel, grid = self._kernel(w), _kernel_grid(self.bits, self.base)
        return None if kernel is None else WeightKernels.bind(kernel, self.alpha, MIN_STEP, "power", grid, self._grad_scale(w))

    @torch.no_grad()
    def integer_weight(self, w: torch.Tensor) -> exact.IntegerWeight | None:
        """``w`` as integers times a per-channel unit (POT), or None (POST has no integer form)."""
        codes = self.codes(w)
        return exact.integer_weight(self.grid, codes, positive(self.alpha.detach()), largest_exponent(codes))

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Signed magnitude codes ``sign * m`` (``m = 0`` is zero, else ``k = m - 1``)."""
        return grid_codes(w / self._alpha_view(w), self.bits, self.base)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Weights from codes: ``alpha * sign * base^-(m-1)`` (zero for ``m = 0``), on the level table."""
        levels = power_levels(self.bits, self.base, torch.float64).to(codes.device)  # levels[K - k] = base^-k
        m = codes.abs().long()
        mag = levels[torch.where(m > 0, self.positive_levels - (m - 1), torch.zeros_like(m))]
        alpha = positive(self.alpha).double().view(-1, *([1] * (codes.dim() - 1)))
        return (torch.sign(codes).double() * mag * alpha).to(self.alpha.dtype)
