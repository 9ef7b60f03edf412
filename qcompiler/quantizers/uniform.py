"""Uniform learned-step quantization (LSQ), the one implementation of ``round(x/s)``.

Training, ONNX export and integer lowering all go through :func:`lsq_quantize` and
:class:`UniformQuantizer`, so the three forms of a compiled model agree by
construction.

Numerics (DESIGN.md §3.1): ``x_q = clamp(round(x / s), n, p)``, ``x_hat = x_q * s``,
round half to even. Gradients: straight-through for ``x`` inside ``[n, p]`` and zero
outside; for ``s``: ``round(x/s) - x/s`` inside, ``n`` below, ``p`` above, times the
gradient scale ``1 / sqrt(N * p)``. We take ``N`` = the number of elements one step
value quantizes *per sample*: all features of one sample for an activation step, the
elements of one output channel for a per-channel weight step (as in the LSQ paper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer code range of a ``bits``-bit code.

    >>> int_range(4, signed=False)
    (0, 15)
    >>> int_range(4, signed=True)
    (-8, 7)
    """
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _LSQ(torch.autograd.Function):
    """Fused fake quantization: one pass forward, one pass backward.

    Written as a Function rather than a chain of autograd ops because the chain
    (divide, round-STE, clamp, multiply, grad-scale) allocates five activation-sized
    temporaries; this keeps QAT step time close to the float model's.

    ``keep_grads`` trades memory for time: the gradient factors are computed in the
    forward pass and kept (for weights, which are small next to activations), instead
    of being recomputed from the saved input in the backward pass (for activations,
    whose input is saved anyway by the layer before).

    Where :mod:`qcompiler.kernels` can run (contiguous float32 on CPU, one step per
    row), the same numerics run as one fused pass each way, recomputing in backward.
    """

    @staticmethod
    def forward(ctx, x, step, qmin: int, qmax: int, grad_scale: float, keep_grads: bool):  # type: ignore[override]
        ctx.qrange, ctx.grad_scale, ctx.keep_grads = (qmin, qmax), grad_scale, keep_grads
        ctx.fused = kernels.usable(x, step)
        if ctx.fused is not None:
            x, rows = x.contiguous(), step.detach().reshape(-1).contiguous()
            ctx.save_for_backward(x, rows)
            ctx.step_shape = step.shape
            return ctx.fused.lsq_forward(x, rows, qmin, qmax)
        if not keep_grads:
            ctx.save_for_backward(x, step)
            return torch.round(x / step).clamp_(qmin, qmax).mul_(step)
        v = x / step
        clamped = v.clamp(qmin, qmax)
        inside = clamped == v  # clamping first is exact: the bounds are integers
        q = clamped.round_()
        ctx.save_for_backward(inside, torch.where(inside, q - v, q), step)
        return q * step

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qmin, qmax = ctx.qrange
        if ctx.fused is not None:
            x, rows = ctx.saved_tensors
            grad_x, grad_rows = ctx.fused.lsq_backward(grad, x, rows, qmin, qmax, ctx.grad_scale)
            grad_x = grad_x if ctx.needs_input_grad[0] else None
            grad_step = grad_rows.reshape(ctx.step_shape) if ctx.needs_input_grad[1] else None
            return grad_x, grad_step, None, None, None, None
        if ctx.keep_grads:
            inside, dstep, step = ctx.saved_tensors
        else:
            x, step = ctx.saved_tensors
            v = x / step
            clamped = v.clamp(qmin, qmax)
            inside = clamped == v
            # inside: round(v) - v; outside: the clamped code itself (n or p)
            dstep = torch.where(inside, clamped.round() - v, clamped) if ctx.needs_input_grad[1] else None
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            grad_step = (dstep * grad).sum_to_size(step.shape).mul_(ctx.grad_scale)
        return grad_x, grad_step, None, None, None, None


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float, keep_grads: bool = False
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``step`` (broadcastable to ``x``).

    >>> x = torch.tensor([-0.3, 0.26, 0.5, 9.0])
    >>> lsq_quantize(x, torch.tensor(0.25), 0, 15, 1.0)
    tensor([0.0000, 0.2500, 0.5000, 3.7500])
    """
    return _LSQ.apply(x, step, qmin, qmax, grad_scale, keep_grads)


def quantize_codes(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes of ``x`` (the part of :func:`lsq_quantize` before ``* step``)."""
    return torch.round(x / step).clamp_(qmin, qmax).to(torch.int64)


def positive(step: torch.Tensor) -> torch.Tensor:
    """Keep a learned step positive while letting its gradient through."""
    return step.abs().clamp_min(1e-8)


class UniformQuantizer(nn.Module):
    """LSQ quantizer with a learned step, per tensor or per channel.

    Args:
        bits: code width.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        channels: number of steps along ``channel_axis`` (``None``: one step).
        channel_axis: the axis that ``channels`` indexes (0 for weights).

    Example:
        >>> q = UniformQuantizer(bits=4, signed=True, channels=2)
        >>> w = torch.randn(2, 3)
        >>> q.init_from(w)
        >>> bool((q.codes(w).abs() <= 8).all())
        True
    """

    def __init__(self, bits: int, signed: bool, channels: int | None = None, channel_axis: int = 0) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = int_range(bits, signed)
        self.channel_axis = channel_axis
        self.step = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        per = f"per-channel({self.step.numel()})" if self.step.dim() else "per-tensor"
        return f"bits={self.bits}, {kind}, {per}"

    def _step_view(self, x: torch.Tensor) -> torch.Tensor:
        step = positive(self.step)
        if step.dim() == 0:
            return step
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return step.view(shape)

    def elements_per_step(self, x: torch.Tensor) -> int:
        """``N`` of the gradient scale: elements one step value quantizes per sample."""
        if self.step.dim():
            return x.numel() // x.shape[self.channel_axis]
        return x[0].numel() if x.dim() > 1 else x.numel()

    def grad_scale(self, x: torch.Tensor) -> float:
        return 1.0 / math.sqrt(self.elements_per_step(x) * max(self.qmax, 1))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor | None = None, mean_abs: float | None = None) -> None:
        """LSQ initialisation ``2 * mean(|x|) / sqrt(p)``, per channel when per channel."""
        if mean_abs is None:
            assert x is not None
            if self.step.dim():
                dims = [d for d in range(x.dim()) if d != self.channel_axis]
                m = x.abs().mean(dim=dims)
            else:
                m = x.abs().mean()
        else:
            m = torch.tensor(float(mean_abs))
        self.step.copy_((2 * m / math.sqrt(self.qmax)).clamp_min(1e-6).expand_as(self.step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-channel steps quantize weights: small, so keep the gradient factors.
        keep = self.step.dim() > 0
        return lsq_quantize(x, self._step_view(x), self.qmin, self.qmax, self.grad_scale(x), keep)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes the deployed model stores for ``x``."""
        return quantize_codes(x, self._step_view(x), self.qmin, self.qmax)
