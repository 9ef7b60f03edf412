"""One rank of ``test_distributed.py``: compile on this rank's shard, train 3 DDP steps, write the states.

    python tests/distributed_worker.py RANK WORLD INIT_FILE OUT_DIR

Each case writes ``OUT_DIR/<case>-<stage>-rank<R>.pt``: the module's state dict
and the text of every node's records, after compiling (``compiled``) and after
three DistributedDataParallel steps (``trained``). The parent compares the ranks.
Rank 0 also compiles the union of all shards alone (``union``), to compare a
distributed compile with the single-process one it stands for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import qcompiler
from qcompiler import ir
from qcompiler.data import load_digits
from qcompiler.distributed import sync_buffers
from qcompiler.train import TrainConfig, train
from qcompiler.zoo import adder_resnet20, resnet20

SHARD = 64  # calibration samples per rank: one calibration batch each


def cases(rank: int) -> dict[str, tuple[torch.nn.Module, qcompiler.QuantSpec]]:
    """The models and specs of the test; ``resnet20`` is initialised differently on each rank on purpose."""
    torch.manual_seed(rank)  # rank 0's weights must win (compile broadcasts them)
    asq = resnet20(1, 10, width=4)
    torch.manual_seed(0)
    adder = adder_resnet20(1, 10, width=4)
    lsq = resnet20(1, 10, width=4)  # its residual adds take per-channel operand steps, fitted per rank, then averaged
    return {
        "asq-post": (asq, qcompiler.QuantSpec(passes="asq,post", weight_bits=4, act_bits=4)),
        "adder": (adder, qcompiler.QuantSpec(passes="outlier-clamp,adder-groups", weight_bits=4, act_bits=4)),
        "lsq-dataset": (lsq, qcompiler.QuantSpec(passes="lsq,refine-steps", weight_bits=4, act_bits=4, calib_batches=4,
                                                  per_channel_joins=True)),
    }


def save(module: torch.nn.Module, path: Path) -> None:
    """The state dict, every node's records as text, and the observed ranges."""
    nodes = list(module.graph.nodes)
    records = {n.name: repr(ir.records(n)) for n in nodes if ir.records(n)}
    ranges = {n.name: n.meta[ir.RANGE] for n in nodes if ir.RANGE in n.meta}
    torch.save({"state": module.state_dict(), "records": records, "ranges": ranges}, path)


def ddp_steps(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    """``steps`` SGD steps of the DDP-wrapped ``module`` on this rank's batch."""
    ddp = DistributedDataParallel(module)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    ddp.train()
    for _ in range(steps):
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync_buffers(ddp)  # each rank's batch norms saw its own last batch
    module.eval()


def main(rank: int, world: int, init_file: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = load_digits()
    x, y = data.x_train[rank * SHARD : (rank + 1) * SHARD], data.y_train[rank * SHARD : (rank + 1) * SHARD]
    for name, (model, spec) in cases(rank).items():
        calib = data if name == "lsq-dataset" else x  # a Dataset: compile shards it itself
        compiled = qcompiler.compile(model, spec, calib_data=calib)
        save(compiled.module, out / f"{name}-compiled-rank{rank}.pt")
        if rank == 0 and name != "lsq-dataset":
            union = qcompiler.compile(model, spec, calib_data=data.x_train[: world * SHARD], process_group=False)
            save(union.module, out / f"{name}-union-rank{rank}.pt")
        if name == "lsq-dataset":  # qcompiler.train itself, one epoch on this rank's shard of digits
            losses = train(DistributedDataParallel(compiled.module), data, TrainConfig(epochs=1, batch_size=128), progress=False)
            torch.save(losses, out / f"{name}-losses-rank{rank}.pt")
        else:
            ddp_steps(compiled.module, x, y)
        save(compiled.module, out / f"{name}-trained-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
