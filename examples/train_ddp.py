"""Quantization-aware training on several processes with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py --checkpoint runs/resnet20.pt --passes asq,post --epochs 2

Every rank compiles the same float model; calibration runs on each rank's share of
the digits data and its statistics are reduced across ranks, so all ranks start
from the same quantizers. The compiled module is wrapped in DDP unchanged and
trained on each rank's shard; rank 0 prints the accuracy and saves. gloo on the
CPU; with CUDA, NCCL and one GPU per rank (``--device cpu`` forces gloo).
``--checkpoint`` takes a float model from ``examples/train_float.py``; without one
the zoo model starts from its seeded initialisation (a smoke run, not a result).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qcompiler
from qcompiler.data import load_digits
from qcompiler.modelio import load_model
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import ZOO


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20", choices=sorted(ZOO))
    p.add_argument("--checkpoint", help="float model to quantize (default: a fresh, seeded zoo model)")
    p.add_argument("--passes", default="lsq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="folder rank 0 saves the trained compiled model to")
    return p.parse_args()


def setup(device: str) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))  # ranks share the cores
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def main() -> None:
    args = parse_args()
    device = setup(args.device)
    rank = dist.get_rank()
    data = load_digits()
    torch.manual_seed(0)  # the same model on every rank (compile would broadcast rank 0's anyway)
    kwargs = {"in_channels": data.input_shape[0], "num_classes": data.num_classes}
    model = load_model(args.checkpoint) if args.checkpoint else ZOO[args.arch](**kwargs)

    spec = qcompiler.QuantSpec(passes=args.passes, weight_bits=args.bits, act_bits=args.bits)
    compiled = qcompiler.compile(model, spec, calib_data=data)  # a Dataset: the ranks split the calibration batches
    module = compiled.module.to(device)
    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    losses = train(ddp, data, TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size), progress=False)

    if rank == 0:
        print(f"{dist.get_world_size()} ranks ({dist.get_backend()}): loss per epoch {[round(v, 4) for v in losses]}")
        print(f"test accuracy after QAT: {evaluate(module, data):.2f} %")
        if args.out:
            module.cpu()  # compiled.module is this module; saved files load on any machine
            print(f"wrote {compiled.save(args.out)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
