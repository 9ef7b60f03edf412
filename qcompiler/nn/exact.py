"""Eval-mode numerics that the ONNX file reproduces bit for bit (docs/design.md §4.7).

In training the fake-quant module computes as fast as it can (fused kernels, float
convolutions on dequantized values). In eval mode without autograd (:func:`deployed`:
``model.eval()`` under ``torch.no_grad()``) it computes the deployed model, in
a form whose every float32 rounding is one IEEE operation that maps 1:1 to an ONNX op
with the same constants, so onnxruntime and PyTorch give identical values:

* a quantized layer convolves the **integer codes** of its input with the integer form
  of its weights (:func:`integer_weight`). Float32 sums of integers are exact, in any
  summation order, while every partial sum stays below 2^24 (:func:`exact_in`), so
  oneDNN and MLAS agree; one multiply by the per-channel scale ``step * unit[c]``
  follows, then the bias. An ungrouped layer whose bound reaches 2^24 sums ranges of its
  input channels apart (:func:`input_chunks`), each exact in float32, and the ranges in
  float64; where one channel alone reaches it (8-bit POT/POST), the integer weights are cut
  into bands of bits, each exact, scaled by powers of two and added in float64 in a fixed order
  (:func:`band_plan`); a layer with no such form keeps the float formula and is reported;
* batch norm is ``x * alpha + beta``, two ops with float32 constants from
  :func:`bn_affine` (PyTorch's kernel computes its own constants, may fuse the two, and
  onnxruntime's BatchNormalization rounds its own way);
* global average pooling sums in float64 (exact for grid values) and rounds once.

A quantizer's eval output carries its step (:func:`tag`/:func:`grid_of`), since the
layer reading it needs the step to recover the codes and ASQ's step is per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx
from torch import nn

from ..numerics import POST_MANTISSA, POST_SHIFT
from .layout import channel_weight

F32_EXACT = 2**24  # float32 holds every integer below this exactly
F64_EXACT = 2**53

_GRID = "_qc_grid"
POST_FACTOR = POST_MANTISSA * 2.0**-POST_SHIFT  # float32's 1/sqrt 2, exactly


@dataclass(frozen=True)
class Grid:
    """What an activation quantizer's eval output is: integer codes times ``step``.

    ``step`` is a scalar, or one per sample shaped to broadcast over the output (ASQ);
    ``bound`` is the largest code magnitude, ``max(|qmin|, |qmax|)``.
    """

    step: torch.Tensor
    bound: int


def deployed(module: nn.Module) -> bool:
    """Whether ``module`` computes the deployed numerics: eval mode without autograd.

    With gradients enabled an eval-mode module keeps the differentiable training formulas
    (straight-through gradients), which agree with these up to float32 rounding order.
    """
    return not module.training and not torch.is_grad_enabled()


def tag(y: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Mark ``y`` (a quantizer's eval output) as codes times ``step`` for the layer that reads it."""
    setattr(y, _GRID, Grid(step, max(abs(qmin), abs(qmax))))
    return y


def grid_of(x: torch.Tensor) -> Grid | None:
    return getattr(x, _GRID, None)


@dataclass(frozen=True)
class IntegerWeight:
    """A layer's weight as ``(ints + odd_factor * odd) * unit[c]``: integers (int64), a per-output-channel
    float32 unit, and for POST the odd exponents' integers and float32's ``1/sqrt 2``."""

    ints: torch.Tensor
    unit: torch.Tensor
    odd: torch.Tensor | None = None
    odd_factor: float = 0.0

    def parts(self) -> list[torch.Tensor]:
        return [self.ints] if self.odd is None else [self.ints, self.odd]


def integer_weight(grid: str, codes: torch.Tensor, scale: torch.Tensor, max_exponent: int = -1) -> IntegerWeight | None:
    """The integer form of a weight on ``grid`` from its codes and per-channel scale (None: no form).

    Uniform: the codes times the step. POT: ``sign * 2^-k = sign * 2^(K - k) * 2^-K`` with ``K``
    the largest exponent used (``ldexp`` of a float32 scale is exact). POST, ``k = 2j + r``:
    ``sign * 2^(J - j) * 2^-J`` times float32's ``1/sqrt 2`` for odd ``k``, so the layer sums the
    even and the odd exponents as two exact integer convolutions, ``acc_even + c * acc_odd``.

    >>> w = integer_weight("pot", torch.tensor([[1, -3, 0]]), torch.tensor([0.5]), 2)
    >>> w.ints.tolist(), w.unit.tolist()
    ([[4, -1, 0]], [0.125])
    >>> w = integer_weight("post", torch.tensor([[1, -2, 3, 0]]), torch.tensor([1.0]), 2)
    >>> w.ints.tolist(), w.odd.tolist(), w.unit.tolist()
    ([[2, 0, 1, 0]], [[0, -2, 0, 0]], [0.5])
    """
    codes = codes.to(torch.int64)
    scale = scale.detach().to(torch.float32)
    if grid == "uniform":
        return IntegerWeight(codes, scale)
    if grid not in ("pot", "post"):
        return None
    top = max(max_exponent, 0)
    k = (codes.abs() - 1).clamp_min(0)
    sign = torch.sign(codes)
    if grid == "pot":
        return IntegerWeight(sign * torch.pow(2, top - k), torch.ldexp(scale, torch.tensor(-top)).to(torch.float32))
    top_j = top // 2
    mag = sign * torch.pow(2, top_j - k // 2)
    odd = (k % 2 == 1) & (sign != 0)
    unit = torch.ldexp(scale, torch.tensor(-top_j)).to(torch.float32)
    return IntegerWeight(torch.where(odd, 0, mag), unit, torch.where(odd, mag, 0), POST_FACTOR)


def exact_in(dtype: torch.dtype, x_bound: int, ints: torch.Tensor) -> bool:
    """Whether every partial sum of ``x * ints`` (``|x| <= x_bound``) is an integer ``dtype`` holds exactly.

    The bound holds for any summation order: ``max_c sum_k |ints[c, k]| * x_bound``.

    >>> exact_in(torch.float32, 255, torch.full((4, 9), 127)), exact_in(torch.float32, 255, torch.full((4, 600), 127))
    (True, False)
    """
    limit = F32_EXACT if dtype == torch.float32 else F64_EXACT
    per_channel = ints.abs().reshape(ints.shape[0], -1).sum(1).max() if ints.numel() else torch.tensor(0)
    return int(per_channel) * x_bound < limit


def channel_view(v: torch.Tensor, rank: int, axis: int = 1) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return v.reshape(shape)


def input_chunks(weight: IntegerWeight, x_bound: int) -> tuple[tuple[int, int], ...] | None:
    """Consecutive input-channel ranges ``(start, stop)`` over which each weight part's partial
    sums stay below 2^24, or None where one input channel alone reaches it.

    A layer too wide to sum exactly in float32 in one piece (a 3x3x512 convolution at 8 bits)
    sums each range in float32, exactly, and the ranges in float64, exactly (:func:`integer_layer`).

    >>> input_chunks(IntegerWeight(torch.full((2, 4, 1), 127), torch.ones(2)), 2**16)
    ((0, 2), (2, 4))
    """
    return channel_ranges(weight.parts(), x_bound)


def channel_ranges(parts: list[torch.Tensor], x_bound: int) -> tuple[tuple[int, int], ...] | None:
    """:func:`input_chunks` of integer weight tensors ``parts`` (each ``(out, in, ...)``), every one kept exact."""
    per_input = torch.stack([part.abs().reshape(part.shape[0], part.shape[1], -1).sum(2) for part in parts])
    # (in, parts * out): the largest sum each input channel adds; NumPy, as the loop below is
    # one small step per input channel (torch's per-call overhead made it most of a compile)
    per_input = (per_input.double() * x_bound).reshape(-1, per_input.shape[2]).T.numpy()
    if (per_input >= F32_EXACT).any():
        return None
    chunks, start, running = [], 0, np.zeros(per_input.shape[1])
    for i, adds in enumerate(per_input):
        if (running + adds >= F32_EXACT).any():
            chunks.append((start, i))
            start, running = i, np.zeros_like(running)
        running = running + adds
    return (*chunks, (start, per_input.shape[0]))


def weight_band(ints: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """Bits ``[shift, shift + bits)`` of each ``|ints|``, with its sign: ``ints == sum 2^shift * band``.

    >>> weight_band(torch.tensor([5 * 2**12 + 3, -(2**13)]), 12, 12).tolist()
    [5, -2]
    """
    return torch.sign(ints) * ((ints.abs() >> shift) & ((1 << bits) - 1))


def band_plan(weight: IntegerWeight, x_bound: int) -> tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]] | None:
    """``(bits, shifts, chunks)`` where one input channel alone passes 2^24: the integer weights
    cut into bands of ``bits`` bits (:func:`weight_band`, shifts ``0, bits, 2 bits, ...``) small
    enough that each band sums exactly in float32 over the input-channel ranges ``chunks``, or None.

    An 8-bit POT or POST grid's integer weights ``2^(K-k)`` reach 2^31: no range of channels is
    exact in float32, but each band is, and the bands scale by exact powers of two.
    """
    kernel = max(1, weight.ints[0, 0].numel())
    bits = 0
    while x_bound * kernel * ((1 << (bits + 1)) - 1) < F32_EXACT:
        bits += 1
    top = max(int(part.abs().max()) for part in weight.parts()).bit_length()
    if bits < 1 or top <= bits:
        return None
    shifts = tuple(range(0, top, bits))
    chunks = channel_ranges([weight_band(part, shift, bits) for part in weight.parts() for shift in shifts], x_bound)
    return None if chunks is None else (bits, shifts, chunks)


def integer_layer(x: torch.Tensor, grid: Grid, weight: IntegerWeight, op, bias: torch.Tensor | None,
                  channel_axis: int = 1, int_bias: torch.Tensor | None = None,
                  chunks: tuple[tuple[int, int], ...] = (), band_bits: int = 0,
                  band_shifts: tuple[int, ...] = ()) -> torch.Tensor:
    """``op(codes, ints) * (step * unit) + bias``: the codes recovered exactly, an exact sum, one scale.

    With ``int_bias`` (:func:`integer_bias`) the bias is added to the exact sum instead,
    ``(acc + int_bias) * (step * unit)``: one rounding in all. With ``chunks``
    (:func:`input_chunks`) each input-channel range is summed in float32 and the ranges in
    float64, both exact; the sum (with the integer bias) is rounded once to float32.

    With ``band_bits`` (:func:`band_plan`) the weights are cut into bands, each summed that way
    and scaled by its exact power of two, the bands added in float64 in ``band_shifts`` order
    (rounded, but by the same operations in the same order as the ONNX file).

    ``round(x / step)`` gives back the codes exactly: ``x = fl(c * step)`` is within a relative
    2^-24 of ``c * step``, far from a half for codes below 2^16.
    """
    codes = torch.round(x / grid.step)

    def ranges_sum(ints: torch.Tensor) -> torch.Tensor:
        if not chunks:
            return op(codes, ints.to(x.dtype))
        if len(chunks) * F32_EXACT <= F64_EXACT:
            # each range sums below 2^24, so every partial sum of one float64 op over all of them is an
            # integer below 2^53: exact, the same number as the ranges' sum (the ONNX file sums those),
            # in one call where an 8-bit POST layer has hundreds of ranges per band
            return op(codes.double(), ints.double())
        parts = [op(codes.narrow(channel_axis, a, b - a), ints.narrow(1, a, b - a).to(x.dtype)).double() for a, b in chunks]
        return torch.stack(parts).sum(0)  # exact in any order: integers below 2^53

    def exact_sum(ints: torch.Tensor) -> torch.Tensor:
        if not band_bits:
            return ranges_sum(ints)
        total = None
        for shift in band_shifts:
            band = ranges_sum(weight_band(ints, shift, band_bits)).double() * 2.0**shift
            total = band if total is None else total + band
        return total

    acc = exact_sum(weight.ints)
    if weight.odd is not None:  # POST: one rounding for the odd exponents' factor, one for the sum
        acc = acc.to(x.dtype) + exact_sum(weight.odd).to(x.dtype) * torch.tensor(weight.odd_factor, dtype=x.dtype)
    axis = channel_axis % acc.dim()
    scale = grid.step * channel_view(weight.unit.to(x.dtype), acc.dim(), axis)
    if int_bias is not None:
        return (acc + channel_view(int_bias.to(acc.dtype), acc.dim(), axis)).to(x.dtype) * scale
    y = acc.to(x.dtype) * scale
    return y if bias is None else y + channel_view(bias.to(x.dtype), acc.dim(), channel_axis % acc.dim())


@dataclass(frozen=True)
class LayerPlan:
    """How a deployed quantized layer computes on integer codes; one decision for the module,
    the ONNX file and the integer program (:func:`plan_layer`)."""

    weight: IntegerWeight
    bn: nn.Module | None  # the batch norm folded in
    unit: torch.Tensor  # per channel, float32, the batch norm folded in
    bias: torch.Tensor | None  # float32, the batch norm folded in
    int_bias: torch.Tensor | None  # the bias in accumulator steps (scalar input steps), float64 integers
    chunks: tuple[tuple[int, int], ...] = ()  # input-channel ranges summed apart (:func:`input_chunks`); () is one
    band_bits: int = 0  # weights cut into bands of this many bits (:func:`band_plan`); 0: not cut
    band_shifts: tuple[int, ...] = ()

    @property
    def wide(self) -> bool:
        """Whether the sum is formed in float64 (input-channel ranges or weight bands)."""
        return bool(self.chunks or self.band_bits)


def plan_layer(weight: IntegerWeight | None, bias: torch.Tensor | None, bn: nn.Module | None, x_bound: int,
               step: torch.Tensor | float | None, dtype: torch.dtype = torch.float32,
               chunkable: bool = False) -> LayerPlan | None:
    """The integer form of a layer: its weight, folded constants and integer bias, or None where
    it has none or it would not be exact in ``dtype`` (the layer keeps the float formula).

    ``step`` is the input quantizer's scalar step, None for ASQ's per-sample steps (whose
    layers add a float bias after the scale). ``chunkable``: the layer's input channels can
    be summed apart (an ungrouped convolution or a linear layer); where one float32 sum
    would not be exact, the plan then sums ranges of them (:func:`input_chunks`). Where one
    input channel alone is not exact (8-bit POT/POST), the weights are cut into bands of
    bits (:func:`band_plan`), for any layer where that needs no channel ranges.
    """
    if weight is None:
        return None
    unit, folded_bias = folded_constants(weight.unit, bias, bn)
    int_bias = integer_bias(folded_bias, step, unit) if step is not None else None
    if exact_layer(weight, x_bound, int_bias, dtype):
        return LayerPlan(weight, bn, unit, folded_bias, int_bias)
    if dtype != torch.float32:
        return None
    chunks = input_chunks(weight, x_bound) if chunkable else None
    if chunks is not None:
        return LayerPlan(weight, bn, unit, folded_bias, int_bias, chunks)
    banded = band_plan(weight, x_bound)
    if banded is None or (len(banded[2]) > 1 and not chunkable):  # bands alone need no channel ranges
        return None
    bits, shifts, chunks = banded
    return LayerPlan(weight, bn, unit, folded_bias, int_bias, chunks if len(chunks) > 1 else (), bits, shifts)


def chunkable(layer: nn.Module) -> bool:
    """Whether ``layer`` can sum ranges of its input channels apart (:func:`input_chunks`): a
    convolution or linear map without groups. The module and the ONNX emitter both ask this."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and getattr(layer, "groups", 1) == 1


def frozen_layer(layer: nn.Module, x: torch.Tensor, op, channel_axis: int = 1) -> torch.Tensor | None:
    """A quantized layer's eval output (its batch norm folded in, :func:`linked_bn`), or None.

    On integer codes where it has an exact form; None (the caller keeps the float formula) when
    the input is not a quantizer's output, the weight grid has no integer form, or a partial sum
    could reach 2^24 (:func:`exact_in`). A folded batch norm is applied here in every case.
    """
    bn = linked_bn(layer)
    grid = grid_of(x)
    plan = None
    if grid is not None:
        weight = layer.weight_quant.integer_weight(channel_weight(layer).detach())
        step = grid.step if grid.step.dim() == 0 else None
        plan = plan_layer(weight, layer.bias, bn, grid.bound, step, x.dtype, chunkable(layer))
    if plan is None:
        if bn is None:
            return None
        y = op(x, layer.weight_quant(channel_weight(layer)))  # the float formula, then the batch norm as two ops
        return batchnorm(y if layer.bias is None else y + channel_view(layer.bias, y.dim(), channel_axis % y.dim()), bn)
    return integer_layer(x, grid, replace(plan.weight, unit=plan.unit), op, plan.bias, channel_axis, plan.int_bias,
                         plan.chunks, plan.band_bits, plan.band_shifts)


def folded_constants(unit: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module | None):
    """A layer's per-channel unit and bias with the batch norm after it folded in, float32.

    ``unit * alpha`` and ``(bias - mean) * alpha + beta``, each computed in float64 and rounded
    once (``alpha = gamma / sqrt(var + eps)``); without a batch norm, the layer's own.
    """
    if bn is None:
        return unit, bias
    alpha, beta = bn_affine(bn, torch.float64)
    b = beta if bias is None else bias.detach().double() * alpha + beta
    return (unit.double() * alpha).to(torch.float32), b.to(torch.float32)


def bn_link(layer: nn.Module) -> nn.Module | None:
    """The batch norm that ``layer`` folds into its deployed output (:func:`use_exact_eval`), if any.

    What the backends read, whatever the mode now; :func:`linked_bn` is the runtime check."""
    link = getattr(layer, "_qc_bn", None)
    return None if link is None else link[0]


def linked_bn(layer: nn.Module) -> nn.Module | None:
    """:func:`bn_link` when ``layer`` and its batch norm both compute the deployed numerics now."""
    bn = bn_link(layer)
    return bn if bn is not None and deployed(layer) and deployed(bn) else None


def integer_bias(bias: torch.Tensor | None, step: torch.Tensor | float, unit: torch.Tensor) -> torch.Tensor | None:
    """The bias in whole accumulator steps, ``round(bias / (step * unit[c]))``, as float64 integers, or None.

    What an integer deployment adds to its accumulator (an INT32 bias, as onnxruntime's
    QLinearConv does), so the module, the custom and QDQ files and the integer program all
    round the bias the same way. The accumulator step is the float32 product the layer
    scales by; None without a bias, with a per-sample (ASQ) step, or where a step is zero.
    """
    if bias is None or (isinstance(step, torch.Tensor) and step.dim() != 0):
        return None
    scale = torch.as_tensor(step, dtype=torch.float32).reshape(()) * unit.to(torch.float32)
    if not bool(torch.all(scale != 0)):
        return None
    return torch.round(bias.detach().double() / scale.double())


def exact_layer(weight: IntegerWeight | None, x_bound: int, int_bias: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> bool:
    """Whether the layer has an exact integer form: every part's partial sums, plus the integer
    bias, below ``dtype``'s exact-integer limit (:func:`exact_in`)."""
    if weight is None or not all(exact_in(dtype, x_bound, part) for part in weight.parts()):
        return False
    if int_bias is None:
        return True
    limit = F32_EXACT if dtype == torch.float32 else F64_EXACT
    per_channel = sum(part.abs().reshape(part.shape[0], -1).sum(1) for part in weight.parts()) * x_bound
    return bool(torch.all(per_channel.double() + int_bias.abs() < limit))


def batchnorm(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Eval-mode batch norm as two ops, ``x * alpha + beta`` (:func:`bn_affine`)."""
    alpha, beta = bn_affine(bn, x.dtype)
    return x * channel_view(alpha, x.dim()) + channel_view(beta, x.dim())


def bn_affine(m: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as ``x * alpha + beta``: the two vectors, computed in float64, rounded once to ``dtype``."""
    var, mean = m.running_var.double(), m.running_mean.double()
    alpha = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        alpha = m.weight.detach().double() * alpha
    beta = -mean * alpha + (m.bias.detach().double() if m.bias is not None else 0.0)
    return alpha.to(dtype), beta.to(dtype)


class _ExactBatchNorm:
    """Eval mode: ``x * alpha + beta`` as two ops (:func:`bn_affine`); training: the float layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not deployed(self) or self.running_mean is None:
            return super().forward(x)
        link = getattr(self, "_qc_layer", None)
        if link is not None and linked_bn(link[0]) is self:
            return x  # the layer before applied it
        return batchnorm(x, self)


class ExactBatchNorm1d(_ExactBatchNorm, nn.BatchNorm1d):
    pass


class ExactBatchNorm2d(_ExactBatchNorm, nn.BatchNorm2d):
    pass


class ExactBatchNorm3d(_ExactBatchNorm, nn.BatchNorm3d):
    pass


def mean(x: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``x.mean(dim, keepdim)`` as the deployed model computes it: without autograd, summed in
    float64 and rounded once; with autograd, ``torch.mean``.

    Grid values (codes times one step) sum exactly in float64, in any order, so
    onnxruntime's float64 ``ReduceMean`` gives the same bits, where a float32 sum's order
    would not. :func:`use_exact_eval` puts this function in place of a graph's ``mean`` calls.

    >>> x = torch.tensor([[0.1, 0.2, 0.7]])
    >>> with torch.no_grad():
    ...     bool(mean(x, 1) == x.double().mean(1).float())
    True
    """
    if torch.is_grad_enabled():
        return x.mean(dim, keepdim=keepdim)
    return _rounded_mean(x, dim, keepdim)


def _rounded_mean(x: torch.Tensor, dim, keepdim: bool) -> torch.Tensor:
    return x.double().mean(dim, keepdim=keepdim).to(x.dtype)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The deployed mean (:func:`mean`) over every axis after the channel, keeping them."""
    return _rounded_mean(x, tuple(range(2, x.dim())), True)


_GLOBAL_POOL_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool1d: (-1,), torch.nn.functional.adaptive_avg_pool2d: (-2, -1),
                          torch.nn.functional.adaptive_avg_pool3d: (-3, -2, -1)}


def _exact_means(graph: torch.fx.Graph) -> bool:
    """Point every ``x.mean(dim)`` / ``torch.mean(x, dim)`` of ``graph`` at :func:`mean`, and every
    global ``F.adaptive_avg_pool1d/2d(x, 1)`` at :func:`mean` over its axes (the functional twin of
    :class:`ExactAdaptiveAvgPool2d`); whether any changed."""
    changed = False
    for node in graph.nodes:
        dims = _GLOBAL_POOL_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if dims is not None:
            size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
            if isinstance(node.args[0], torch.fx.Node) and all(o == 1 for o in (size if isinstance(size, (tuple, list)) else (size,))):
                node.target, node.args, node.kwargs = mean, (node.args[0], dims), {"keepdim": True}
                changed = True
            continue
        if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)):
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dim is None or node.kwargs.get("dtype") is not None or not isinstance(node.args[0], torch.fx.Node):
            continue  # a mean of everything (a scalar) or in another dtype: left as written
        node.op, node.target, node.args, node.kwargs = "call_function", mean, (node.args[0], dim), {"keepdim": keepdim}
        changed = True
    return changed


class _ExactGlobalPool:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,)
        if not deployed(self) or any(s != 1 for s in size):
            return super().forward(x)
        return global_mean(x)


class ExactAdaptiveAvgPool1d(_ExactGlobalPool, nn.AdaptiveAvgPool1d):
    pass


class ExactAdaptiveAvgPool2d(_ExactGlobalPool, nn.AdaptiveAvgPool2d):
    pass


class ExactAdaptiveAvgPool3d(_ExactGlobalPool, nn.AdaptiveAvgPool3d):
    pass


_EXACT = {nn.BatchNorm1d: ExactBatchNorm1d, nn.BatchNorm2d: ExactBatchNorm2d, nn.BatchNorm3d: ExactBatchNorm3d,
          nn.AdaptiveAvgPool1d: ExactAdaptiveAvgPool1d, nn.AdaptiveAvgPool2d: ExactAdaptiveAvgPool2d,
          nn.AdaptiveAvgPool3d: ExactAdaptiveAvgPool3d}


def use_exact_eval(gm: nn.Module) -> nn.Module:
    """Give every batch norm, adaptive average pool and ``mean`` call of ``gm`` the eval numerics above.

    Each such submodule is replaced by an instance of a subclass that shares its parameters
    and buffers (the state dict and ``isinstance`` checks are unchanged, and the model the
    caller traced keeps its own modules); training mode computes as before. A batch norm
    that alone reads a quantized layer is linked to it: in eval mode the layer folds it into
    its per-channel scale and bias (:func:`folded_constants`) and the batch norm passes its
    input through. The links are plain attributes (tuples, so no submodule is registered).
    """
    for name, m in list(gm.named_modules()):
        cls = _EXACT.get(type(m))
        if cls is None or not name:
            continue
        q = cls.__new__(cls)
        q.__dict__.update(vars(m))
        q._parameters, q._buffers, q._modules = dict(m._parameters), dict(m._buffers), dict(m._modules)
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, q)
    graph = getattr(gm, "graph", None)
    if graph is not None and _exact_means(graph):
        gm.recompile()
    for node in graph.nodes if graph is not None else ():
        bn = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _ExactBatchNorm) or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        layer = gm.get_submodule(src.target) if src.op == "call_module" else None
        if layer is not None and hasattr(layer, "weight_quant") and len(src.users) == 1 and bn.running_mean is not None:
            layer._qc_bn, bn._qc_layer = (bn,), (layer,)
    return gm


__all__ = ["F32_EXACT", "Grid", "IntegerWeight", "LayerPlan", "bn_affine", "bn_link", "chunkable", "plan_layer", "deployed", "exact_layer", "integer_bias", "exact_in", "global_mean", "grid_of", "frozen_layer", "input_chunks", "integer_layer", "band_plan", "weight_band",
           "integer_weight", "mean", "tag", "use_exact_eval"]
