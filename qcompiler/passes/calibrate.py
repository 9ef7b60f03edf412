"""Running the graph over calibration data while watching chosen tensors.

Calibration passes (``observe``, ``outlier-clamp``, ``bias-correction``) differ only in
what they do with a watched tensor, so they share one ``fx.Interpreter``: it runs the
graph batch by batch in eval mode and hands the output of each watched node to its
callback; nothing is kept between batches but what the callbacks keep. It can also
compute the float model inside the quantized graph (``float_``), and run every batch
at once node by node (:class:`Lockstep`), for a pass that changes a layer from what
that layer's output shows before the layers after it run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from tqdm import tqdm

from .. import ir
from ..distributed import LOCAL, Ranks, reduce_batchnorm
from ..nn.modes import training_mode
from ..nn.qat import float_forward


class _WatchingInterpreter(fx.Interpreter):
    """Calls ``watched[node_name](value)`` as values appear.

    ``float_=True`` computes the float model inside the quantized graph: activation
    quantizers pass their input on and quantized layers use their float weights.
    """

    def __init__(self, gm: fx.GraphModule, watched: dict[str, Callable[[torch.Tensor], None]], float_: bool = False,
                 measure: bool = False) -> None:
        super().__init__(gm)
        self.watched, self.float_, self.measure = watched, float_, measure
        self.peak_bytes = 0  # with ``measure``: the most tensor bytes one run held at once

    def run_node(self, n: fx.Node):
        if self.float_ and ir.ACT in n.meta:
            out = self.env[n.args[0]]
        elif self.float_ and n.op == "call_module" and ir.WEIGHT in n.meta:
            module = self.fetch_attr(n.target)
            forward = float_forward(module)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = forward(module, *args, **kwargs) if forward is not None else module(*args, **kwargs)
        else:
            out = super().run_node(n)
        callback = self.watched.get(n.name)
        if callback is not None:
            callback(out)
        if self.measure:
            held = sum(v.nbytes for v in (*self.env.values(), out) if isinstance(v, torch.Tensor))
            self.peak_bytes = max(self.peak_bytes, held)
        return out


def run_calibration(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    watched: dict[str, Callable[[torch.Tensor], None]],
    desc: str,
    progress: bool = False,
    float_: bool = False,
) -> int:
    """Run ``gm`` on every batch, calling ``watched[node_name](value)`` as values appear
    (in the float model inside the graph with ``float_``). Returns the most tensor bytes
    one batch's run held at once (measured only with ``float_``, for :class:`Lockstep`)."""
    interp = _WatchingInterpreter(gm, watched, float_, measure=float_)
    with training_mode(gm, False), torch.no_grad():
        for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
            interp.run(x)
    return interp.peak_bytes


def sample_keeper(held: list[torch.Tensor], max_bytes: int) -> Callable[[torch.Tensor], None]:
    """A ``watched`` callback for :func:`run_calibration` that appends the first samples of each
    batch to ``held`` until they fill ``max_bytes`` (at least one sample): memory stays
    bounded on large models."""
    def add(x: torch.Tensor) -> None:
        room = max_bytes - sum(t.nbytes for t in held)
        per_sample = max(x[:1].nbytes, 1)
        if held and room < per_sample:
            return
        held.append(x[:max(1, room // per_sample)].clone())
    return add


class Lockstep:
    """The graph run on every batch at once, one node at a time (eval mode, no autograd).

    ``for node in run.nodes(): ...`` sees each node once its output exists on every
    batch (:meth:`outputs`); the loop body may change that node's module and
    :meth:`rerun` it before any later node runs. Values are freed after their last
    use, as ``fx.Interpreter`` does, so what is held is one inference's live
    activations for all the batches together (the caller bounds how many batches).
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[torch.Tensor]) -> None:
        self.gm = gm
        self.runs = [_WatchingInterpreter(gm, {}) for _ in batches]
        for run, x in zip(self.runs, batches):
            run.env, run.args_iter = {}, iter([x])

    def nodes(self):
        with training_mode(self.gm, False), torch.no_grad():
            for node in self.gm.graph.nodes:
                for run in self.runs:
                    run.env[node] = run.run_node(node)
                yield node
                for run in self.runs:
                    for dead in run.user_to_last_uses.get(node, []):
                        del run.env[dead]

    def outputs(self, node: fx.Node) -> list[torch.Tensor]:
        return [run.env[node] for run in self.runs]

    def rerun(self, node: fx.Node) -> None:
        for run in self.runs:
            run.env[node] = run.run_node(node)


def reestimate_batchnorm(gm: fx.GraphModule, batches: Sequence[torch.Tensor], progress: bool = False, ranks: Ranks = LOCAL) -> int:
    """Recompute every batch norm's running statistics on ``batches``; returns how many.

    Quantization shifts the distributions batch norm was fitted to; a cumulative
    average (``momentum=None``) over the calibration data replaces the old
    statistics, averaged over all ``ranks``' batches in a distributed compile.
    Only the batch norms run in training mode; nothing is trained.
    """
    norms = [m for m in gm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    with training_mode(gm, False), torch.no_grad():
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for x in tqdm(batches, desc="batch-norm", disable=not progress, leave=False):
                gm(x)
            reduce_batchnorm(norms, len(batches), ranks)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
    return len(norms)
