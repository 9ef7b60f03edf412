"""Group-scaled quantization of adder layers (AdderNet redistribution, DESIGN.md §3.4).

``sum |s_x x_q - s_w w_q|`` factors into ``s * sum |x_q - w_q|`` only when both
sides share one grid, so each scale group ``g`` quantizes the layer's input *and*
its weights with one step: activations as unsigned b-bit codes with
``act_step[g] = r_g / (2^b - 1)``, weights as signed b-bit codes with twice that
step (as the reference code does), and the layer computes
``-act_step[g] * sum |a_q - 2 w_q|`` for the output channels of group ``g``.
Channels of a group need not be contiguous: outputs are written back in place.
"""

from __future__ import annotations

import torch

from ..nn.adder import AdderConv2d, adder_conv2d
from .uniform import int_range


def adder_act_codes(x: torch.Tensor, act_step: float, bits: int) -> torch.Tensor:
    """Unsigned activation codes on the group's step (float tensor of integers)."""
    lo, hi = int_range(bits, signed=False)
    return torch.round(x / act_step).clamp_(lo, hi)


def adder_weight_codes(w: torch.Tensor, act_step: float, bits: int) -> torch.Tensor:
    """Signed weight codes on twice the group's activation step."""
    lo, hi = int_range(bits, signed=True)
    return torch.round(w / (2 * act_step)).clamp_(lo, hi)


class QAdderConv2d(AdderConv2d):
    """An adder layer computing with per-group shared activation/weight grids.

    Built from a float :class:`AdderConv2d` by :meth:`from_float`; the (possibly
    clamped) float weight stays the parameter, the codes are derived from it.
    """

    @classmethod
    def from_float(cls, layer: AdderConv2d, group_of_channel: torch.Tensor, act_steps: torch.Tensor, act_bits: int, weight_bits: int) -> QAdderConv2d:
        q = cls.__new__(cls)
        q.__dict__.update(vars(layer))
        q._parameters, q._buffers, q._modules = dict(layer._parameters), dict(layer._buffers), dict(layer._modules)
        q.act_bits, q.weight_bits = act_bits, weight_bits
        q.register_buffer("group_of_channel", group_of_channel.to(torch.int64).clone())
        q.register_buffer("act_steps", act_steps.to(torch.float32).clone())
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_bits={self.act_bits}, weight_bits={self.weight_bits}, scale_groups={len(self.act_steps)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for g, step in enumerate(self.act_steps.tolist()):
            channels = (self.group_of_channel == g).nonzero().flatten()
            a_q = adder_act_codes(x, step, self.act_bits)
            w_q = adder_weight_codes(self.weight.index_select(0, channels), step, self.weight_bits)
            if self.groups == 1:
                y = adder_conv2d(a_q, 2 * w_q, self.stride, self.padding, self.dilation, 1) * step
            else:  # grouped adder: channel subsets break the grouping, so compute all and select
                w_all = adder_weight_codes(self.weight, step, self.weight_bits)
                y = adder_conv2d(a_q, 2 * w_all, self.stride, self.padding, self.dilation, self.groups)
                y = y.index_select(1, channels) * step
            if out is None:
                out = y.new_zeros(y.shape[0], self.out_channels, *y.shape[2:])
            out[:, channels] = y
        if self.bias is not None:
            out = out + self.bias.view(-1, 1, 1)
        return out


__all__ = ["QAdderConv2d", "adder_act_codes", "adder_weight_codes"]
