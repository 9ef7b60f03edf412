"""Compute layers whose weight passes through a quantizer on every forward.

Like ``torch.ao.nn.qat``: each class subclasses the float layer, shares its
parameters, and owns a ``weight_quant`` submodule. Batch norm stays a separate
module (docs/design.md §4.6: folding it would move weights off their grid).

In eval mode a layer reading an activation quantizer convolves integer codes
(:func:`qcompiler.nn.exact.frozen_layer`), the form the ONNX file computes bit for bit;
training keeps the float formula on dequantized values and the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .exact import deployed, frozen_layer
from .layout import channel_first, from_channel_first
from .saved import active, recomputed


def _quantized_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A QConv's forward: the deployed integer form in eval without autograd, else the QAT formula."""
    y = frozen_layer(self, x, lambda c, w: self._conv_forward(c, w, None)) if deployed(self) else None
    if y is not None:
        return y
    if _one_node(self):  # quantizer and convolution as one autograd node, where the quantizer offers it
        y = self.weight_quant.convolve(x, self)
        if y is not None:
            return y
    w = self.weight_quant(self.weight)
    with recomputed(self):  # backward makes the quantized x and w again instead of keeping them
        return self._conv_forward(x, w, self.bias)


def _one_node(conv: nn.Module) -> bool:
    """Whether a QConv may hand its convolution to its weight quantizer's ``convolve``: a training
    forward that autograd records, zero padding given as numbers, and no hooks that expect the
    quantizer to be called as a module."""
    quantizer = conv.weight_quant
    return (hasattr(quantizer, "convolve") and active(conv) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not quantizer._forward_hooks and not quantizer._forward_pre_hooks
            and not _global_forward_hooks and not _global_forward_pre_hooks)


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
