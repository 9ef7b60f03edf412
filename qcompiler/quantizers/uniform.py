"""Uniform learned-step quantization (LSQ): the fake-quant module and its gradients.

Training, ONNX export and integer lowering all go through :func:`lsq_quantize` and
:class:`UniformQuantizer`, whose codes come from :mod:`qcompiler.numerics` (the one
implementation of ``clamp(round(x/s))``), so the forms of a compiled model agree by
construction.

Numerics (docs/design.md §4.2): ``x_q = clamp(round(x / s), n, p)``, ``x_hat = x_q * s``,
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
from . import init
from ..nn import exact
from ..nn.qat import WeightKernels
from ..nn.saved import recomputed, remember, save_input, saved_input
from ..numerics import int_range, offset_range, quantize_codes, quantize_float, round_half_even

__all__ = ["UniformQuantizer", "int_range", "lsq_quantize", "positive", "quantize_codes"]


class _LSQ(torch.autograd.Function):
    """Fused fake quantization: one pass forward, one pass backward.

    Written as a Function rather than a chain of autograd ops because the chain
    (divide, round-STE, clamp, multiply, grad-scale) allocates five activation-sized
    temporaries; this keeps QAT step time close to the float model's.

    ``keep_grads`` trades memory for time: the gradient factors are computed in the
    forward pass and kept (for weights, which are small next to activations), instead
    of being recomputed from the saved input in the backward pass (for activations,
    whose input is saved anyway by the layer before).

    This is the reference formulation; :class:`_FusedLSQ` runs the same numerics on
    :mod:`qcompiler.kernels` where they apply.
    """

    @staticmethod
    def forward(ctx, x, step, qmin: int, qmax: int, grad_scale: float, keep_grads: bool):  # type: ignore[override]
        ctx.qrange, ctx.grad_scale, ctx.keep_grads = (qmin, qmax), grad_scale, keep_grads
        if not keep_grads:
            ctx.save_for_backward(x, step)
            return remember(_lsq_values(x, step, qmin, qmax), _lsq_values, x, step, qmin, qmax)
        v = x / step
        clamped = v.clamp(qmin, qmax)
        inside = clamped == v  # clamping first is exact: the bounds are integers
        q = round_half_even(clamped, out=clamped)  # = quantize_float: round and clamp commute
        ctx.save_for_backward(inside, torch.where(inside, q - v, q), step)
        # the values q * step, made again (a layer saving them keeps this recipe instead)
        return remember(q * step, _lsq_kept_values, x, step, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qmin, qmax = ctx.qrange
        if ctx.keep_grads:
            inside, dstep, step = ctx.saved_tensors
        else:
            x, step = ctx.saved_tensors
            v = x / step
            clamped = v.clamp(qmin, qmax)
            inside = clamped == v
            # inside: round(v) - v; outside: the clamped code itself (n or p)
            dstep = torch.where(inside, round_half_even(clamped) - v, clamped) if ctx.needs_input_grad[1] else None
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            grad_step = (dstep * grad).sum_to_size(step.shape).mul_(ctx.grad_scale)
        return grad_x, grad_step, None, None, None, None


def _lsq_values(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step)) * step``: the forward values of :class:`_LSQ`."""
    return quantize_float(x, step, qmin, qmax).mul_(step)


def _lsq_kept_values(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The same values as :class:`_LSQ` computes them with ``keep_grads`` (clamp, then round: signs of zero agree)."""
    return round_half_even((x / step).clamp_(qmin, qmax)) * step


class _FusedLSQ(torch.autograd.Function):
    """:class:`_LSQ` on the fused kernels, taking the raw learned step (one per row of ``x``, or one).

    ``positive(step)`` happens inside, so a quantizer is one autograd node rather
    than four: at QAT batch sizes the bookkeeping of the tiny step ops costs more
    than the arithmetic. The kernels recompute the gradient factors in backward
    (one pass over ``x``, which is saved anyway).
    """

    @staticmethod
    def forward(ctx, x, step, qmin: int, qmax: int, grad_scale: float, kernel):  # type: ignore[override]
        x, rows = x.contiguous(), kernel.positive_rows(step, MIN_STEP)  # positive(step), one per row
        ctx.kernel, ctx.qrange, ctx.grad_scale = kernel, (qmin, qmax), grad_scale
        save_input(ctx, x, rows, step)  # x may be a residual join's quantized output: its recipe is kept, not x
        return remember(kernel.lsq_forward(x, rows, qmin, qmax), kernel.lsq_forward, x, rows, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, rows, step = saved_input(ctx)
        grad_x, grad_rows = ctx.kernel.lsq_backward(grad, x, rows, *ctx.qrange, ctx.grad_scale)
        grad_step = ctx.kernel.positive_grad(step, grad_rows, MIN_STEP) if ctx.needs_input_grad[1] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_step, None, None, None, None


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float, keep_grads: bool = False
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``step`` (broadcastable to ``x``).

    >>> x = torch.tensor([-0.3, 0.26, 0.5, 9.0])
    >>> lsq_quantize(x, torch.tensor(0.25), 0, 15, 1.0)
    tensor([0.0000, 0.2500, 0.5000, 3.7500])
    """
    return _LSQ.apply(x, step, qmin, qmax, grad_scale, keep_grads)


MIN_STEP = 1e-8


def positive(step: torch.Tensor) -> torch.Tensor:
    """Keep a learned step positive while letting its gradient through."""
    return step.abs().clamp_min(MIN_STEP)


class UniformQuantizer(nn.Module):
    """LSQ quantizer with a learned step, per tensor or per channel.

    Args:
        bits: code width.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        channels: number of steps along ``channel_axis`` (``None``: one step).
        channel_axis: the axis that ``channels`` indexes (0 for weights).
        zero_point: an asymmetric activation grid instead: ``zero_point`` codes below
            zero and ``2^b - 1 - zero_point`` above (:func:`qcompiler.numerics.offset_range`);
            ``signed`` is then whether any code is negative.

    Example:
        >>> q = UniformQuantizer(bits=4, signed=True, channels=2)
        >>> w = torch.randn(2, 3)
        >>> q.init_from(w)
        >>> bool((q.codes(w).abs() <= 8).all())
        True
    """

    def __init__(self, bits: int, signed: bool, channels: int | None = None, channel_axis: int = 0,
                 zero_point: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = int_range(bits, signed) if zero_point is None else offset_range(bits, zero_point)
        self.signed = self.qmin < 0
        self.channel_axis = channel_axis
        self.step = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        if self.asymmetric:
            kind = f"asymmetric [{self.qmin}, {self.qmax}]"
        per = f"per-channel({self.step.numel()})" if self.step.dim() else "per-tensor"
        return f"bits={self.bits}, {kind}, {per}"

    @property
    def asymmetric(self) -> bool:
        """Whether the code range is neither the signed nor the unsigned one (a zero point)."""
        return (self.qmin, self.qmax) not in (int_range(self.bits, True), int_range(self.bits, False))

    @property
    def zero_point(self) -> int | None:
        """Codes below zero of an asymmetric grid (``-qmin``); ``None`` for the signed and unsigned ones."""
        return -self.qmin if self.asymmetric else None

    def step_view(self, x: torch.Tensor) -> torch.Tensor:
        """``positive(step)`` shaped to broadcast over ``x`` (per channel along ``channel_axis``)."""
        step = positive(self.step)
        if step.dim() == 0:
            return step
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return step.view(shape)

    def elements_per_step(self, x: torch.Tensor) -> int:
        """``N`` of the gradient scale: elements one step value quantizes per sample."""
        if self.step.dim():
            per_step = x.numel() // x.shape[self.channel_axis]
            # an activation's channel axis is not the batch axis: count one sample's elements
            return per_step // x.shape[0] if self.channel_axis % max(x.dim(), 1) != 0 else per_step
        return math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()

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

    @torch.no_grad()
    def init_from_max(self, max_abs: float | torch.Tensor) -> None:
        """A step that reaches ``max_abs`` without clipping: ``max_abs / qmax`` (per channel when per channel).

        >>> q = UniformQuantizer(bits=8, signed=False)
        >>> q.init_from_max(2.55); round(float(q.step.detach()), 6)
        0.01
        """
        m = torch.as_tensor(max_abs, dtype=self.step.dtype)
        self.step.copy_((m / max(self.qmax, 1)).clamp_min(1e-6).expand_as(self.step))

    @torch.no_grad()
    def init_mse(self, x: torch.Tensor, lsq_start: bool = True) -> None:
        """The step with the least squared error on ``x`` itself (per channel when per
        channel), searched through this quantizer's own forward values; for a weight never
        worse than LSQ's start, which the search also tries (``lsq_start``). On activation
        samples it is left out: a step past the largest sample's reach wins there only by
        rounding luck (a near-constant channel landing on a coarse grid point)."""
        rows = x.detach().movedim(self.channel_axis, 0) if self.step.dim() else x.detach().reshape(1, -1)
        full = rows.abs().flatten(1).max(1).values.double() / max(self.qmax, 1)

        rows = rows.contiguous()
        # the fused forward where it is built (the same values bit for bit, one pass), else the eager
        # formula into one buffer per search, not one fresh weight-sized tensor per candidate
        kernel = kernels.usable(rows, full.float().view(-1, *([1] * (rows.dim() - 1))), build=False)
        buffer = torch.empty_like(rows) if kernel is None else None

        def values(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            if kernel is not None:
                return kernel.lsq_forward(w, step.contiguous(), self.qmin, self.qmax)
            return quantize_float(w, step, self.qmin, self.qmax, out=buffer).mul_(step)

        start = 2 * rows.abs().flatten(1).double().mean(1) / math.sqrt(max(self.qmax, 1))
        best = init.search_scale(full, init.channel_error(rows, values), also=start if lsq_start else None)
        self.step.copy_(best.to(self.step.dtype).clamp_min(init.MIN_SCALE).view_as(self.step))

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor, how: str) -> None:
        """Start the per-channel steps of weight ``w`` as ``how`` (one of :data:`init.INITS`) says."""
        self.init_per_channel(w, how)

    @torch.no_grad()
    def init_per_channel(self, x: torch.Tensor, how: str) -> None:
        """Start the steps, one per index of ``channel_axis``, from samples ``x`` as ``how`` says
        (a weight, or an activation's calibration samples)."""
        if how == "mse":
            self.init_mse(x, lsq_start=self.channel_axis == 0)  # axis 0: a weight's output channels
        elif how == "lsq":
            self.init_from(x)
        else:
            per_channel = x.detach().movedim(self.channel_axis, 0).abs().flatten(1)
            if how == "percentile":
                self.init_from_max(torch.quantile(per_channel.float(), init.PERCENTILE, dim=1))
            else:
                assert how == "max", how
                self.init_from_max(per_channel.max(1).values)

    def _kernel(self, x: torch.Tensor):
        if self.step.dim() == 0:
            return kernels.usable(x, self.step)
        if self.channel_axis != 0 or x.dim() == 0:
            return None
        return kernels.usable(x, self.step, per_row=True)

    def weight_kernels(self, w: torch.Tensor) -> WeightKernels | None:
        """This grid's LSQ kernels for weight ``w``, which a QAT convolution calls when it runs with
        its quantizer as one autograd node (:class:`qcompiler.nn.qat.WeightKernels`), or ``None``."""
        kernel, codes = self._kernel(w), (self.qmin, self.qmax)
        return None if kernel is None else WeightKernels.bind(kernel, self.step, MIN_STEP, "lsq", codes, self.grad_scale(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exact.deployed(self):
            return self.frozen_forward(x, self.step_view(x))
        kernel = self._kernel(x)
        if kernel is not None:
            return _FusedLSQ.apply(x, self.step, self.qmin, self.qmax, self.grad_scale(x), kernel)
        # x may be another quantizer's output (a residual join's): then its recipe is saved, not x
        with recomputed(self):
            # Per-channel steps on axis 0 quantize weights: small, so keep the gradient factors.
            keep = self.step.dim() > 0 and self.channel_axis == 0
            return lsq_quantize(x, self.step_view(x), self.qmin, self.qmax, self.grad_scale(x), keep)

    def frozen_forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Eval mode: ``clamp(round(x / step)) * step`` (three IEEE ops and a clamp, as the ONNX body),
        tagged with its step for the layer reading it (:mod:`qcompiler.nn.exact`)."""
        return exact.tag(quantize_float(x, step, self.qmin, self.qmax).mul_(step), step, self.qmin, self.qmax)

    @torch.no_grad()
    def integer_weight(self, w: torch.Tensor) -> exact.IntegerWeight:
        """``w`` as integer codes times the per-channel step (the eval form of a layer)."""
        return exact.integer_weight("uniform", self.codes(w), positive(self.step.detach()))

    @torch.no_grad()
    def codes(self, x: torch.Tensor, narrow_dtype: bool = False) -> torch.Tensor:
        """Integer codes the deployed model stores for ``x`` (int64, or the narrowest type that holds them)."""
        return quantize_codes(x, self.step_view(x), self.qmin, self.qmax, narrow_dtype)
