"""Front-end step: functional layer calls with Parameter weights become layer modules.

``F.conv2d(x, self.weight, self.bias, stride=2)`` in a model's forward traces to a
``call_function`` node whose weight is a ``get_attr`` of a Parameter. Every pass,
record, report and backend works on ``call_module`` layers, so (as torch.ao's
``prepare`` does) this step rewrites each such call into a ``call_module`` of the
equivalent ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose1d/2d`` / ``nn.Linear``
that holds *the same Parameter objects*: training the compiled module trains them,
and a weight read at several call sites (or tied to another layer) stays one tensor.

Two forms store the weight transposed, ``(in, out)``: ``torch.addmm(b, x, W)``
(transformers' GPT-2 ``Conv1D``) and ``x @ W`` / ``torch.matmul(x, W)``. A Parameter
cannot be shared across a transpose, so their ``nn.Linear`` holds a transposed copy
and the original attribute is dropped from the compiled module; a weight that
another node also reads stays float (a copy would untie it).

A call that is not a fixed layer stays float, with the reason written as its
``qc.float`` record (the layer table and the float-layer warning show it): a weight
computed in ``forward`` or held in a buffer, an argument (stride, padding, ...)
computed in ``forward``, an unsupported shape. This runs on the traced copy only;
the user's model is never touched.

Example:
    >>> import torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(3, 4))
    ...     def forward(self, x):
    ...         return F.linear(x, self.w)
    >>> gm = fx.symbolic_trace(Net())
    >>> functional_to_modules(gm)
    ['linear']
    >>> gm.get_submodule("linear").weight is gm.w
    True
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ir


@dataclass(frozen=True)
class FunctionalForm:
    """How one function's arguments map onto a layer module's constructor."""

    names: tuple[str, ...]  # positional argument names after the input
    defaults: dict[str, object]
    build: Callable[[torch.Tensor, dict], nn.Module]  # (weight, constant args) -> float module on "meta"
    weight_dim: int  # the weight's rank for this layer (2 for linear, 3/4 for 1-d/2-d convolutions)
    transposed: bool = False  # the weight argument is (in, out): the module gets a transposed copy


def _conv(cls: type[nn.Module], transpose: bool) -> Callable[[torch.Tensor, dict], nn.Module]:
    def build(w: torch.Tensor, a: dict) -> nn.Module:
        groups = a["groups"]
        in_ch, out_ch = (w.shape[0], w.shape[1] * groups) if transpose else (w.shape[1] * groups, w.shape[0])
        extra = {"output_padding": a["output_padding"]} if transpose else {}
        return cls(in_ch, out_ch, tuple(w.shape[2:]), stride=a["stride"], padding=a["padding"],
                   dilation=a["dilation"], groups=groups, bias=a["bias"] is not None, device="meta", **extra)

    return build


def _linear(w: torch.Tensor, a: dict) -> nn.Module:
    return nn.Linear(w.shape[1], w.shape[0], bias=a["bias"] is not None, device="meta")


def _linear_from_in_out(w: torch.Tensor, a: dict) -> nn.Module:
    return nn.Linear(w.shape[0], w.shape[1], bias=a["bias"] is not None, device="meta")


_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_TCONV_ARGS = ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_TCONV_DEFAULTS = {**_CONV_DEFAULTS, "output_padding": 0}

FORMS: dict[object, FunctionalForm] = {
    F.linear: FunctionalForm(("weight", "bias"), {"bias": None}, _linear, 2),
    F.conv1d: FunctionalForm(_CONV_ARGS, _CONV_DEFAULTS, _conv(nn.Conv1d, False), 3),
    F.conv2d: FunctionalForm(_CONV_ARGS, _CONV_DEFAULTS, _conv(nn.Conv2d, False), 4),
    F.conv3d: FunctionalForm(_CONV_ARGS, _CONV_DEFAULTS, _conv(nn.Conv3d, False), 5),
    F.conv_transpose1d: FunctionalForm(_TCONV_ARGS, _TCONV_DEFAULTS, _conv(nn.ConvTranspose1d, True), 3),
    F.conv_transpose2d: FunctionalForm(_TCONV_ARGS, _TCONV_DEFAULTS, _conv(nn.ConvTranspose2d, True), 4),
    F.conv_transpose3d: FunctionalForm(_TCONV_ARGS, _TCONV_DEFAULTS, _conv(nn.ConvTranspose3d, True), 5),
    # x @ W with W (in, out); the operands are (input, weight)
    torch.matmul: FunctionalForm(("weight",), {"bias": None}, _linear_from_in_out, 2, transposed=True),
    operator.matmul: FunctionalForm(("weight",), {"bias": None}, _linear_from_in_out, 2, transposed=True),
}
# torch.addmm(bias, x, W): transformers' Conv1D (GPT-2); beta/alpha other than 1 stay float
_ADDMM = FunctionalForm(("weight",), {"bias": None, "beta": 1, "alpha": 1}, _linear_from_in_out, 2, transposed=True)


def _arguments(node: fx.Node, form: FunctionalForm) -> tuple[object, dict[str, object]]:
    """``(input, {name: value})`` with defaults filled in; for addmm, bias first as torch orders it."""
    if node.target is torch.addmm:  # addmm(input, mat1, mat2): torch's "input" is the bias
        renamed = {"input": "bias", "mat1": "input", "mat2": "weight"}
        values = dict(zip(("bias", "input", "weight"), node.args)) | {renamed.get(k, k): v for k, v in node.kwargs.items()}
        x = values.pop("input", None)
        return x, {**_ADDMM.defaults, **values}
    values = dict(zip(("input", *form.names), node.args)) | dict(node.kwargs)
    x = values.pop("input", values.pop("other", None))
    return x, {**form.defaults, **values}


def _param(gm: fx.GraphModule, arg: object) -> nn.Parameter | None:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(arg.target)
    except AttributeError:  # a buffer or a plain tensor attribute
        return None


def refusal(gm: fx.GraphModule, node: fx.Node, form: FunctionalForm, args: dict[str, object]) -> str | None:
    """Why this call cannot become a layer module, or ``None`` when it can."""
    weight, bias = args.get("weight"), args.get("bias")
    w = _param(gm, weight)
    if w is None:
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return f"its weight {weight.target!r} is a buffer or tensor constant, not an nn.Parameter"
        return "its weight is computed in forward, not an nn.Parameter of the model"
    if bias is not None and _param(gm, bias) is None:
        return "its bias is computed in forward or is not an nn.Parameter"
    for name, value in args.items():
        if name not in ("weight", "bias") and isinstance(value, fx.Node):
            return f"its argument {name!r} is computed in forward, not a constant"
    if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return "addmm with beta or alpha other than 1"
    if w.dim() != form.weight_dim:
        return f"its {w.dim()}-d weight is not the {form.weight_dim}-d weight of a layer"
    readers = [u for n in node.graph.nodes if n.op == "get_attr" and n.target == weight.target for u in n.users]
    if form.transposed and len(readers) > 1:
        return "its (in, out) weight is also read elsewhere; a transposed copy would untie them"
    if bias is not None and _param(gm, bias).dim() != 1:
        return "its bias is not a vector"
    return None


def _new_target(gm: fx.GraphModule, node: fx.Node, weight: fx.Node) -> str:
    """The module path: the weight's owner path (``h_0_attn_c_attn``), else the node's name; unique."""
    owner = str(weight.target).rpartition(".")[0].replace(".", "_")
    base = owner or node.name
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def functional_to_modules(gm: fx.GraphModule) -> list[str]:
    """Rewrite functional layer calls with Parameter weights into module calls; returns the new module paths.

    Calls left float carry a ``qc.float`` record saying why.
    """
    made: dict[tuple, str] = {}  # one module per (weight, bias, constant args): shared call sites share it
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        form = _ADDMM if node.target is torch.addmm else FORMS.get(node.target)
        if form is None:
            continue
        x, args = _arguments(node, form)
        if form.transposed and node.target is not torch.addmm and _param(gm, args.get("weight")) is None:
            continue  # a product of two activations: the matmul pass's business
        why = refusal(gm, node, form, args)
        if why is not None:
            node.meta[ir.FLOAT] = ir.FloatRegion(f"functional {_name(node)}: {why}")
            continue
        weight, bias = args["weight"], args["bias"]
        key = (weight.target, getattr(bias, "target", None),
               *sorted((k, repr(v)) for k, v in args.items() if k not in ("weight", "bias")))
        target = made.get(key)
        if target is None:
            w = _param(gm, weight)
            try:
                module = form.build(w, args)
            except (ValueError, TypeError, RuntimeError) as e:  # e.g. padding='same' with a stride: torch refuses it too
                node.meta[ir.FLOAT] = ir.FloatRegion(f"functional {_name(node)}: no equivalent layer ({e})")
                continue
            target = _new_target(gm, node, weight)
            module.weight = nn.Parameter(w.detach().t().contiguous(), w.requires_grad) if form.transposed else w
            if bias is not None:
                module.bias = _param(gm, bias)
            gm.add_submodule(target, module)
            made[key] = target
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, (x,))
        call.meta.update({k: v for k, v in node.meta.items() if k != ir.FLOAT})
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if all(n.name != target for n in gm.graph.nodes):  # named as its module; a second call site keeps fx's name
            call.name = target
        for attr in (weight, bias):
            if isinstance(attr, fx.Node) and not attr.users:
                gm.graph.erase_node(attr)
                if form.transposed and attr is weight:
                    _drop_attr(gm, str(attr.target))  # the Linear holds the transposed copy
    gm.graph.lint()
    gm.recompile()
    return list(dict.fromkeys(made.values()))


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    owner, _, attr = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, attr)


def _name(node: fx.Node) -> str:
    return "addmm" if node.target is torch.addmm else getattr(node.target, "__name__", str(node.target))


__all__ = ["functional_to_modules", "refusal", "FORMS"]
