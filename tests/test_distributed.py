"""Distributed compile and DDP training: every rank ends with the same module.

The end-to-end test runs ``distributed_worker.py`` as two gloo processes on the
CPU, each calibrating on a different shard, and compares what they wrote: every
parameter, buffer and record bit for bit after compiling and after three DDP
steps, and the distributed compile against a one-process compile of the union of
the shards. The rest tests the pieces that need no second process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcompiler
from qcompiler import distributed
from qcompiler.api import calibration_batches
from qcompiler.data import load_digits
from qcompiler.distributed import LOCAL, DistributedError, Ranks
from qcompiler.observers import RangeObserver

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent
WORLD = 2
CASES = ("asq-post", "adder", "lsq-dataset")


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two ranks once for all the tests below; returns the folder they wrote."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD), str(tmp / "rendezvous"), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # a rank that failed leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    return out


def _load(out: Path, case: str, stage: str, rank: int) -> dict:
    return torch.load(out / f"{case}-{stage}-rank{rank}.pt", weights_only=False)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["records"] == b["records"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stage", ["compiled", "trained"])
def test_ranks_identical(worker_outputs: Path, case: str, stage: str) -> None:
    """Every parameter, buffer (quantizer steps, clips, adapters, groups, BN) and record, bit for bit."""
    ranks = [_load(worker_outputs, case, stage, r) for r in range(WORLD)]
    for other in ranks[1:]:
        _assert_identical(ranks[0], other)


def test_per_channel_join_steps_are_averaged_into_one(worker_outputs: Path) -> None:
    """Each rank fits the per-channel operand steps on its own samples; they start as one (the mean)."""
    state = _load(worker_outputs, "lsq-dataset", "compiled", 0)["state"]
    steps = [k for k, v in state.items() if k.endswith("_join.step") and v.dim() == 1]
    assert steps, sorted(state)


@pytest.mark.parametrize("case", CASES)
def test_training_moved_the_parameters(worker_outputs: Path, case: str) -> None:
    before, after = (_load(worker_outputs, case, s, 0)["state"] for s in ("compiled", "trained"))
    steps = [k for k in before if k.endswith((".step", ".alpha"))]
    assert steps and any(not torch.equal(before[k], after[k]) for k in steps)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


@pytest.mark.parametrize("case", ["asq-post", "adder"])
def test_distributed_compile_equals_compile_of_the_union(worker_outputs: Path, case: str) -> None:
    """Reduced statistics are those of all shards together: ranges exactly, steps and BN to rounding."""
    dist, union = _load(worker_outputs, case, "compiled", 0), _load(worker_outputs, case, "union", 0)
    assert dist["ranges"].keys() == union["ranges"].keys()
    for name, got in dist["ranges"].items():
        want = union["ranges"][name]
        assert (got.min, got.max, got.count) == (want.min, want.max, want.count), name
        assert got.mean_abs == pytest.approx(want.mean_abs, rel=1e-9), name
        bin_width = 2 * max(-want.min, want.max) / 2048
        assert abs(got.abs_p999 - want.abs_p999) <= bin_width, name
    for name, t in union["state"].items():
        torch.testing.assert_close(dist["state"][name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_train_under_ddp_returns_the_same_losses_on_every_rank(worker_outputs: Path) -> None:
    losses = [torch.load(worker_outputs / f"lsq-dataset-losses-rank{r}.pt") for r in range(WORLD)]
    assert len(losses[0]) == 1 and all(x == losses[0] for x in losses)


def test_dataset_calibration_is_split_between_ranks() -> None:
    """With a Dataset, the ranks' shares together are the batches one process would use."""
    data, limit = load_digits(), 5
    alone = calibration_batches(data, limit)
    shares = [calibration_batches(data, limit, ranks=Ranks(size=2, rank=r)) for r in range(2)]
    assert [len(s) for s in shares] == [3, 2]
    interleaved = [shares[i % 2][i // 2] for i in range(limit)]
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved))


def test_each_rank_gets_a_batch_when_ranks_outnumber_batches() -> None:
    shares = [calibration_batches(load_digits(), 1, ranks=Ranks(size=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shares] == [1, 1, 1]


def test_not_distributed_is_local_and_a_group_needs_init() -> None:
    assert distributed.ranks() == LOCAL and distributed.ranks(False) == LOCAL
    with pytest.raises(DistributedError, match="init_process_group"):
        qcompiler.compile(torch.nn.Linear(3, 2), calib_data=torch.randn(4, 3), process_group=object())


def test_observers_merge_exactly_whatever_the_order() -> None:
    """Power-of-two ranges: shards merged in any order equal one observer of all the data."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(500, generator=g) * scale for scale in (0.3, 7.0, 1.0, 40.0)]
    one = RangeObserver(256)
    for b in batches:
        one.update(b)
    for order in ([0, 1], [1, 0]):
        shards = [RangeObserver(256), RangeObserver(256)]
        for i, b in enumerate(batches):
            shards[i % 2].update(b)
        merged = shards[order[0]]
        merged.merge(shards[order[1]])
        assert merged.edge == one.edge and torch.equal(merged.hist, one.hist) and torch.equal(merged.neg_hist, one.neg_hist)
        assert (merged.min, merged.max, merged.count) == (one.min, one.max, one.count)
        assert merged.summary().mean_abs == pytest.approx(one.summary().mean_abs, rel=1e-12)


def test_helpers_are_no_ops_in_one_process() -> None:
    m = torch.nn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    distributed.broadcast_module(m, LOCAL)
    distributed.sync_buffers(m)
    distributed.reduce_batchnorm([m], 4, LOCAL)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert distributed.all_reduce_values([1.0, -2.0], torch.distributed.ReduceOp.MAX, LOCAL) == [1.0, -2.0]
