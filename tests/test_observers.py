"""Tests for qcompiler.observers.RangeObserver: exact scalars, bounded histogram."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from qcompiler.errors import DataError
from qcompiler.observers import RangeObserver


def _growing_batches(n: int, growth: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 13, generator=g) * growth**i + 0.01 * i for i in range(n)]


def test_min_max_mean_exact_over_many_batches() -> None:
    batches = _growing_batches(60, growth=1.1)
    obs = RangeObserver(bins=256)
    for b in batches:
        obs.update(b)
    x = torch.cat([b.flatten() for b in batches]).double()
    assert obs.min == float(x.min()) and obs.max == float(x.max())
    assert obs.count == x.numel()
    assert obs.abs_sum / obs.count == pytest.approx(float(x.abs().mean()), rel=1e-12)
    rng = obs.summary()
    assert (rng.min, rng.max, rng.count) == (obs.min, obs.max, obs.count)
    assert rng.mean_abs == obs.abs_sum / obs.count
    assert rng.signed


def test_non_negative_data_is_unsigned() -> None:
    obs = RangeObserver()
    obs.update(torch.rand(100))
    obs.update(torch.zeros(5))
    assert obs.min == 0.0 and not obs.summary().signed


def test_percentiles_dense_data_match_numpy() -> None:
    """Dense data: numpy's default percentile and the histogram agree to a bin width."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4000, generator=g) * (1 + i / 5) for i in range(25)]
    obs = RangeObserver(bins=2048)
    for b in batches:
        obs.update(b)
    a = torch.cat(batches).abs().double().numpy()
    width = obs.edge / obs.bins
    assert obs.edge > a.max()
    for q in (0.1, 0.5, 0.9, 0.99, 0.999):
        assert abs(obs.abs_percentile(q) - np.percentile(a, 100 * q)) <= width, q
    rng = obs.summary()
    assert abs(rng.abs_p999 - np.percentile(a, 99.9)) <= width
    assert abs(rng.abs_p9999 - np.percentile(a, 99.99)) <= width


@pytest.mark.parametrize("seed", range(3))
def test_percentiles_sparse_data_within_a_bin(seed: int) -> None:
    """Few, heavy-tailed values: within a bin of the inverted empirical CDF (ceil(q*n)-th |x|)."""
    rng = np.random.default_rng(seed)
    obs = RangeObserver(bins=512)
    arrays = [rng.standard_cauchy(size=37) * (i + 1) for i in range(20)]
    for arr in arrays:
        obs.update(torch.from_numpy(arr))
    a = np.abs(np.concatenate(arrays)).astype(np.float32).astype(np.float64)
    width = obs.edge / obs.bins
    for q in (0.25, 0.5, 0.9, 0.999):
        assert abs(obs.abs_percentile(q) - np.percentile(a, 100 * q, method="inverted_cdf")) <= width + 1e-9, q
    assert obs.abs_percentile(1.0) <= a.max()


def test_bin_width_at_most_twice_max_over_bins() -> None:
    obs = RangeObserver(bins=100)
    for b in _growing_batches(30, growth=1.5):
        obs.update(b)
    top = max(-obs.min, obs.max)
    assert top < obs.edge < 2 * top * (1 + 1e-6)


def test_memory_bounded_with_ranges_growing_1000x() -> None:
    obs = RangeObserver(bins=1024)
    growth = 1000 ** (1 / 99)
    n = 0
    for i, b in enumerate(_growing_batches(100, growth=growth, seed=3)):
        obs.update(b)
        n += b.numel()
        assert obs.hist.shape == (1024,), i
        assert float(obs.hist.sum()) == n  # no count is lost when bins merge
    first = _growing_batches(1, growth=1, seed=3)[0]
    assert max(-obs.min, obs.max) > 300 * float(first.abs().max())


def test_zero_first_batch_then_growth() -> None:
    obs = RangeObserver(bins=64)
    obs.update(torch.zeros(10))
    obs.update(torch.full((10,), 1000.0))
    assert obs.hist.shape == (64,) and float(obs.hist.sum()) == 20
    assert obs.abs_percentile(0.25) < obs.edge / obs.bins
    assert obs.abs_percentile(0.75) == pytest.approx(1000.0, abs=obs.edge / obs.bins)
    assert obs.summary().mean_abs == 500.0


def test_empty_update_is_ignored_and_empty_summary_fails() -> None:
    obs = RangeObserver()
    obs.update(torch.empty(0))
    assert obs.count == 0 and obs.abs_percentile(0.5) == 0.0
    with pytest.raises(AssertionError):
        obs.summary()


def test_docstring_example() -> None:
    obs = RangeObserver(bins=1024)
    obs.update(torch.arange(1001.0))
    assert abs(obs.abs_percentile(0.5) - 500.0) <= obs.edge / obs.bins
    assert obs.max == 1000.0 and obs.min == 0.0


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise _Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_value_does_not_hang(value: float) -> None:
    obs = RangeObserver(bins=64)
    obs.update(torch.ones(4))
    with _time_limit(0.3):
        with pytest.raises(DataError, match="non-finite"):  # a clear error, at once
            obs.update(torch.tensor([1.0, value]))
