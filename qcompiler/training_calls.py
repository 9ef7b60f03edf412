"""Front-end step: calls whose ``training`` argument was read from ``self.training`` at trace time.

A model is traced in eval mode, so ``F.dropout(x, self.p, self.training)`` in its forward
becomes ``dropout(x, p, training=False)``: the flag is a constant of the graph, and QAT
of the compiled module would train without the dropout the model asked for (fx bakes
every Python value it reads). This step gives the flag back to the run time:

- dropout calls (``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``,
  ``F.feature_alpha_dropout``) traced with ``training=False`` and a non-zero ``p`` become
  the equivalent ``nn.Dropout*`` module, which reads its own ``training`` flag: the
  compiled module drops out under ``.train()`` and is the identity under ``.eval()``,
  like the original model. (A literal ``training=False`` with ``p > 0`` is a dropout that
  never drops; such a call is read as the ``self.training`` idiom.)
- drop-path calls (torchvision's ``stochastic_depth``, which its ``StochasticDepth`` module
  calls with ``self.training``; timm's ``drop_path``) become a :class:`TrainingOnlyCall`
  module: the function with the mode read at run time, the identity in eval;
- any other call with a constant ``training=False`` (a functional ``F.batch_norm``) stays as
  traced, and a :class:`TrainingFlagWarning` names it: in QAT it runs as in eval.

Example:
    >>> import torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return F.dropout(x, 0.25, self.training)
    >>> gm = fx.symbolic_trace(Net().eval())
    >>> restore_training_flags(gm)
    ['dropout']
    >>> gm.get_submodule("dropout")
    Dropout(p=0.25, inplace=False)
"""

from __future__ import annotations

import inspect
import warnings

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_DROPOUT_MODULES = {  # each dropout function's module
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout, F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}


# Functions that are the identity in eval mode, by qualified name (no import of their packages).
EVAL_IDENTITIES = {
    "torchvision.ops.stochastic_depth.stochastic_depth",
    "timm.layers.drop.drop_path",
}


class TrainingOnlyCall(nn.Module):
    """``fn(x, **arguments, training=self.training)``: a drop-path call that follows the module's mode.

    The identity in eval mode, as the backends compute it (:data:`qcompiler.analysis.DROPOUTS`).
    """

    def __init__(self, fn, arguments: dict) -> None:
        super().__init__()
        self.fn, self.arguments = fn, dict(arguments)

    def extra_repr(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__name__}, {self.arguments}"

    def forward(self, x):
        return self.fn(x, **self.arguments, training=self.training)


def _qualified_name(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"


def is_eval_identity(fn) -> bool:
    """Whether ``fn`` is a dropout or drop-path function: the identity in eval mode, the mode backends compute.

    >>> is_eval_identity(F.dropout2d), is_eval_identity(F.relu)
    (True, False)
    """
    return fn in _DROPOUT_MODULES or _qualified_name(fn) in EVAL_IDENTITIES


class TrainingFlagWarning(UserWarning):
    """A call's ``training`` argument was fixed to ``False`` when the model was traced."""


def _bound(node: fx.Node) -> dict | None:
    """The call's arguments by name (defaults filled in), or None where the target has no Python signature."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _mode_following(fn, args: dict) -> nn.Module | bool | None:
    """The module that computes ``fn(**args)`` with the mode read at run time; ``False`` where the call
    drops nothing (p = 0); ``None`` where there is none (an unknown function, an argument computed in forward)."""
    values = list(args.values())
    if not values or not isinstance(values[0], fx.Node) or any(isinstance(v, fx.Node) for v in values[1:]):
        return None
    module_cls = _DROPOUT_MODULES.get(fn)
    if module_cls is not None:
        p, inplace = args.get("p"), args.get("inplace", False)
        if not isinstance(p, (int, float)) or not isinstance(inplace, bool):
            return None
        return module_cls(float(p), inplace) if p else False
    if _qualified_name(fn) in EVAL_IDENTITIES:
        return TrainingOnlyCall(fn, {k: v for k, v in list(args.items())[1:] if k != "training"})
    return None


def restore_training_flags(gm: fx.GraphModule) -> list[str]:
    """Dropout and drop-path calls traced with ``training=False`` become modules that read the mode; returns their paths.

    Other calls with a constant ``training=False`` are named in one :class:`TrainingFlagWarning`.
    """
    made, baked = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not callable(node.target):
            continue
        args = _bound(node)
        if args is None or args.get("training") is not False:
            continue
        module = _mode_following(node.target, args)
        if module is None:
            baked.append(node)
            continue
        if not isinstance(module, nn.Module):
            continue  # drops nothing in either mode
        name, i = node.name, 1
        while hasattr(gm, name):
            name, i = f"{node.name}_{i}", i + 1
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (next(iter(args.values())),))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        call.name = name
        made.append(name)
    if baked:
        names = ", ".join(f"{n.name} ({getattr(n.target, '__name__', n.target)})" for n in baked)
        warnings.warn(
            f"{names}: traced with training=False read from the model's mode, so QAT of the compiled module runs "
            "them as in eval; write them as modules (nn.BatchNorm2d, nn.Dropout) to train them",
            TrainingFlagWarning, stacklevel=3)
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


__all__ = ["EVAL_IDENTITIES", "TrainingFlagWarning", "TrainingOnlyCall", "is_eval_identity", "restore_training_flags"]
