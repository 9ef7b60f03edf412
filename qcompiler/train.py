"""Training and evaluation: one recipe for the float model and for QAT.

SGD with momentum and a cosine learning-rate schedule without restarts, as in LSQ
and ASQ. Quantizer parameters (steps, clips, adapters' outputs) and batch-norm
parameters get no weight decay: shrinking a step towards zero is not
regularisation, it is a different quantizer.

The module trains where its parameters are (batches follow it to a CUDA device),
and data-parallel when it is wrapped in ``DistributedDataParallel``: each rank then
reads its own shard of the train split (``config.batch_size`` per rank), DDP
averages the gradients, quantizer steps included, the batch-norm statistics end
as rank 0's (:func:`~qcompiler.distributed.sync_buffers`), so every rank ends
with the same module, and every rank returns the losses averaged over all ranks.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .data import Dataset
from .errors import QCompileError, SpecError
from .nn.modes import training_mode
from .quantizers import UniformQuantizer
from .quantizers.power_grid import PowerGridQuantizer

# Modules whose parameters (steps, clips, ASQ adapters) are part of a quantizer.
QUANTIZER_TYPES = (UniformQuantizer, PowerGridQuantizer)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Example:
        >>> TrainConfig(epochs=3, lr=0.01).lr
        0.01
    """

    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_hyperparameters(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, lr=self.lr,
                              momentum=self.momentum, weight_decay=self.weight_decay)


_HINTS = {"lr": "; pass a positive learning rate such as 0.01"}


def check_hyperparameters(names: dict[str, str] | None = None, **values: object) -> None:
    """Validate training hyper-parameters by their :class:`TrainConfig` field names.

    ``names`` maps a field to what the user typed (``{"lr": "--lr"}``), so the CLI checks
    its flags up front with the same rules and names them in the error.

    >>> check_hyperparameters({"lr": "--lr"}, lr=float("nan"))
    Traceback (most recent call last):
    ...
    qcompiler.errors.SpecError: --lr must be a finite positive number, got nan; pass a positive learning rate such as 0.01
    """
    names = names or {}
    for field, v in values.items():
        shown = names.get(field, field)
        if field in ("epochs", "batch_size", "seed"):
            least = 1 if field == "batch_size" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise SpecError(f"{shown} must be an integer >= {least}, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (field == "lr" and v == 0):
            kind = "positive" if field == "lr" else "non-negative"
            raise SpecError(f"{shown} must be a finite {kind} number, got {v!r}{_HINTS.get(field, '')}")


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; none on quantizers, norms or biases."""
    quantizer_params = {
        id(p) for m in module.modules() if isinstance(m, QUANTIZER_TYPES) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in quantizer_params else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ranks(module: nn.Module) -> distributed.Ranks:
    """The data-parallel ranks ``module`` trains on: DDP's process group, else this process."""
    return distributed.ranks(module.process_group) if isinstance(module, DistributedDataParallel) else distributed.LOCAL


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def train(module: nn.Module, data: Dataset, config: TrainConfig = TrainConfig(), progress: bool | None = None) -> list[float]:
    """Train ``module`` in place on ``data``'s train split; returns per-epoch mean loss.

    ``module`` may be wrapped in ``DistributedDataParallel`` (see the module docstring).

    Example:
        >>> from qcompiler.data import load_digits
        >>> from qcompiler.zoo import plain_cnn
        >>> losses = train(plain_cnn(), load_digits(), TrainConfig(epochs=1), progress=False)
        >>> len(losses)
        1
    """
    if progress is None:
        progress = sys.stderr.isatty()
    torch.manual_seed(config.seed)
    opt = torch.optim.SGD(_param_groups(module, config.weight_decay), lr=config.lr, momentum=config.momentum)
    ranks, device = _ranks(module), _device(module)
    loader = data.loader("train", batch_size=config.batch_size, shuffle=True, seed=config.seed, shard=(ranks.rank, ranks.size))
    total = max(config.epochs * len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    module.train()
    losses = []
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False)
    for epoch in range(config.epochs):
        if ranks.distributed:
            loader.sampler.set_epoch(epoch)
        running, batches = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(module(x), y)
            if not torch.isfinite(loss):
                bar.close()
                raise QCompileError(
                    f"the training loss became {loss.item()} at step {bar.n + 1}; lower the learning rate "
                    f"(now {config.lr}) or check the data for extreme values"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            batches += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / batches:.3f}")
        losses.append(running / max(batches, 1))
    bar.close()
    if ranks.distributed:
        distributed.sync_buffers(module)
        losses = [v / ranks.size for v in distributed.all_reduce_values(losses, dist.ReduceOp.SUM, ranks)]
    module.eval()
    return losses


@torch.no_grad()
def evaluate(module: nn.Module, data: Dataset, split: str = "test", batch_size: int = 256) -> float:
    """Top-1 accuracy in percent on ``split``, in eval mode."""
    correct = total = 0
    device = _device(module)
    with training_mode(module, False):
        for x, y in data.loader(split, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)
