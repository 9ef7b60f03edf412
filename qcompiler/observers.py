"""Streaming range statistics with bounded memory.

A calibration set can be arbitrarily large, so an observer keeps only running
scalars (min, max, sum of ``|x|``, count) and a fixed-size histogram of ``|x|``.
When a batch exceeds the histogram's range, the range doubles (as often as needed)
and adjacent bins merge pairwise, so counts are never re-estimated: the histogram
is exact up to its bin width, which is at most ``2 * max|x| / bins``.
"""

from __future__ import annotations

import math

import torch

from .errors import DataError
from .ir import TensorRange


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
        if self.edge == 0.0:
            self.edge = top * (1 + 1e-6) if top > 0 else 1e-8
        while top >= self.edge:
            self._double()
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.edge).double()

    def _double(self) -> None:
        merged = self.hist.view(-1, 2).sum(dim=1)
        self.hist = torch.cat([merged, torch.zeros_like(merged)])
        self.edge *= 2

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
        )
