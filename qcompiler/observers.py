"""Streaming range statistics with bounded memory.

A calibration set can be arbitrarily large, so an observer keeps only running
scalars (min, max, sum of ``|x|``, count) and a fixed-size histogram of ``|x|``,
plus one of ``|x|`` over the negative values alone (so the initial-step search can
weigh what an unsigned grid would clip to zero, :mod:`qcompiler.quantizers.init`).
When a batch exceeds the histogram's range, the range doubles (as often as needed)
and adjacent bins merge pairwise, so counts are never re-estimated: the histogram
is exact up to its bin width, which is at most ``2 * max|x| / bins``.

The range is always a power of two: the smallest one above ``max|x|``. So it does
not depend on the order the batches came in, and two observers of the same width
(two shards of the data, two ranks of a distributed compile) merge exactly: the
narrower histogram doubles up to the wider range and the counts add
(:meth:`RangeObserver.merge`, :func:`qcompiler.distributed.reduce_observers`).
"""

from __future__ import annotations

import math

import torch

from .errors import DataError
from .ir import AbsHistogram, TensorRange

# The range of a histogram that has seen only zeros (any power of two would do).
ZERO_EDGE = 2.0**-27


def power_of_two_above(v: float) -> float:
    """The smallest power of two strictly greater than ``v >= 0`` (``ZERO_EDGE`` for 0).

    >>> power_of_two_above(3.0), power_of_two_above(4.0), power_of_two_above(0.3)
    (4.0, 8.0, 0.5)
    """
    return math.ldexp(1.0, math.frexp(v)[1]) if v > 0 else ZERO_EDGE


class RangeObserver:
    """Min, max, mean ``|x|`` and percentiles of ``|x|`` over a stream of tensors.

    Example:
        >>> obs = RangeObserver(bins=1024)
        >>> obs.update(torch.arange(1001.0))
        >>> round(obs.abs_percentile(0.5), 0), obs.max
        (500.0, 1000.0)
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.neg_hist = torch.zeros(bins, dtype=torch.float64)  # |x| of the values below zero; hist holds them too
        self.edge = 0.0  # the histogram covers |x| in [0, edge)
        self.min, self.max = math.inf, -math.inf
        self.abs_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        a = x.abs().flatten()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.abs_sum += float(a.sum(dtype=torch.float64))
        self.count += a.numel()
        top = float(a.max())
        if not math.isfinite(top):
            raise DataError("calibration data produced a non-finite activation (inf or nan); check the data and the model")
        self.widen_to(power_of_two_above(top))
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.edge).double().cpu()
        negative = a[x.flatten() < 0]
        if negative.numel():
            self.neg_hist += torch.histc(negative, bins=self.bins, min=0.0, max=self.edge).double().cpu()

    def widen_to(self, edge: float) -> None:
        """Make the histogram cover ``[0, edge)``, a power of two, by doubling; never narrows."""
        self.neg_hist = widened(self.neg_hist, self.edge or edge, edge)[0]
        self.hist, self.edge = widened(self.hist, self.edge or edge, edge)

    def merge(self, other: RangeObserver) -> None:
        """Add what ``other`` observed, as if this observer had seen its batches too.

        >>> a, b, both = RangeObserver(64), RangeObserver(64), RangeObserver(64)
        >>> x, y = torch.rand(100), 10 * torch.rand(100)
        >>> a.update(x); b.update(y); both.update(x); both.update(y)
        >>> a.merge(b)
        >>> torch.equal(a.hist, both.hist) and torch.equal(a.neg_hist, both.neg_hist) and a.summary() == both.summary()
        True
        """
        assert self.bins == other.bins, "observers of different widths do not merge"
        if other.count == 0:
            return
        self.widen_to(other.edge)
        self.hist = self.hist + widened(other.hist, other.edge, self.edge)[0]
        self.neg_hist = self.neg_hist + widened(other.neg_hist, other.edge, self.edge)[0]
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.abs_sum += other.abs_sum
        self.count += other.count

    def abs_percentile(self, q: float) -> float:
        """The ``q``-quantile of ``|x|`` (linear within a bin)."""
        if self.count == 0:
            return 0.0
        cum = torch.cumsum(self.hist, 0)
        target = q * float(cum[-1])
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        below = float(cum[i - 1]) if i else 0.0
        inside = float(self.hist[i])
        frac = (target - below) / inside if inside > 0 else 0.0
        width = self.edge / self.bins
        return min((i + frac) * width, max(abs(self.min), abs(self.max)))

    def summary(self) -> TensorRange:
        assert self.count, "observer saw no data"
        return TensorRange(
            min=self.min,
            max=self.max,
            mean_abs=self.abs_sum / self.count,
            abs_p999=self.abs_percentile(0.999),
            abs_p9999=self.abs_percentile(0.9999),
            count=self.count,
            hist=AbsHistogram(
                edge=self.edge,
                positive=tuple((self.hist - self.neg_hist).clamp_min(0).tolist()),
                negative=tuple(self.neg_hist.tolist()),
            ),
        )


def widened(hist: torch.Tensor, edge: float, target: float) -> tuple[torch.Tensor, float]:
    """``hist`` over ``[0, edge)`` re-binned to cover ``[0, target)`` (powers of two) by merging bins pairwise.

    >>> widened(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1.0, 2.0)
    (tensor([3., 7., 0., 0.]), 2.0)
    """
    while edge < target:
        merged = hist.view(-1, 2).sum(dim=1)
        hist = torch.cat([merged, torch.zeros_like(merged)])
        edge *= 2
    return hist, edge
