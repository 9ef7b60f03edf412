"""Front end: a float ``nn.Module`` plus example inputs become the IR.

The IR is a ``torch.fx.GraphModule`` traced from a deep copy of the user's model
(never the model itself), with shapes propagated from the example inputs and a
``LayerInfo`` record on every compute layer. Tracing failures are turned into one
line that names the module that could not be traced and how to mark it a leaf.

Example:
    >>> from torch import nn
    >>> gm = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> [n.name for n in compute_layers(gm)]
    ['_0']
"""

from __future__ import annotations

import contextlib
import copy
import io
import importlib
import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import ir
from .errors import DataError, SpecError, TraceError, UnsupportedError
from .attention import spell_out_attention
from .functional_layers import functional_to_modules
from .ir import LayerInfo, compute_layers
from .nn.adder import AdderConv2d

# Exact types only: a user subclass may change forward, so we leave it alone.
LAYER_KINDS: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Linear: "linear",
    AdderConv2d: "adder2d",
}


class _Tracer(fx.Tracer):
    """fx tracer that keeps our own layers opaque and remembers where it failed."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:  # default: unpickling rebuilds it bare
        super().__init__()
        self.leaf_types = (AdderConv2d, *leaf_types)
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module wins
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def resolve_leaf_types(names: Sequence[str]) -> tuple[type, ...]:
    """Import ``"package.module:Class"`` names given as leaf modules."""
    types = []
    for name in names:
        mod_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError, ValueError):
            raise SpecError(f"leaf module {name!r} cannot be imported; write it as package.module:Class") from None
        types.append(cls)
    return tuple(types)


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    leaf_modules: Sequence[str] = (),
) -> fx.GraphModule:
    """Trace a copy of ``model`` into the IR and annotate its compute layers.

    A ``torch.fx.GraphModule`` is taken as already traced: a copy of its graph is the
    IR as it stands (``leaf_modules`` do not apply). That is the hook for models our
    tracer cannot trace but another can, e.g. transformers' own tracer
    (:func:`qcompiler.hf.trace_transformers`).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    original, model = model, copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        # unpickling traces the code again with the tracer's extras (transformers': example inputs),
        # which a deep copy drops
        model._tracer_extras = dict(getattr(original, "_tracer_extras", {}))
        return _annotated(model, example_inputs)
    if type(model) in LAYER_KINDS:  # a bare layer would trace to a plain function call
        model = nn.Sequential(model)
    tracer = _Tracer(resolve_leaf_types(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds; all mean "not traceable"
        where = tracer.failed_in
        what = f"module {where[0]!r} ({where[1]})" if where and where[0] else f"model {type(model).__name__}"
        hint = f"{type(model.get_submodule(where[0])).__module__}:{where[1]}" if where and where[0] else "package.module:Class"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"cannot trace {what}: {reason}; make its forward traceable or mark it a leaf "
            f"with --leaf {hint} (QuantSpec(leaf_modules=[...]))"
        ) from None
    for node in graph.nodes:
        # String annotations (from __future__ import annotations) break pickling of the module.
        if isinstance(node.type, str):
            node.type = None
    return _annotated(fx.GraphModule(tracer.root, graph, type(model).__name__), example_inputs)


def _annotated(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The traced copy ``gm`` as IR: functional layers made modules, shapes and layer records written."""
    functional_to_modules(gm)  # F.conv2d(x, self.weight) becomes a Conv2d sharing that Parameter
    propagate_shapes(gm, example_inputs)
    if spell_out_attention(gm):  # fused attention as its two products, which quantize-matmuls quantizes
        propagate_shapes(gm, example_inputs)
    annotate_layers(gm)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` once on the example inputs, recording every tensor's shape."""
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) != n_inputs:
        raise DataError(f"the model takes {n_inputs} input(s) but {len(example_inputs)} example input(s) were given")
    try:
        # ShapeProp prints the failing node's traceback itself; the user gets one line.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        cause = e.__cause__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        param = next((t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()), None)
        dtypes = {str(x.dtype).removeprefix("torch.") for x in example_inputs}
        if param is not None and ("scalar type" in reason or "dtype" in reason) and dtypes != {str(param.dtype).removeprefix("torch.")}:
            want = str(param.dtype).removeprefix("torch.")
            raise DataError(
                f"input of dtype {', '.join(sorted(dtypes))} does not match the model's {want} weights ({reason}); "
                f"convert the data or the model to one dtype (e.g. x.to(torch.{want}))"
            ) from None
        raise DataError(
            f"input of shape {shapes} does not fit the model ({reason}); give data shaped as the model expects"
        ) from None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else ()


def annotate_layers(gm: fx.GraphModule) -> None:
    """Write a ``LayerInfo`` record on each conv / linear / adder node."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        kind = LAYER_KINDS.get(type(m))
        if kind is None:
            continue
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        w = m.weight
        # Each output element costs in_channels/groups * prod(kernel) accumulates.
        per_output = math.prod(w.shape[1:])
        out_elems = math.prod(out_shape) if out_shape else w.shape[0]
        conv_like = kind != "linear"
        if conv_like and getattr(m, "padding_mode", "zeros") != "zeros":
            raise UnsupportedError(
                f"layer {node.target!r} uses padding_mode={m.padding_mode!r}; only zero padding is supported: "
                "pad explicitly with F.pad before the layer and set padding_mode='zeros'"
            )
        node.meta[ir.LAYER] = LayerInfo(
            kind=kind,
            in_channels=m.in_channels if conv_like else m.in_features,
            out_channels=m.out_channels if conv_like else m.out_features,
            weight_shape=tuple(w.shape),
            input_shape=in_shape,
            output_shape=out_shape,
            macs=per_output * out_elems,
            kernel_size=tuple(m.kernel_size) if conv_like else (),
            stride=tuple(m.stride) if conv_like else (),
            padding=resolved_padding(m) if conv_like else (),
            groups=m.groups if conv_like else 1,
            has_bias=getattr(m, "bias", None) is not None,
            dilation=tuple(m.dilation) if conv_like else (),
            padding_mode="zeros",
        )


def resolved_padding(m: nn.Module) -> tuple[int, ...]:
    """``(before, after)`` zero padding per spatial dimension, ``'same'`` and ``'valid'`` resolved.

    As in ``torch.nn.Conv2d``, ``'same'`` puts the odd pixel of an even total after.

    >>> resolved_padding(nn.Conv2d(1, 1, kernel_size=4, padding="same"))
    (1, 2, 1, 2)
    >>> resolved_padding(nn.Conv1d(1, 1, kernel_size=3, padding=2))
    (2, 2)
    """
    kernel, dilation = tuple(m.kernel_size), tuple(m.dilation)
    if m.padding == "valid":
        return (0,) * (2 * len(kernel))
    if m.padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(v for t in totals for v in (t // 2, t - t // 2))
    pads = (m.padding,) * len(kernel) if isinstance(m.padding, int) else tuple(m.padding)
    return tuple(v for p in pads for v in (p, p))


__all__ = ["trace", "propagate_shapes", "annotate_layers", "compute_layers", "LAYER_KINDS"]
