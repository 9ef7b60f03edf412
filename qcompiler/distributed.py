"""Compiling on several processes at once: every rank builds the same module.

Under ``torch.distributed`` (``torchrun``, or any initialised process group)
:func:`qcompiler.compile` runs its calibration passes on each rank's own share of
the data and reduces what they measure, so every rank ends with bit-identical
quantizers and records, ready to be wrapped in ``DistributedDataParallel``:

=====================================================  ===============================================
state computed during compile                          how the ranks agree
=====================================================  ===============================================
observed ranges: min, max, sum and count of ``|x|``    all-reduce MIN / MAX / SUM (:func:`reduce_observers`)
``|x|`` histograms (percentiles)                       widened to one power-of-two range, then SUM
outlier-clamp range (a max over batches)               all-reduce MAX, batch counts SUM
batch-norm re-estimation (adder passes)                batch-weighted means and variances, SUM
activation steps (from ``mean|x|`` or ``max|x|``)      computed from the reduced ranges
weight steps, POT/POST clips, adder k-means groups     computed from the weights, which are rank 0's
ASQ adapters                                           seeded per layer from ``spec.seed``: equal already
=====================================================  ===============================================

Two things cannot be reduced. The float model itself: if ranks built it
differently, its parameters and buffers are broadcast from rank 0 before the first
pass (what ``DistributedDataParallel`` would do to the compiled module anyway, but
the weight quantizers and adder groups are computed from the weights, so it must
happen first). And anything a pass might compute from one rank's data alone: after
the last pass every rank fingerprints its parameters, buffers and records, and a
difference is an error (:func:`check_identical`) rather than a silent divergence.

Everything here is a no-op for :data:`LOCAL`, a single process.

Example (each rank, under ``torchrun --nproc_per_node=2``)::

    dist.init_process_group("gloo")
    compiled = qcompiler.compile(model, spec, calib_data=load_digits())  # reduces over the default group
    ddp = DistributedDataParallel(compiled.module)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import ir
from .errors import QCompileError
from .observers import RangeObserver

__all__ = [
    "LOCAL",
    "DistributedError",
    "Ranks",
    "all_reduce_values",
    "broadcast_module",
    "check_identical",
    "ranks",
    "reduce_batchnorm",
    "reduce_observers",
    "shard",
    "sync_buffers",
]


class DistributedError(QCompileError):
    """The ranks of a distributed compile disagree (different models or specs)."""


@dataclass(frozen=True)
class Ranks:
    """The processes a compile reduces over.

    ``group`` is what ``torch.distributed`` collectives take (``None``: the default
    group); ``size`` and ``rank`` are this process's view of it.
    """

    group: object = None
    size: int = 1
    rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


LOCAL = Ranks()  # this process alone: every helper below returns at once


def ranks(process_group: object = None) -> Ranks:
    """The ranks a compile with ``process_group=`` reduces over.

    ``None``: the default group when ``torch.distributed`` is initialised, else
    :data:`LOCAL`; a ``ProcessGroup``: that group; ``False``: this process alone
    (for a compile only some ranks run, e.g. on rank 0 after training).

    >>> ranks() == LOCAL, ranks(False) == LOCAL  # not initialised here
    (True, True)
    """
    if process_group is False:
        return LOCAL
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if process_group is not None:
            raise DistributedError("process_group= was given but torch.distributed is not initialised; call init_process_group first")
        return LOCAL
    return Ranks(process_group, dist.get_world_size(process_group), dist.get_rank(process_group))


def _comm_device(r: Ranks) -> torch.device:
    """Where collective tensors must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(r.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, r: Ranks) -> torch.Tensor:
    """``t`` reduced over ``r`` (a new tensor on ``t``'s device)."""
    work = t.to(_comm_device(r), copy=True)
    dist.all_reduce(work, op=op, group=r.group)
    return work.to(t.device)


def all_reduce_values(values: Sequence[float], op: dist.ReduceOp, r: Ranks) -> list[float]:
    """Python floats reduced over ``r`` in float64 (``op`` is ``dist.ReduceOp.SUM``, ``MAX``, ...).

    >>> all_reduce_values([1.5, 2.0], dist.ReduceOp.SUM, LOCAL)
    [1.5, 2.0]
    """
    if not r.distributed or not values:
        return list(values)
    return _all_reduce(torch.tensor(values, dtype=torch.float64), op, r).tolist()


def reduce_observers(observers: dict[str, RangeObserver], r: Ranks) -> None:
    """Make every rank's ``observers`` (by tensor name) what one observer of all ranks' data would hold.

    Two collectives whatever the number of observers: MAX of ``(max, -min, range)``,
    then, with each histogram widened to the common power-of-two range (exact, see
    :mod:`qcompiler.observers`), SUM of ``(sum |x|, count, histograms)``. Observers
    pair up across ranks by name, so the caller's order does not matter.
    """
    if not r.distributed or not observers:
        return
    observers = [observers[name] for name in sorted(observers)]
    tops = all_reduce_values([v for o in observers for v in (o.max, -o.min, o.edge)], dist.ReduceOp.MAX, r)
    for o, (high, neg_low, edge) in zip(observers, zip(*[iter(tops)] * 3)):
        o.max, o.min = high, -neg_low
        o.widen_to(edge)
    scalars = [torch.tensor([o.abs_sum, float(o.count)], dtype=torch.float64) for o in observers]
    sums = torch.cat(scalars + [o.hist for o in observers] + [o.neg_hist for o in observers])
    sums = _all_reduce(sums, dist.ReduceOp.SUM, r)
    totals, hists = sums[: 2 * len(observers)].tolist(), sums[2 * len(observers) :].split([o.bins for o in observers] * 2)
    for i, o in enumerate(observers):
        o.abs_sum, o.count = totals[2 * i], int(totals[2 * i + 1])
        o.hist, o.neg_hist = hists[i].clone(), hists[len(observers) + i].clone()


def reduce_batchnorm(norms: Sequence[nn.modules.batchnorm._BatchNorm], batches: int, r: Ranks) -> None:
    """Combine batch-norm statistics that each rank averaged over its own ``batches`` batches.

    With ``momentum=None`` a batch norm's running mean and variance are averages of
    per-batch statistics, so the average over all ranks' batches is the sum of
    ``batches * statistic`` over ranks divided by the total batch count (in float64).
    """
    norms = [m for m in norms if m.track_running_stats]
    if not r.distributed or not norms:
        return
    stats = [(m.running_mean, m.running_var) for m in norms]
    packed = torch.cat([s.double().cpu().flatten() * batches for pair in stats for s in pair] + [torch.tensor([float(batches)], dtype=torch.float64)])
    packed = _all_reduce(packed, dist.ReduceOp.SUM, r)
    total = float(packed[-1])
    flat = iter(packed[:-1].split([s.numel() for pair in stats for s in pair]))
    with torch.no_grad():
        for m in norms:
            for buf in (m.running_mean, m.running_var):
                buf.copy_((next(flat) / max(total, 1.0)).view_as(buf))
            m.num_batches_tracked.fill_(int(total))


def shard(batches: Sequence[torch.Tensor], r: Ranks) -> list[torch.Tensor]:
    """This rank's share of ``batches``: every ``size``-th one, starting at ``rank``.

    >>> shard([1, 2, 3, 4, 5], Ranks(size=2, rank=1))
    [2, 4]
    """
    return list(batches[r.rank :: r.size])


def _root(r: Ranks) -> int:
    """The global rank of the group's rank 0 (collectives name ranks globally)."""
    return 0 if r.group is None else dist.get_global_rank(r.group, 0)


def _broadcast(tensors: Sequence[torch.Tensor], r: Ranks) -> None:
    """Overwrite ``tensors`` with rank 0's, in place."""
    if not r.distributed:
        return
    device = _comm_device(r)
    with torch.no_grad():
        for t in tensors:
            work = t.detach().to(device, copy=True)
            dist.broadcast(work, src=_root(r), group=r.group)
            t.copy_(work)


def broadcast_module(module: nn.Module, r: Ranks) -> None:
    """Overwrite ``module``'s parameters and buffers with rank 0's, in place."""
    _broadcast([*module.parameters(), *module.buffers()], r)


def sync_buffers(module: nn.Module, process_group: object = None) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics), as DDP does before each forward.

    After the last training step each rank's batch norms hold statistics updated
    with its own last batch; call this (``qcompiler.train`` does) before saving or
    comparing modules. ``module`` may be the DDP wrapper; ``process_group`` defaults
    to its group, else the default group.

    >>> sync_buffers(torch.nn.BatchNorm1d(3))  # one process: nothing to do
    """
    if process_group is None and isinstance(module, DistributedDataParallel):
        process_group = module.process_group
    _broadcast(list(module.buffers()), ranks(process_group))


def _digest(data: bytes) -> int:
    # 62 bits, so that the negation below cannot overflow int64
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def fingerprints(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """``(what, hash)`` of every tensor in ``gm``'s state and of every node's records."""
    prints = []
    for name, t in gm.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        prints.append((f"tensor {name!r}", _digest(raw + str((t.dtype, tuple(t.shape))).encode())))
    for node in gm.graph.nodes:
        if ir.records(node):
            prints.append((f"the records of node {node.name!r}", _digest(repr(ir.records(node)).encode())))
    return prints


def check_identical(gm: torch.fx.GraphModule, r: Ranks) -> None:
    """Raise :class:`DistributedError` unless every rank's ``gm`` has the same state and records.

    One collective: MAX over ranks of ``(h, -h)`` for every fingerprint ``h`` gives
    its maximum and minimum; they differ exactly where some rank differs.
    """
    if not r.distributed:
        return
    prints = fingerprints(gm)
    sizes = all_reduce_values([len(prints), -len(prints)], dist.ReduceOp.MAX, r)
    if sizes[0] != -sizes[1]:
        raise DistributedError("ranks compiled modules of different structure; give every rank the same model and spec")
    hashes = torch.tensor([h for _, h in prints], dtype=torch.int64)
    both = _all_reduce(torch.cat([hashes, -hashes]), dist.ReduceOp.MAX, r)
    differs = (both[: len(prints)] != -both[len(prints) :]).nonzero().flatten().tolist()
    if differs:
        raise DistributedError(
            f"ranks disagree on {prints[differs[0]][0]} after compiling ({len(differs)} difference(s)); "
            "give every rank the same model and spec"
        )
