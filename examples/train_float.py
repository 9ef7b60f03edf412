"""Train a float zoo model on the built-in digits data and save it as a checkpoint.

    python examples/train_float.py --arch resnet20 --epochs 15 --out runs/resnet20.pt

The checkpoint records its architecture, so ``qcompile runs/resnet20.pt`` needs no
``--arch`` and loads without unpickling code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompiler.data import load_digits
from qcompiler.modelio import save_checkpoint
from qcompiler.train import TrainConfig, evaluate, train
from qcompiler.zoo import ZOO


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20", choices=sorted(ZOO))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/resnet20.pt")
    args = p.parse_args()

    data = load_digits()
    kwargs = {"in_channels": data.input_shape[0], "num_classes": data.num_classes}
    model = ZOO[args.arch](**kwargs)
    train(model, data, TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed))
    print(f"{args.arch}: float test accuracy {evaluate(model, data):.2f} % after {args.epochs} epochs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out, f"qcompiler.zoo:{args.arch}", kwargs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
