"""Compute layers whose weight passes through a quantizer on every forward.

Like ``torch.ao.nn.qat``: each class subclasses the float layer, shares its
parameters, and owns a ``weight_quant`` submodule. Batch norm stays a separate
module (docs/design.md §4.6: folding it would move weights off their grid).

In eval mode a layer reading an activation quantizer convolves integer codes
(:func:`qcompiler.nn.exact.frozen_layer`), the form the ONNX file computes bit for bit;
training keeps the float formula on dequantized values and the fused kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .exact import deployed, frozen_layer
from .layout import channel_first, from_channel_first
from .saved import active, recomputed, save_input, saved_input


def _quantized_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A QConv's forward: the deployed integer form in eval without autograd, else the QAT formula."""
    y = frozen_layer(self, x, lambda c, w: self._conv_forward(c, w, None)) if deployed(self) else None
    if y is not None:
        return y
    if _one_node(self):  # quantizer and convolution as one autograd node, where the quantizer's kernels allow
        weight = self.weight_quant.weight_kernels(self.weight)
        if weight is not None and x.dtype == torch.float32 and (self.bias is None or self.bias.dtype == torch.float32):
            conv = ConvArgs(tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
            return _OneNodeConv.apply(x, self.weight, weight.scale, self.bias, conv, weight)
    w = self.weight_quant(self.weight)
    with recomputed(self):  # backward makes the quantized x and w again instead of keeping them
        return self._conv_forward(x, w, self.bias)


def _one_node(conv: nn.Module) -> bool:
    """Whether a QConv may run with its weight quantizer as one node (:class:`_OneNodeConv`): a
    training forward that autograd records, zero padding given as numbers, a quantizer that
    offers ``weight_kernels``, and no hooks that expect it to be called as a module."""
    quantizer = conv.weight_quant
    return (getattr(quantizer, "weight_kernels", None) is not None and active(conv) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not quantizer._forward_hooks and not quantizer._forward_pre_hooks
            and not _global_forward_hooks and not _global_forward_pre_hooks)


@dataclasses.dataclass(frozen=True)
class WeightKernels:
    """A weight quantizer's fused kernels, bound to its grid and gradient scale: what
    :class:`_OneNodeConv` calls. The learned ``scale`` (a step or POT/POST ``alpha``) is an input
    of the node; ``rows`` is ``positive(scale)``, one value per output channel (or one)."""

    scale: torch.Tensor
    positive: Callable[[torch.Tensor], torch.Tensor]  # scale -> rows
    positive_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scale, grad_rows) -> grad_scale
    quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (w, rows) -> w_q
    backward: Callable[..., list[torch.Tensor]]  # (grad_wq, w, rows) -> (grad_w, grad_rows)
    remake: Callable[..., list[torch.Tensor]]  # (grad_wq, w, rows) -> (w_q, grad_rows); grad_wq becomes grad_w

    @classmethod
    def bind(cls, kernel: ModuleType, scale: torch.Tensor, min_scale: float, family: str, grid: tuple,
             grad_scale: float) -> WeightKernels:
        """The fused kernels ``{family}_forward(w, rows, *grid)``, ``{family}_backward(g, w, rows, *grid,
        grad_scale)`` and ``{family}_backward_remake`` (same arguments), with ``positive(scale)``
        floored at ``min_scale``: ``family`` is ``"lsq"`` or ``"power"`` (qcompiler/kernels)."""
        forward, backward = getattr(kernel, f"{family}_forward"), getattr(kernel, f"{family}_backward")
        remake = getattr(kernel, f"{family}_backward_remake")
        return cls(
            scale,
            positive=lambda s: kernel.positive_rows(s, min_scale),
            positive_grad=lambda s, grad_rows: kernel.positive_grad(s, grad_rows, min_scale),
            quantize=lambda w, rows: forward(w, rows, *grid),
            backward=lambda g, w, rows: backward(g, w, rows, *grid, grad_scale),
            remake=lambda g, w, rows: remake(g, w, rows, *grid, grad_scale),
        )


@dataclasses.dataclass(frozen=True)
class ConvArgs:
    """A convolution's hyperparameters, as ``aten.convolution`` takes them (zero padding, not transposed)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def call(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        zeros = [0] * len(self.stride)
        return torch.ops.aten.convolution(x, w, bias, self.stride, self.padding, self.dilation, False, zeros, self.groups)

    def backward(self, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: list[bool]) -> tuple:
        zeros = [0] * len(self.stride)
        bias_sizes = [w.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(grad, x, w, bias_sizes, self.stride, self.padding, self.dilation,
                                                   False, zeros, self.groups, mask)


class _OneNodeConv(torch.autograd.Function):
    """``conv(x, quantize(w))`` as one autograd node, for a QAT convolution whose weight quantizer
    runs on the fused kernels (:class:`WeightKernels`).

    As two nodes (the quantizer, then the convolution) backward reads the weight twice: once
    to remake the quantized weight for the convolution's backward (keeping it would cost a
    weight-sized copy per layer, against the 1.3x memory target), once more in the quantizer's
    backward. One node orders backward so that one pass does both: the convolution's weight
    gradient first (it needs the input, not the weight), then ``remake`` turns that gradient
    into the float weight's gradient in place and makes the quantized weight in the same pass,
    then the input gradient from it. The same values as the two nodes, bit for bit.
    """

    @staticmethod
    def forward(ctx, x, w, scale, bias, conv: ConvArgs, weight: WeightKernels):  # type: ignore[override]
        w, rows = w.contiguous(), weight.positive(scale)
        ctx.conv, ctx.weight, ctx.has_bias = conv, weight, bias is not None
        save_input(ctx, x, w, rows, scale)  # x is usually an activation quantizer's output: its recipe is kept
        return conv.call(x, weight.quantize(w, rows), bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w, rows, scale = saved_input(ctx)
        weight = ctx.weight
        need_x, need_w, need_scale, need_bias = ctx.needs_input_grad[:4]
        grad_w = grad_scale = grad_bias = None
        if need_w or need_scale or need_bias:
            _, grad_wq, grad_bias = ctx.conv.backward(grad, x, w, [False, need_w or need_scale, need_bias and ctx.has_bias])
        if need_w or need_scale:
            grad_wq = grad_wq.contiguous()  # this node's own buffer: it becomes grad_w
            if need_x:
                wq, grad_rows = weight.remake(grad_wq, w, rows)
                grad_w = grad_wq
            else:
                grad_w, grad_rows = weight.backward(grad_wq, w, rows)
            grad_scale = weight.positive_grad(scale, grad_rows) if need_scale else None
        elif need_x:
            wq = weight.quantize(w, rows)
        grad_x = ctx.conv.backward(grad, x, wq, [True, False, False])[0] if need_x else None
        return grad_x, grad_w if need_w else None, grad_scale, grad_bias if need_bias else None, None, None


class QConv1d(nn.Conv1d):
    """``nn.Conv1d`` computing with ``weight_quant(weight)``."""

    forward = _quantized_conv_forward


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight_quant(weight)``."""

    forward = _quantized_conv_forward


class QConv3d(nn.Conv3d):
    """``nn.Conv3d`` computing with ``weight_quant(weight)``."""

    forward = _quantized_conv_forward


class QLinear(nn.Linear):
    """``nn.Linear`` computing with ``weight_quant(weight)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_layer(self, x, F.linear, channel_axis=-1) if deployed(self) else None
        if y is not None:
            return y
        w = self.weight_quant(self.weight)
        with recomputed(self):
            return F.linear(x, w, self.bias)


def _quantized_conv_transpose_forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
    """A QConvTranspose's forward. The quantizer and the integer form see the weight output channel
    first (:mod:`qcompiler.nn.layout`); the op gets it back in the transposed conv's own layout."""
    dims = len(self.kernel_size)
    output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]

    def op(c: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return conv(c, from_channel_first(w, self.groups), bias, self.stride, self.padding, output_padding,
                    self.groups, self.dilation)

    y = frozen_layer(self, x, op) if deployed(self) else None
    if y is not None:
        return y
    w = self.weight_quant(channel_first(self.weight, self.groups))
    with recomputed(self):
        return op(x, w, self.bias)


class QConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` computing with ``weight_quant`` of its output-channel-first weight."""

    forward = _quantized_conv_transpose_forward


class QConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computing with ``weight_quant`` of its output-channel-first weight."""

    forward = _quantized_conv_transpose_forward


class QConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computing with ``weight_quant`` of its output-channel-first weight."""

    forward = _quantized_conv_transpose_forward


class QEmbedding(nn.Embedding):
    """``nn.Embedding`` looking up rows of ``weight_quant(weight)``: its output is on the weight grid.

    No integer form of its own: in eval the rows are ``codes * step[row]``, one float32 product
    each, which the ONNX file computes the same way (``Cast``, ``Mul``, ``Gather``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight_quant(self.weight), self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)


_QAT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
    nn.Conv3d: QConv3d,
    nn.Linear: QLinear,
    nn.ConvTranspose1d: QConvTranspose1d,
    nn.ConvTranspose2d: QConvTranspose2d,
    nn.ConvTranspose3d: QConvTranspose3d,
    nn.Embedding: QEmbedding,
}


def register_qat_class(float_cls: type[nn.Module], qat_cls: type[nn.Module]) -> None:
    """Tell :func:`with_weight_quant` which QAT class replaces ``float_cls``."""
    _QAT_CLASS[float_cls] = qat_cls


def float_forward(layer: nn.Module):
    """The float layer class's ``forward`` of a QAT layer (its weight used as it is), or None
    for a layer that is not one of these classes (an adder layer).

    >>> from qcompiler.quantizers import UniformQuantizer
    >>> q = with_weight_quant(nn.Linear(3, 2), UniformQuantizer(2, signed=True, channels=2))
    >>> x = torch.randn(4, 3)
    >>> torch.equal(float_forward(q)(q, x), torch.nn.functional.linear(x, q.weight, q.bias))
    True
    """
    if type(layer) not in _QAT_CLASS.values():
        return None
    return next(c for c in type(layer).__mro__[1:] if c in _QAT_CLASS).forward


def with_weight_quant(layer: nn.Module, weight_quant: nn.Module) -> nn.Module:
    """A QAT copy of ``layer`` sharing its parameters and using ``weight_quant``.

    Applied to an already-quantized layer, it swaps the weight quantizer. A subclass of a
    float layer class (whose forward is the class's own, :func:`qcompiler.frontend.layer_kind`)
    becomes that class's QAT class.

    Example:
        >>> from qcompiler.quantizers import UniformQuantizer
        >>> q = with_weight_quant(nn.Linear(3, 2), UniformQuantizer(4, signed=True, channels=2))
        >>> type(q).__name__
        'QLinear'
    """
    if type(layer) in _QAT_CLASS.values():
        layer.weight_quant = weight_quant
        return layer
    cls = next(_QAT_CLASS[c] for c in type(layer).__mro__ if c in _QAT_CLASS)
    q = cls.__new__(cls)
    # Share every attribute (hyper-parameters, parameters, buffers) of the float
    # layer; the containers are copied so the float layer itself is untouched.
    q.__dict__.update(vars(layer))
    q._parameters, q._buffers, q._modules = dict(layer._parameters), dict(layer._buffers), dict(layer._modules)
    q.weight_quant = weight_quant
    return q
