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

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from .uniform import positive, positive_backward

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


@dataclass(frozen=True)
class GridThresholds:
    """Where the nearest-level projection onto a power grid switches level.

    Writing ``a = m * 2^e`` with ``m`` in ``[1, 2)``, the nearest level's exponent is
    ``k = -(e + [m > mid_low])`` for ``r = 2`` and ``k = -(2e + [m > mid_low] + [m >
    mid_high])`` for ``r = sqrt 2``, clamped to ``[0, max_exponent]``; ``a <= zero_below``
    projects to zero. The midpoints are stored rounded *down* to the input's dtype,
    which makes ``m > t`` exactly ``m > (true midpoint)``: ties go to the smaller
    magnitude, and the eager code and the fused kernel decide every weight alike.
    """

    sqrt2: bool
    max_exponent: int
    mid_low: float
    mid_high: float
    zero_below: float


def _at_most(t: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value ``<= t``."""
    f = torch.tensor(t, dtype=dtype)
    if float(f) > t:
        f = torch.nextafter(f, torch.tensor(-math.inf, dtype=dtype))
    return float(f)


@functools.lru_cache(maxsize=None)
def grid_thresholds(bits: int, base: float, dtype: torch.dtype = torch.float32) -> GridThresholds:
    """The projection's decision points for a ``bits``-bit grid of ``base`` 2 or sqrt 2, for ``dtype`` inputs.

    >>> grid_thresholds(3, 2.0)
    GridThresholds(sqrt2=False, max_exponent=2, mid_low=1.5, mid_high=2.0, zero_below=0.125)
    """
    if base not in GRID_BASES.values():
        raise ValueError(f"power grids have base 2 or sqrt(2), got {base}")
    positive_levels = 2 ** (bits - 1) - 1
    sqrt2 = base != 2.0
    # inside one octave [1, 2): levels 1, sqrt2, 2 (sqrt 2) or 1, 2 (r = 2)
    mids = ((1 + base) / 2, (base + 2) / 2) if sqrt2 else (1.5, 2.0)
    return GridThresholds(
        sqrt2=sqrt2,
        max_exponent=positive_levels - 1,
        mid_low=_at_most(mids[0], dtype),
        mid_high=_at_most(mids[1], dtype),
        zero_below=_at_most(base ** (-(positive_levels - 1)) / 2, dtype),
    )


@functools.lru_cache(maxsize=None)
def _level_of_exponent(bits: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """``base^-k`` for ``k = 0 .. K-1``: :func:`power_levels` largest first."""
    return power_levels(bits, base, dtype)[1:].flip(0).contiguous()


def _exponents(a: torch.Tensor, bits: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For magnitudes ``a = |u|``: the nearest level's exponent ``k`` (int64) and the zero mask.

    Decided from the float's exponent and mantissa (:class:`GridThresholds`) rather
    than a table search (``bucketize`` is ~10x slower here, and this runs on every
    weight at every QAT step) or ``log2`` (whose rounding can flip a near-tie).
    """
    g = grid_thresholds(bits, base, a.dtype)
    mant, exp = torch.frexp(a)  # a = mant * 2^exp with mant in [0.5, 1): m = 2 mant, e = exp - 1
    octave = (exp - 1).long()
    if g.sqrt2:
        k = (mant > g.mid_low / 2).long().add_(mant > g.mid_high / 2).add_(octave, alpha=2).neg_()
    else:
        k = (mant > g.mid_low / 2).long().add_(octave).neg_()
    return k.clamp_(0, g.max_exponent), a <= g.zero_below


def _levels(a: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Nearest level magnitude of ``a = |u|`` (in units of alpha)."""
    k, zero = _exponents(a, bits, base)
    return _level_of_exponent(bits, base, a.dtype).to(a.device)[k].masked_fill_(zero, 0.0)


def _codes(u: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    """Signed magnitude codes ``sign * m``: ``m = 0`` is zero, else the level is ``base^-(m-1)``."""
    k, zero = _exponents(u.abs(), bits, base)
    return (k + 1).masked_fill_(zero, 0) * torch.sign(u).long()


class _PowerGrid(torch.autograd.Function):
    """The reference formulation; :class:`_FusedPowerGrid` runs it on :mod:`qcompiler.kernels`."""

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


class _FusedPowerGrid(torch.autograd.Function):
    """:class:`_PowerGrid` on the fused kernels, taking the raw learned ``alpha`` (one per output channel).

    ``positive(alpha)`` happens inside, so the quantizer is one autograd node; the
    kernels recompute the gradient factors in backward from the saved weights.
    """

    @staticmethod
    def forward(ctx, w, alpha, grid: GridThresholds, grad_scale: float, kernel):  # type: ignore[override]
        w, rows = w.contiguous(), positive(alpha).contiguous()
        ctx.kernel, ctx.grad_scale = kernel, grad_scale
        ctx.grid = dataclasses.astuple(grid)  # the kernels' argument order is the field order
        ctx.save_for_backward(w, rows, alpha)
        return kernel.power_forward(w, rows, *ctx.grid)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, rows, alpha = ctx.saved_tensors
        grad_w, grad_rows = ctx.kernel.power_backward(grad, w, rows, *ctx.grid, ctx.grad_scale)
        grad_alpha = positive_backward(alpha, grad_rows) if ctx.needs_input_grad[1] else None
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

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n = w[0].numel()
        scale = 1.0 / math.sqrt(n * self.positive_levels)
        # the kernels decide in float32 bits, up to 8-bit grids (exponents to 2^-126)
        kernel = kernels.usable(w, self.alpha.view(-1, *([1] * (w.dim() - 1)))) if self.bits <= 8 else None
        if kernel is not None:
            return _FusedPowerGrid.apply(w, self.alpha, grid_thresholds(self.bits, self.base), scale, kernel)
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
        alpha = positive(self.alpha).double().view(-1, *([1] * (codes.dim() - 1)))
        return (torch.sign(codes).double() * mag * alpha).to(self.alpha.dtype)
