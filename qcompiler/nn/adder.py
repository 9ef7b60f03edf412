"""AdderNet convolution (Chen et al., "AdderNet", CVPR 2020; docs/design.md §4.5).

An adder layer replaces the cross-correlation of a convolution by a negative L1
distance over each window::

    Y[b, c, i, j] = -sum_k |X_patch[b, k, i, j] - W[c, k]|

(per group when ``groups > 1``). It has no bias by default and is always followed
by batch norm. Training uses AdderNet's surrogate gradients, implemented in
``AdderConv2dFunction``:

* weight: the full-precision difference ``dY/dW = X - W`` (not its sign);
* input: the HardTanh-clipped difference ``dY/dX = clamp(W - X, -1, 1)``;
* adaptive learning-rate scaling: the weight gradient is rescaled to
  ``eta * sqrt(numel(W)) * grad_W / ||grad_W||_2``.

How it is fast with pure PyTorch ops (``bench/adder_speed.py`` measures it:
about 8-16x a same-shape ``nn.Conv2d`` forward + backward on a shared 2-core
machine, against 50-260x for naive unfold-and-broadcast):

* patches are unfolded once into an ``(N, G * Kg)`` matrix (``N = B * Ho * Wo``
  positions, ``G`` groups, ``Kg = C_in / G * kh * kw``), gathered from a
  channels-last copy of the input;
* forward: one ``torch.cdist(patches, W, p=1)``, batched over groups;
* weight gradient: linear in X, so one matmul ``g^T @ patches - W * sum(g)``;
* input gradient: ``clamp(w - x, -1, 1) = w - clamp(x, w - 1, w + 1)``, so
  ``g @ W`` (one matmul) minus ``sum_c g * clamp(x, w_c - 1, w_c + 1)``, which
  streams over blocks of positions through one reused broadcast buffer of at
  most ``CHUNK_BUDGET_BYTES`` (one fused ``clamp`` and one ``baddbmm`` per
  block), then is folded back (col2im) with ``kh * kw`` strided adds in
  channels-last layout.

Nothing of size ``(N, C_out, K)`` is ever materialised; patches (9x the input
for a 3x3 kernel) are saved for backward.

``adder_conv2d`` (plain forward, ordinary autograd) is the numerical reference
that export and integer lowering reuse; ``adder_conv2d_train`` applies the
AdderNet gradients. Both are registered with ``torch.fx.wrap`` so a trace that
enters ``AdderConv2d.forward`` records one ``call_function`` node.
"""

from __future__ import annotations

import math
import operator
from typing import List, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import DataError, QCompileError

__all__ = [
    "AdderConfigError",
    "AdderConv2d",
    "AdderConv2dFunction",
    "CHUNK_BUDGET_BYTES",
    "DEVICE_CHUNK_BUDGET_BYTES",
    "adder_conv2d",
    "adder_conv2d_train",
]

CHUNK_BUDGET_BYTES = 8 * 2**20
"""Largest broadcast buffer (bytes) of the input-gradient kernel on CPU (hard
ceiling 64 MiB). A block of positions is broadcast against the whole weight, so a
cache-sized block keeps both passes in cache; 4-8 MiB measured fastest on an
idle 2-core EPYC, larger blocks (fewer parallel regions) only help when other
processes compete for the cores. Read at every call, so tests can shrink it."""

DEVICE_CHUNK_BUDGET_BYTES = 64 * 2**20
"""Broadcast buffer (bytes) on accelerators, where fewer, larger kernel launches
matter more than cache."""

IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Tuple[int, int]]


class AdderConfigError(QCompileError, ValueError):
    """An adder layer or ``adder_conv2d`` call got an invalid configuration."""


# --------------------------------------------------------------------------- arguments


def _pair(value: object, name: str, minimum: int) -> Tuple[int, int]:
    """``value`` as a pair of ints ``>= minimum`` (an int means both)."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    try:
        if len(items) != 2 or any(isinstance(v, bool) for v in items):
            raise TypeError
        pair = (operator.index(items[0]), operator.index(items[1]))
    except TypeError:
        raise AdderConfigError(f"{name}={value!r} must be an int or a pair of ints; pass e.g. {name}=3 or {name}=(3, 1)") from None
    if min(pair) < minimum:
        raise AdderConfigError(f"{name}={value!r} must be >= {minimum}; pass {name}={max(minimum, 1)} or larger")
    return pair


def _pads(padding: Padding, kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding for an ``nn.Conv2d``-style ``padding``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise AdderConfigError("padding='same' is not supported for strided adder layers; give the padding as ints")
            # As nn.Conv2d: the odd pixel of an even total goes to the bottom / right.
            th, tw = (d * (k - 1) for d, k in zip(dilation, kernel_size))
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise AdderConfigError(f"padding={padding!r} is not understood; pass 'same', 'valid', an int or a pair of ints")
    ph, pw = _pair(padding, "padding", 0)
    return (ph, ph, pw, pw)


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise AdderConfigError(f"groups={groups!r} must be a positive int; pass groups=1 for a dense layer")
    for name, count in (("in_channels", in_channels), ("out_channels", out_channels)):
        if count % groups:
            raise AdderConfigError(f"{name}={count} is not divisible by groups={groups}; pick groups dividing both channel counts")


def _chunk_budget(device: torch.device) -> int:
    """Broadcast buffer size for tensors on ``device`` (module constants read per call)."""
    return CHUNK_BUDGET_BYTES if device.type == "cpu" else max(CHUNK_BUDGET_BYTES, DEVICE_CHUNK_BUDGET_BYTES)


# --------------------------------------------------------------------------- kernels


class _Geometry:
    """Shapes of one adder call: input, padded input, output, kernel."""

    __slots__ = ("batch", "channels", "height", "width", "pads", "padded", "out", "kernel", "stride", "dilation", "groups")

    def __init__(self, x_shape: torch.Size, weight_shape: torch.Size, stride, pads, dilation, groups: int) -> None:
        self.batch, self.channels, self.height, self.width = x_shape
        self.pads = pads
        self.padded = (self.height + pads[0] + pads[1], self.width + pads[2] + pads[3])
        self.kernel = (weight_shape[2], weight_shape[3])
        self.stride, self.dilation, self.groups = stride, dilation, groups
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, self.kernel)]
        if self.padded[0] < extent[0] or self.padded[1] < extent[1]:
            raise DataError(
                f"input of spatial size {self.height}x{self.width} (padded {self.padded[0]}x{self.padded[1]}) is smaller "
                f"than the adder kernel extent {extent[0]}x{extent[1]}; give a larger input or more padding"
            )
        self.out = tuple((p - e) // s + 1 for p, e, s in zip(self.padded, extent, stride))

    @property
    def positions(self) -> int:
        return self.batch * self.out[0] * self.out[1]


def _unfold(x: Tensor, geo: _Geometry) -> Tensor:
    """Patches ``(N, G * kh * kw * Cg)``: row ``(b, i, j)``, columns ordered ``(group, kh, kw, channel)``.

    Built from a channels-last padded copy, so the gather copies contiguous
    channel runs (2-3x faster than gathering from NCHW, which reads 3-element rows).
    """
    top, bottom, left, right = geo.pads
    nhwc = x.permute(0, 2, 3, 1)
    nhwc = F.pad(nhwc, (0, 0, left, right, top, bottom)) if any(geo.pads) else nhwc.contiguous()
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
    view = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)  # B, Ho, Wo, C, eh, ew
    if dh != 1 or dw != 1:
        view = view[..., ::dh, ::dw]
    view = view.unflatten(3, (geo.groups, geo.channels // geo.groups)).permute(0, 1, 2, 3, 5, 6, 4)  # B, Ho, Wo, G, kh, kw, Cg
    return view.reshape(geo.positions, geo.channels * kh * kw)


def _fold(grad_patches: Tensor, geo: _Geometry) -> Tensor:
    """Adjoint of ``_unfold``: sum patch gradients back onto the input, ``(B, C, H, W)``."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = geo.kernel, geo.stride, geo.dilation, geo.out
    g7 = grad_patches.view(geo.batch, ho, wo, geo.groups, kh, kw, geo.channels // geo.groups)
    # Channels-last accumulation: each add reads and writes contiguous channel runs.
    padded = grad_patches.new_zeros(geo.batch, geo.padded[0], geo.padded[1], geo.groups, g7.shape[-1])
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            padded[:, rows, cols] += g7[:, :, :, :, i, j]
    top, _, left, _ = geo.pads
    grad = padded[:, top : top + geo.height, left : left + geo.width].flatten(3)
    return grad.permute(0, 3, 1, 2).contiguous()


def _weight3(weight: Tensor, groups: int) -> Tensor:
    """Weight ``(C_out, Cg, kh, kw)`` as ``(G, C_out / G, kh * kw * Cg)``, the column order of ``_unfold``."""
    cout, cg, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(groups, cout // groups, kh * kw * cg)


def _weight4(weight3: Tensor, weight_shape: torch.Size) -> Tensor:
    """Inverse of ``_weight3``."""
    cout, cg, kh, kw = weight_shape
    return weight3.reshape(cout, kh, kw, cg).permute(0, 3, 1, 2).contiguous()


def _rows_per_block(weight3: Tensor, budget: int) -> int:
    """Positions per block so a ``(rows, G, Cg, Kg)`` buffer fits ``budget`` (at least one)."""
    return max(1, budget // max(1, weight3.numel() * weight3.element_size()))


def _blocks(n_pos: int, weight3: Tensor, budget: int) -> Tuple[List[Tuple[int, int]], Tensor]:
    """``(start, stop)`` ranges of positions, and one reusable broadcast buffer."""
    rows = max(1, min(n_pos, _rows_per_block(weight3, budget)))
    buf = weight3.new_empty(rows, *weight3.shape)
    return [(start, min(n_pos, start + rows)) for start in range(0, n_pos, rows)], buf


def _negated_l1_distances(patches: Tensor, weight3: Tensor, geo: _Geometry) -> Tensor:
    """``Y[b, c, i, j] = -sum_k |x[n, g, k] - w[g, c, k]|`` as a contiguous ``(B, C_out, Ho, Wo)`` tensor.

    One ``torch.cdist(p=1)`` call, batched over groups: never materialises the
    ``(N, C_out, K)`` differences, is differentiable (true sign gradient) and is
    a single parallel region. Its CPU loop is scalar, so a blocked
    ``minimum``/``sum`` form (``|x - w| = x + w - 2 min(x, w)``) needs only
    0.3-0.6x its CPU time; but that is two parallel regions per block, and while
    other processes spin OpenMP threads on the same cores each region can cost
    milliseconds. On the benchmark shape (2 cores) the layer with the blocked
    forward measured ~8-9x a conv when quiet but 23-29x under such contention;
    with cdist ~9-11x and ~13x.
    """
    groups, cg, kg = weight3.shape
    distances = torch.cdist(patches.view(geo.positions, groups, kg).transpose(0, 1), weight3, p=1)  # G, N, Cg
    rows = distances.transpose(0, 1).reshape(geo.batch, geo.out[0], geo.out[1], groups * cg).permute(0, 3, 1, 2)
    if rows.requires_grad:
        return rows.neg().contiguous()
    return torch.neg(rows, out=rows.new_empty(rows.shape))  # one pass straight into NCHW


def _hardtanh_input_grad(patches: Tensor, weight3: Tensor, grad3: Tensor, budget: int) -> Tensor:
    """``G[n, g, k] = sum_c grad3[n, g, c] * clamp(weight3[g, c, k] - patches[n, g, k], -1, 1)``.

    Uses ``clamp(w - x, -1, 1) = w - clamp(x, w - 1, w + 1)``: the ``sum_c g * w``
    part is one matmul, and per block one fused broadcast ``clamp`` and one
    ``baddbmm`` subtract the rest. The clamped values are bounded by
    ``|w| + 1``, so nothing cancels however large the activations.
    """
    n_pos = patches.shape[0]
    groups, cg, kg = weight3.shape
    p4 = patches.view(n_pos, groups, 1, kg)
    low, high = (weight3 - 1).unsqueeze(0), (weight3 + 1).unsqueeze(0)
    # out[n, g, :] = grad3[n, g, :] @ weight3[g]
    out = torch.bmm(grad3.transpose(0, 1), weight3).transpose(0, 1).contiguous()
    blocks, buf = _blocks(n_pos, weight3, budget)
    for start, stop in blocks:
        n = stop - start
        block = buf[:n]
        torch.clamp(p4[start:stop], low, high, out=block)
        # Per (position, group): out -= (1, Cg) @ (Cg, Kg), batched.
        out[start:stop].view(n * groups, 1, kg).baddbmm_(grad3[start:stop].view(n * groups, 1, cg), block.view(n * groups, cg, kg), alpha=-1)
    return out


def _difference_weight_grad(patches: Tensor, weight3: Tensor, grad3: Tensor) -> Tensor:
    """``GW[g, c, k] = sum_n grad3[n, g, c] * (patches[n, g, k] - weight3[g, c, k])`` (linear in X)."""
    n_pos = patches.shape[0]
    groups, _, kg = weight3.shape
    p3 = patches.view(n_pos, groups, kg).transpose(0, 1)  # G, N, Kg
    g3 = grad3.permute(1, 2, 0)  # G, Cg, N
    grad = torch.bmm(g3, p3)
    grad -= weight3 * grad3.sum(dim=0).unsqueeze(-1)
    return grad


def _prepare(x: Tensor, weight: Tensor, stride, padding, dilation, groups) -> Tuple[Tensor, bool, _Geometry]:
    """Validate one call; return the batched input, whether it was unbatched, and the geometry."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise DataError("adder_conv2d takes tensors for the input and the weight; convert them with torch.as_tensor")
    if weight.dim() != 4:
        raise AdderConfigError(f"adder weight must be 4-D (out, in/groups, kh, kw), got shape {tuple(weight.shape)}; reshape it")
    stride2, dilation2 = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    kernel = (weight.shape[2], weight.shape[3])
    pads = _pads(padding, kernel, stride2, dilation2)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise AdderConfigError(f"groups={groups!r} must be a positive int dividing the {weight.shape[0]} output channels; fix groups")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise DataError(f"adder layer expects a (B, C, H, W) or (C, H, W) input, got shape {tuple(x.shape)}; reshape the input")
    if x.shape[1] != weight.shape[1] * groups:
        raise DataError(
            f"adder layer expects {weight.shape[1] * groups} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
            "give an input with matching channels"
        )
    if x.dtype != weight.dtype:
        raise DataError(f"adder input dtype {x.dtype} differs from weight dtype {weight.dtype}; convert one with .to(dtype)")
    if x.device != weight.device:
        raise DataError(f"adder input is on {x.device} but the weight is on {weight.device}; move both to one device")
    return x, unbatched, _Geometry(x.shape, weight.shape, stride2, pads, dilation2, groups)


# --------------------------------------------------------------------------- public functions


def adder_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """Adder layer forward ``-sum |X_patch - W|``, shaped like ``F.conv2d`` (no bias).

    The reference numerics for export and lowering (the same kernel as the
    layer's forward). Its autograd gradient is the true one of the L1 distance
    (sign of the difference); training uses ``adder_conv2d_train``. Integer
    inputs are computed exactly in float64 and returned as int64.

    Example:
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        >>> adder_conv2d(x, torch.ones(1, 1, 2, 2))
        tensor([[[[-6.]]]])
    """
    integer = isinstance(x, Tensor) and isinstance(weight, Tensor) and not x.is_floating_point() and not weight.is_floating_point()
    if integer:
        x, weight = x.to(torch.float64), weight.to(torch.float64)
    x, unbatched, geo = _prepare(x, weight, stride, padding, dilation, groups)
    y = _negated_l1_distances(_unfold(x, geo), _weight3(weight, groups), geo)
    if integer:
        y = torch.round(y).to(torch.int64)
    return y.squeeze(0) if unbatched else y


class AdderConv2dFunction(torch.autograd.Function):
    """Adder layer with AdderNet's surrogate gradients (full-precision weight
    difference, HardTanh input difference, optional adaptive scaling).

    ``apply(x, weight, stride, pads, dilation, groups, eta, adaptive_lr)`` with a
    batched input and already-normalised arguments; use ``adder_conv2d_train``.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, pads, dilation, groups, eta, adaptive_lr):  # type: ignore[override]
        geo = _Geometry(x.shape, weight.shape, stride, pads, dilation, groups)
        weight3 = _weight3(weight, groups).contiguous()
        patches = _unfold(x, geo)
        ctx.save_for_backward(patches, weight3)
        ctx.geo, ctx.eta, ctx.adaptive_lr, ctx.weight_shape = geo, eta, adaptive_lr, weight.shape
        return _negated_l1_distances(patches, weight3, geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        patches, weight3 = ctx.saved_tensors
        geo = ctx.geo
        # AdderNet defines the derivatives of Y itself: dY/dX = HT(W - X), dY/dW = X - W.
        grad3 = grad_out.permute(0, 2, 3, 1).reshape(geo.positions, geo.groups, weight3.shape[1]).contiguous()  # (N, G, Cg)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_patches = _hardtanh_input_grad(patches, weight3, grad3, _chunk_budget(patches.device))
            grad_x = _fold(grad_patches, geo)
        if ctx.needs_input_grad[1]:
            grad_w = _difference_weight_grad(patches, weight3, grad3)
            if ctx.adaptive_lr:
                norm = torch.linalg.vector_norm(grad_w).clamp_min(torch.finfo(grad_w.dtype).tiny)
                grad_w = grad_w / norm * (ctx.eta * math.sqrt(grad_w.numel()))
            grad_w = _weight4(grad_w, ctx.weight_shape)
        return grad_x, grad_w, None, None, None, None, None, None


def adder_conv2d_train(
    x: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    eta: float = 0.2,
    adaptive_lr: bool = True,
) -> Tensor:
    """``adder_conv2d`` with AdderNet's training gradients (see the module docstring).

    Same forward numbers as ``adder_conv2d``; floating-point inputs only.
    """
    if isinstance(x, Tensor) and not x.is_floating_point():
        raise DataError(f"adder training needs a floating-point input, got {x.dtype}; convert it with .float()")
    x, unbatched, geo = _prepare(x, weight, stride, padding, dilation, groups)
    y = AdderConv2dFunction.apply(x, weight, geo.stride, geo.pads, geo.dilation, groups, float(eta), bool(adaptive_lr))
    return y.squeeze(0) if unbatched else y


# A trace that enters AdderConv2d.forward records these as single call_function nodes.
torch.fx.wrap("adder_conv2d")
torch.fx.wrap("adder_conv2d_train")


# --------------------------------------------------------------------------- module


class AdderConv2d(nn.Module):
    """AdderNet layer with the constructor of ``nn.Conv2d`` (zero padding only).

    ``bias`` defaults to False (adder layers are followed by batch norm). ``eta``
    is the adaptive learning-rate coefficient; ``adaptive_lr=False`` leaves the
    weight gradient unscaled.

    Example:
        >>> layer = AdderConv2d(3, 8, 3, padding=1)
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        eta: float = 0.2,
        adaptive_lr: bool = True,
        device: object = None,
        dtype: object = None,
    ) -> None:
        super().__init__()
        for name, count in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise AdderConfigError(f"{name}={count!r} must be a positive int; pass the channel count")
        _check_groups(in_channels, out_channels, groups)
        if not eta > 0:
            raise AdderConfigError(f"eta={eta!r} must be positive; AdderNet uses eta=0.2")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        _pads(padding, self.kernel_size, self.stride, self.dilation)  # validates
        self.padding: Union[str, Tuple[int, int]] = padding if isinstance(padding, str) else _pair(padding, "padding", 0)
        self.eta, self.adaptive_lr = float(eta), bool(adaptive_lr)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weight (fan_in, ReLU gain); bias uniform in ``±1/sqrt(fan_in)`` like conv."""
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        y = adder_conv2d_train(x, self.weight, self.stride, self.padding, self.dilation, self.groups, self.eta, self.adaptive_lr)
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)
        return y

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        if self.eta != 0.2:
            s += f", eta={self.eta}"
        if not self.adaptive_lr:
            s += ", adaptive_lr=False"
        return s
