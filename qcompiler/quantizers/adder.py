"""Group-scaled quantization of adder layers (AdderNet redistribution, docs/design.md §4.5).

``sum |s_x x_q - s_w w_q|`` factors into ``s * sum |x_q - w_q|`` only when both
sides share one grid, so each scale group ``g`` quantizes the layer's input *and*
its weights on multiples of one step: activations as unsigned ``a``-bit codes with
``act_step[g] = r_g / (2^a - 1)``, weights as narrow signed ``w``-bit codes with
``weight_step[g] = ratio * act_step[g]``, where the integer ``ratio =
adder_weight_step_ratio(a, w)`` lets the weight codes reach ``±r_g`` (2 when ``a ==
w``, the reference code's factor). The layer computes
``-act_step[g] * sum |a_q - ratio * w_q|`` for the output channels of group ``g``.
Channels of a group need not be contiguous: outputs are written back in place.

The codes come from :mod:`qcompiler.numerics`; this module re-exports them.
"""

from __future__ import annotations

import torch

from ..nn.adder import AdderConv2d, adder_conv2d, adder_conv2d_train
from ..numerics import adder_act_codes, adder_weight_codes, adder_weight_step_ratio


class _StraightThrough(torch.autograd.Function):
    """The value of ``quantized``, the gradient of ``surrogate`` (one node, no arithmetic on the value).

    ``surrogate + (quantized - surrogate).detach()`` would round, so its value could
    differ from the quantized result in the last bit; this returns it exactly.
    """

    @staticmethod
    def forward(ctx, quantized, surrogate):  # type: ignore[override]
        return quantized

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return None, grad


class QAdderConv2d(AdderConv2d):
    """An adder layer computing with per-group shared activation/weight grids.

    Built from a float :class:`AdderConv2d` by :meth:`from_float`; the (possibly
    clamped) float weight stays the parameter, the codes are derived from it.

    Training (``train()`` mode with gradients enabled) uses a straight-through
    estimator: the output is exactly the quantized one, while the gradients are
    those of the float adder layer on the same weight (AdderNet's surrogate
    gradients, :class:`~qcompiler.nn.adder.AdderConv2dFunction`), so QAT can
    fine-tune the weights. In eval mode or under ``no_grad`` only the quantized
    path runs.
    """

    @classmethod
    def from_float(cls, layer: AdderConv2d, group_of_channel: torch.Tensor, act_steps: torch.Tensor, act_bits: int, weight_bits: int) -> QAdderConv2d:
        q = cls.__new__(cls)
        q.__dict__.update(vars(layer))
        q._parameters, q._buffers, q._modules = dict(layer._parameters), dict(layer._buffers), dict(layer._modules)
        q.act_bits, q.weight_bits = act_bits, weight_bits
        q.weight_step_ratio = adder_weight_step_ratio(act_bits, weight_bits)
        q.register_buffer("group_of_channel", group_of_channel.to(torch.int64).clone())
        q.register_buffer("act_steps", act_steps.to(torch.float32).clone())
        return q

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", act_bits={self.act_bits}, weight_bits={self.weight_bits}, "
            f"weight_step_ratio={self.weight_step_ratio}, scale_groups={len(self.act_steps)}"
        )

    def weight_steps(self) -> torch.Tensor:
        """The weight step of each output channel: ``weight_step_ratio * act_steps[group]``."""
        return self.act_steps[self.group_of_channel] * self.weight_step_ratio

    def weight_codes(self) -> torch.Tensor:
        """Each weight's narrow signed code on its channel's weight step (floats holding integers)."""
        steps = self.weight_steps().view(-1, *([1] * (self.weight.dim() - 1)))
        return adder_weight_codes(self.weight.detach(), steps, self.weight_bits)

    @torch.no_grad()
    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized output ``-act_step * sum |a_q - ratio * w_q|``, without the bias; no gradient."""
        out = None
        # the weight codes in units of the activation step, for all groups at once
        w_q = self.weight_codes().mul_(self.weight_step_ratio)
        for g, step in enumerate(self.act_steps.tolist()):
            channels = (self.group_of_channel == g).nonzero().flatten()
            a_q = adder_act_codes(x, step, self.act_bits)
            if self.groups == 1:
                y = adder_conv2d(a_q, w_q.index_select(0, channels), self.stride, self.padding, self.dilation, 1) * step
            else:  # grouped adder: channel subsets break the grouping, so compute all and select
                y = adder_conv2d(a_q, w_q, self.stride, self.padding, self.dilation, self.groups)
                y = y.index_select(1, channels) * step
            if out is None:
                out = y.new_zeros(y.shape[0], self.out_channels, *y.shape[2:])
            out[:, channels] = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            quantized = self.quantized_forward(x)
            surrogate = adder_conv2d_train(x, self.weight, self.stride, self.padding, self.dilation, self.groups, self.eta, self.adaptive_lr)
            out = _StraightThrough.apply(quantized, surrogate)
        else:
            out = self.quantized_forward(x)
        if self.bias is not None:
            out = out + self.bias.view(-1, 1, 1)
        return out


__all__ = ["QAdderConv2d", "adder_act_codes", "adder_weight_codes", "adder_weight_step_ratio"]
