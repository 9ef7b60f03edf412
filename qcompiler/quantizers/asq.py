"""ASQ: activation quantization whose step adapts to each input sample.

docs/design.md §4.3: ``beta = adapter(x)`` per sample, ``s_a = s * beta``, then LSQ with
step ``s_a`` (quantize and dequantize with ``s_a``). Because ``s_a`` is an ordinary
product, autograd gives exactly the method's gradients, ``d/ds = beta * g`` and
``d/dbeta = s * g``, with ``g`` the LSQ step gradient per sample (reduced over that
sample's elements by :func:`lsq_quantize`).

The adapter guard. The published adapter ends in a ReLU with a floor of 1e-8: once
its pre-activation goes negative, ``beta`` is stuck at 1e-8, every code saturates,
the ReLU passes no gradient and the layer is dead for good. We end the adapter in
``beta = exp(L * tanh(z / L))`` with ``L = ln(8)`` instead: positive, equal to 1 with
slope 1 at ``z = 0`` (so it behaves like ``exp`` near the initial point), bounded to
``[1/8, 8]`` so the step can neither vanish nor explode, and with a gradient that is
never exactly zero, so the adapter can always recover. The last linear layer starts
near zero, so ``beta ≈ 1`` at initialisation and ASQ starts as plain LSQ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..nn import exact
from ..nn.saved import recomputed, remember, save_input, saved_input
from ..numerics import quantize_codes
from .uniform import MIN_STEP, UniformQuantizer, lsq_quantize, positive

# beta stays in [1/8, 8]; ln 8 rounded to float32, so the float32 training path, the float64
# eval path and an ONNX float attribute all hold one value
BETA_BOUND = float(torch.tensor(math.log(8.0), dtype=torch.float32))
MIN_HIDDEN = 4  # small-channel fallback: never fewer hidden units than this


def adapter_hidden(channels: int) -> int:
    """Hidden width of the adapter: ``C/4``, but at least ``MIN_HIDDEN``.

    >>> adapter_hidden(64), adapter_hidden(3)
    (16, 4)
    """
    return max(channels // 4, MIN_HIDDEN)


def pool(x: torch.Tensor, feature_axis: int = 1) -> torch.Tensor:
    """Mean over every position of a sample, per feature: ``(N, C)``.

    ``feature_axis`` 1: ``(N, C, ...)`` (convolutions pool over space); -1:
    ``(N, ..., C)`` (a Linear over tokens pools over them, one ``beta`` per sample).

    >>> pool(torch.ones(2, 5, 3), feature_axis=-1).shape, pool(torch.ones(2, 5, 3)).shape
    (torch.Size([2, 3]), torch.Size([2, 5]))
    """
    if x.dim() <= 2:
        return x
    if feature_axis == 1:
        return x.flatten(2).mean(-1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


def adapter_forward(pooled, w1, b1, w2, b2) -> torch.Tensor:
    """The adapter's math: ``beta`` for pooled features ``(N, C)``.

    The autograd path (:class:`Adapter`) and the float64 deployed one call this; the fused
    kernel ``asq_forward`` issues the same ATen ops in the same order (so the same bits).
    """
    hidden = torch.relu(F.linear(pooled, w1, b1))
    bounded = torch.tanh(F.linear(hidden, w2, b2).squeeze(-1) / BETA_BOUND)
    return torch.exp(BETA_BOUND * bounded)


def beta_float64(x: torch.Tensor, weights, feature_axis: int = 1) -> torch.Tensor:
    """Each sample's ``beta`` computed in float64 from ``weights`` ``(fc1.w, fc1.b, fc2.w, fc2.b)``, no autograd.

    The deployed computation (pooling, both linear layers, tanh and exp rounded once at the
    end), which the ONNX body and the report compute the same way.
    """
    return adapter_forward(pool(x.detach().double(), feature_axis), *(w.detach().double() for w in weights))


def init_linear(layer: nn.Linear, generator: torch.Generator | None = None) -> None:
    """``nn.Linear``'s default initialisation, drawn from ``generator`` (global RNG if ``None``).

    The same distributions as ``nn.Linear.reset_parameters``: weights by Kaiming
    uniform with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and so the bias.

    Example:
        >>> a, b = (nn.utils.skip_init(nn.Linear, 4, 2) for _ in range(2))
        >>> init_linear(a, torch.Generator().manual_seed(0)); init_linear(b, torch.Generator().manual_seed(0))
        >>> torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        True
        >>> bool(a.weight.abs().max() <= 1 / 4**0.5)
        True
    """
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class Adapter(nn.Module):
    """Global average pool → Linear(C, C/4) → ReLU → Linear(C/4, 1) → bounded positive ``beta``.

    Initial weights come from ``generator`` when given, so a seeded compile builds
    the same adapters on every run; without one, from the global RNG.

    Example:
        >>> a, b = Adapter(8, torch.Generator().manual_seed(1)), Adapter(8, torch.Generator().manual_seed(1))
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """

    feature_axis = 1  # class default: adapters pickled before token inputs were supported

    def __init__(self, channels: int, generator: torch.Generator | None = None, feature_axis: int = 1) -> None:
        super().__init__()
        self.feature_axis = feature_axis  # 1: (N, C, ...) maps; -1: (N, ..., C) tokens
        hidden = adapter_hidden(channels)
        # skip_init: every draw below comes from ``generator``, none from the global RNG
        self.fc1 = nn.utils.skip_init(nn.Linear, channels, hidden)
        self.fc2 = nn.utils.skip_init(nn.Linear, hidden, 1)
        init_linear(self.fc1, generator)
        nn.init.normal_(self.fc2.weight, std=1e-3, generator=generator)
        nn.init.zeros_(self.fc2.bias)

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adapter_forward(pool(x, self.feature_axis), *self.weights())

    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def ops(self) -> int:
        """Multiplications per sample, counted like the paper's eq. 13 (``N_in * N_out``).

        The pooling is additions only, which the paper's operation count leaves out.
        """
        c, h = self.fc1.in_features, self.fc1.out_features
        return c * h + h


class _ASQ(torch.autograd.Function):
    """Adapter and per-sample LSQ in one autograd node, on the fused kernels.

    The same function as ``lsq_quantize(x, positive(s) * adapter(x), ...)``, with the
    backward pass written out: an ASQ layer is ~40 tiny autograd ops otherwise, whose
    bookkeeping costs more than their arithmetic at QAT batch sizes. Gradients, with
    ``g_n`` the per-sample LSQ step gradient (already times the gradient scale) and
    ``beta = exp(L tanh(z / L))``:
    ``ds = sum_n beta_n g_n``, ``dz_n = s g_n beta_n (1 - tanh^2)``, then back through
    the two linear layers and the ReLU, and the pooled-feature gradient spread evenly
    over each sample's positions and added to the straight-through ``dx``. Both passes are
    one kernel call each (``asq_forward``, ``asq_backward``): issued from Python, the
    adapter's ~30 tiny ops per layer cost ~5 ms of a ResNet-18 QAT step (issue #16).
    """

    @staticmethod
    def forward(ctx, x, step, w1, b1, w2, b2, qmin: int, qmax: int, grad_scale: float, kernel, feature_axis: int):  # type: ignore[override]
        x = x.contiguous()
        # pool, adapter_forward and positive, issued from C++ (the same ATen ops, so the same bits)
        out, beta, bounded, hidden, pooled, sample_step = kernel.asq_forward(
            x, step, w1, b1, w2, b2, qmin, qmax, feature_axis, MIN_STEP, BETA_BOUND)
        ctx.feature_axis = feature_axis
        ctx.kernel, ctx.qrange, ctx.grad_scale = kernel, (qmin, qmax), grad_scale
        # the adapter's intermediates are this node's own (neither inputs nor outputs): plain attributes
        ctx.adapter_values = beta, bounded, hidden, pooled, sample_step
        save_input(ctx, x, step, w1, w2)  # x may be a residual join's quantized output: its recipe is kept
        return remember(out, kernel.lsq_forward, x, sample_step, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, step, w1, w2 = saved_input(ctx)
        beta, bounded, hidden, pooled, sample_step = ctx.adapter_values
        need = ctx.needs_input_grad
        # one call: the adapter's gradients as ~20 tiny ATen ops cost more than the quantizer itself
        grads = ctx.kernel.asq_backward(grad, x, sample_step, step, beta, bounded, hidden, pooled, w1, w2,
                                        *ctx.qrange, ctx.grad_scale, ctx.feature_axis, need[0], MIN_STEP)
        grad_x, grad_step, grad_w1, grad_b1, grad_w2, grad_b2 = (g if n else None for g, n in zip(grads, need))
        return grad_x, grad_step, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None, None


class ASQQuantizer(UniformQuantizer):
    """LSQ activation quantizer whose per-tensor step is scaled per sample by an adapter.

    ``generator`` seeds the adapter's initial weights (see :class:`Adapter`).

    Example:
        >>> q = ASQQuantizer(bits=4, signed=False, channels=8)
        >>> x = torch.rand(3, 8, 5, 5)
        >>> q.init_from(x)
        >>> q.beta(x).shape
        torch.Size([3])
    """

    weight_kernels = None  # an activation quantizer: its step is scaled per sample, no weight's

    def __init__(self, bits: int, signed: bool, channels: int, generator: torch.Generator | None = None,
                 feature_axis: int = 1, zero_point: int | None = None) -> None:
        super().__init__(bits, signed, zero_point=zero_point)
        self.adapter = Adapter(channels, generator, feature_axis)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample step factor, shape ``(batch,)``."""
        return self.adapter(x)

    def sample_step(self, x: torch.Tensor) -> torch.Tensor:
        """``s * beta`` shaped to broadcast over each sample of ``x``.

        Deployed (eval mode, no autograd: :func:`~qcompiler.nn.exact.deployed`) the adapter (pooling,
        both linear layers, tanh, exp) and the product run
        in float64 and round once to ``x``'s dtype: onnxruntime sums the pooling and computes
        tanh and exp in its own way, and float32 results would differ in the last bit, moving
        every code of the sample near a tie; float64 differences almost never survive the
        final rounding (the ONNX body does the same, :mod:`qcompiler.runtime.onnx_ops`).
        """
        if not exact.deployed(self):
            beta = self.beta(x)
            return (positive(self.step) * beta).view(-1, *([1] * (x.dim() - 1)))
        beta = beta_float64(x, self.adapter.weights(), self.adapter.feature_axis)
        return (positive(self.step).double() * beta).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exact.deployed(self):
            return self.frozen_forward(x, self.sample_step(x))
        # one step per sample (dim 0), made inside the kernel from the per-tensor step
        kernel = kernels.usable(x, self.step) if x.dim() >= 2 else None
        weights = self.adapter.weights()
        # float32 adapter weights too: the fused backward does their matmuls itself
        if kernel is not None and all(p.dtype == torch.float32 for p in weights):
            return _ASQ.apply(x, self.step, *weights, self.qmin, self.qmax, self.grad_scale(x), kernel,
                              self.adapter.feature_axis)
        with recomputed(self):  # x may be a residual join's quantized output: its recipe is saved, not x
            return lsq_quantize(x, self.sample_step(x), self.qmin, self.qmax, self.grad_scale(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, self.sample_step(x), self.qmin, self.qmax)
