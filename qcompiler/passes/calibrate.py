"""Running the graph over calibration data while watching chosen tensors.

Calibration passes (``observe``, ``outlier-clamp``) differ only in what they do with
a watched tensor, so they share this ``fx.Interpreter``: it runs the graph batch by
batch in eval mode and hands the output of each watched node to its callback.
Nothing is kept between batches but what the callbacks keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from tqdm import tqdm

from ..distributed import LOCAL, Ranks, reduce_batchnorm
from ..nn.modes import training_mode


class _WatchingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict[str, Callable[[torch.Tensor], None]]) -> None:
        super().__init__(gm)
        self.watched = watched

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        callback = self.watched.get(n.name)
        if callback is not None:
            callback(out)
        return out


def run_calibration(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    watched: dict[str, Callable[[torch.Tensor], None]],
    desc: str,
    progress: bool = False,
) -> None:
    """Run ``gm`` on every batch, calling ``watched[node_name](value)`` as values appear."""
    interp = _WatchingInterpreter(gm, watched)
    with training_mode(gm, False), torch.no_grad():
        for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
            interp.run(x)


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
