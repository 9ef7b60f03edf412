"""Same seed, same bytes: a seeded compile-and-train writes identical files on every run."""

from __future__ import annotations

from pathlib import Path

import torch

import qcompiler
from qcompiler.cli import main
from qcompiler.modelio import save_checkpoint
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.zoo import plain_cnn
from small_models import SMALL_KWARGS

ARCH_KWARGS = {"in_channels": 1, **SMALL_KWARGS["plain_cnn"]}


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(plain_cnn(**ARCH_KWARGS), path, "qcompiler.zoo:plain_cnn", ARCH_KWARGS)
    return path


def _adapters(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = plain_cnn(**ARCH_KWARGS)
    spec = qcompiler.QuantSpec(passes="asq", seed=seed)
    compiled = qcompiler.compile(model, spec, calib_data=torch.rand(8, 1, 8, 8))
    quantizers = [m for m in compiled.module.modules() if isinstance(m, ASQQuantizer)]
    assert quantizers
    return [p.detach().clone() for q in quantizers for p in q.adapter.parameters()]


def test_same_seed_writes_the_same_bytes(tmp_path: Path, capsys) -> None:
    model = _checkpoint(tmp_path / "model.pt")
    args = [str(model), "--passes", "asq,post", "--seed", "0", "--train-epochs", "1", "--data", "digits", "--quiet"]
    for run in ("a", "b"):
        torch.manual_seed(int(run == "b"))  # the global RNG must not matter
        assert main([*args, "--out", str(tmp_path / run)]) == 0, capsys.readouterr().err
    for name in ("module.pt", "records.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_adapters_follow_the_seed() -> None:
    torch.manual_seed(1)  # the global RNG plays no part
    same = _adapters(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(same, _adapters(seed=0)))
    other = _adapters(seed=1)
    # fc2's bias starts at zero under every seed; every other tensor differs
    assert sum(not torch.equal(a, b) for a, b in zip(same, other)) == len(same) - len(same) // 4
