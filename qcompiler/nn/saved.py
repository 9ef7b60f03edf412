"""Quantized tensors a QAT layer saves for backward: recomputed there instead of kept.

A QAT convolution computes ``conv(x_q, w_q)`` and autograd keeps both ``x_q`` and
``w_q`` for the backward pass, while the quantizers that made them keep their own
inputs ``x`` and ``w`` (for their gradients; ``w`` is a parameter anyway). So every
weight and every quantized activation was held twice: ResNet-18's QAT step needed
~2.1x the float step's memory (issue #16), ~43 MiB of it float32 copies of weights.

Here a quantizer marks its output with how to make it again (:func:`remember`: the
same kernel or eager expression on the same input and step), and the layer runs its
convolution or matmul under :func:`recomputed`, whose pack hook saves that recipe
instead of the tensor. In backward the unpack hook reruns the recipe: the same
deterministic elementwise arithmetic on the same inputs, so the layer's backward
sees bit-identical values and every gradient is unchanged (tests check this). The
cost is one quantizer forward pass per layer in backward; the memory saved is a
float32 copy of every weight and of every quantized layer input. Storing int8 codes
instead would keep a quarter of that and cost as much to unpack, plus a packing pass.
A convolution whose weight quantizer runs on the fused kernels folds the weight's remake into
the quantizer's backward pass instead (:class:`qcompiler.nn.qat._OneNodeConv`).

Only the training path uses it: with grad disabled, in eval mode, or while tracing,
exporting or compiling, :func:`recomputed` does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from .. import kernels
from ..threadswitch import ThreadSwitch
from ..tracing import capturing

_RECIPE = "_qcompiler_recompute"


_switch = ThreadSwitch()  # disabled() blocks, per thread


def disabled() -> contextlib.AbstractContextManager:
    """Keep quantized tensors for backward as before, in this thread (for comparisons and debugging)."""
    return _switch.off()


def remember(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Mark ``out`` as ``fn(*args)`` (run without grad), so a layer may save the recipe instead; returns ``out``.

    ``fn`` must reproduce ``out`` bit for bit from ``args``; tensors among ``args``
    must not change in place before the backward pass (checked when it runs). An
    argument that is itself remembered (a quantizer reading another's output) is
    kept as its recipe, so the chain holds only the first quantizer's input.
    """
    if capturing():  # graphs (jit, ONNX, torch.compile) get plain tensors
        return out
    args = tuple(_Recipe(r, None) if (r := _recipe_of(a)) is not None else a for a in args)
    versions = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
    # out's own version too: changed in place later (an inplace ReLU on a batch norm's
    # output), out no longer equals the recipe, and is saved as it is
    setattr(out, _RECIPE, (fn, args, versions, out._version))
    return out


def _recipe_of(t: Any) -> tuple | None:
    """The recipe remembered for ``t``, if it still describes ``t`` (not changed in place since)."""
    recipe = getattr(t, _RECIPE, None) if isinstance(t, torch.Tensor) else None
    return recipe if recipe is not None and recipe[3] == t._version else None


class _Recipe:
    """What a pack hook keeps for a remembered tensor (or a view of one)."""

    __slots__ = ("fn", "args", "versions", "view")

    def __init__(self, recipe: tuple, view: tuple | None) -> None:
        self.fn, self.args, self.versions, _ = recipe
        self.view = view  # (size, stride, storage_offset) when the saved tensor is a view of the remembered one

    def run(self) -> torch.Tensor:
        for a, v in zip(self.args, self.versions):
            if v is not None and a._version != v:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a quantizer input of shape {tuple(a.shape)} is at version {a._version}, "
                    f"expected version {v} (qcompiler recomputes quantized tensors from it in backward)"
                )
        with torch.no_grad():
            out = self.fn(*(a.run() if isinstance(a, _Recipe) else a for a in self.args))
        return out if self.view is None else out.as_strided(*self.view)


def _pack(t: torch.Tensor) -> Any:
    if _switch.is_off():
        return t
    recipe = _recipe_of(t)
    if recipe is not None:
        return _Recipe(recipe, None)
    base = t._base
    if base is not None and t.dtype == base.dtype:  # e.g. F.linear saves weight.t()
        recipe = _recipe_of(base)
        if recipe is not None:
            return _Recipe(recipe, (t.size(), t.stride(), t.storage_offset()))
    return t


def _unpack(packed: Any) -> torch.Tensor:
    return packed.run() if isinstance(packed, _Recipe) else packed


def save_input(ctx: Any, x: torch.Tensor, *tensors: torch.Tensor) -> None:
    """``ctx.save_for_backward(x, *tensors)`` for a quantizer's autograd node, keeping ``x``'s recipe
    instead of ``x`` where it has one (another quantizer's output, a batch norm's output it reads).

    What :func:`recomputed`'s hooks would do for ``x``, without hooks on the node's other
    saved tensors (intermediates that have no recipe): a quantizer runs ~60 times per
    ResNet-18 QAT step, and the hooks' Python calls cost more than these tensors' bookkeeping.
    :func:`saved_input` gives the tensors back.
    """
    packed = _pack(x)
    ctx.input_recipe = packed if isinstance(packed, _Recipe) else None
    ctx.save_for_backward(*tensors) if ctx.input_recipe is not None else ctx.save_for_backward(x, *tensors)


def saved_input(ctx: Any) -> tuple[torch.Tensor, ...]:
    """What :func:`save_input` saved: ``(x, *tensors)``, ``x`` made again from its recipe where it was kept as one."""
    if ctx.input_recipe is None:
        return ctx.saved_tensors
    return (ctx.input_recipe.run(), *ctx.saved_tensors)


def active(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is a training forward that autograd records (not eval, tracing or export)."""
    return module.training and torch.is_grad_enabled() and not capturing()


@contextlib.contextmanager
def _hooks() -> Iterator[None]:
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _batch_norm_values(x: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    # batch statistics, as a training batch norm computes its output (running statistics only get updated)
    return torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def _batch_statistics(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and 1/std the batch norm that made ``out`` from ``x`` saved for its backward, where
    the fused ``batch_norm_output`` can remake ``out`` from them (contiguous float32 on the CPU)."""
    node = out.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0" or not (
            x.dtype == out.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.dim() >= 2):
        return None
    return node._saved_result1, node._saved_result2


def _remember_batch_norm_output(bn: torch.nn.Module, inputs: tuple, out: Any) -> None:
    if isinstance(out, torch.Tensor) and bn.training and active(bn) and not _switch.is_off():
        x = inputs[0]
        statistics = _batch_statistics(x, out)
        form = kernels.batch_norm_form() if statistics is not None else None
        if form is not None:  # one pass from the saved statistics instead of the whole batch norm again
            remember(out, kernels.fused().batch_norm_output, x, *statistics, bn.weight, bn.bias, form)
        else:
            remember(out, _batch_norm_values, x, bn.weight, bn.bias, bn.eps)


def recompute_output(bn: torch.nn.Module) -> None:
    """Let a quantizer reading this batch norm's output save a recipe for it instead of the output.

    A residual join's quantizer keeps its input (a batch norm's output, which nothing
    else keeps) for its gradients; in training the batch norm keeps its own input,
    so backward can run the batch norm again on it (same op, same batch statistics,
    same bits). Only ``BatchNorm1d/2d/3d`` and their subclasses (the deployed-numerics
    ones train as plain batch norms): a ``SyncBatchNorm`` would need its collectives again.
    """
    if isinstance(bn, BATCH_NORMS) and _remember_batch_norm_output not in bn._forward_hooks.values():
        bn.register_forward_hook(_remember_batch_norm_output)


def recomputed(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Context for a layer's compute op (or a quantizer's): remembered tensors it saves are recomputed in backward."""
    return _hooks() if active(module) else contextlib.nullcontext()


__all__ = ["active", "disabled", "recompute_output", "recomputed", "remember", "save_input", "saved_input"]
