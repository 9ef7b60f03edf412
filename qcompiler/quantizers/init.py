"""Where quantizer steps start: the clip with the least expected squared error.

LSQ's start ``2 mean|x| / sqrt(p)`` is meant for QAT, which then learns the step;
right after compile it clips too much at 8 bits (foreign models land 5-17 % away from
float). Post-training toolkits instead pick the clip that minimises the quantization
error on the calibration statistics, which is what ``init="mse"`` does:

* activations (one step per tensor): from the observer's histogram of ``|x|``, kept
  apart for the values at or above zero and those below it
  (:class:`qcompiler.ir.AbsHistogram`). Within a bin the values are taken as spread
  evenly, so the expected error of a grid is a closed form per bin
  (:func:`histogram_sse`), for all candidate steps at once;
* weights (one step, or one POT/POST ``alpha``, per output channel): directly on the
  weight tensor, through the quantizer's own forward values (:func:`search_scale`).

The search tries ``CANDIDATES`` evenly spaced scales up to the one that clips nothing,
then as many again around the best of them (two rounds: the optimum of a heavy-tailed
tensor lies far below its maximum at 4 bits and near it at 8).

Which grid an activation gets, signed or unsigned, is decided the same way
(:func:`choose_signed`): whichever has the lower expected error at its best step. A
SiLU output with a thin negative tail goes unsigned (its few negatives become 0, the
intended trade-off: twice the levels for the rest), a symmetric one signed. The
balance moves with the width: the coarser the grid, the more negative mass it pays to
drop (a SiLU of standard-normal inputs, half its values small negatives, goes signed at
8 bits and unsigned at 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ir import AbsHistogram, TensorRange
from ..numerics import int_range, offset_range
from ..spec import INITS  # how a step (or clip) starts: the QuantSpec option and the records' `init`
CANDIDATES = 64  # scales tried per round
ROUNDS = 2  # the second round searches between the first round's neighbours of the best
PERCENTILE = 0.9999  # init="percentile": the quantile of |x| (or |W| per channel) the grid reaches
MIN_SCALE = 1e-6  # the smallest step the quantizers start from (an all-zero tensor)
ASYMMETRIC_GAIN = 0.9  # a zero point must bring the expected error below this share of the plain grid's

# (C, K) candidate scales -> (C, K) squared errors
ErrorFn = Callable[[torch.Tensor], torch.Tensor]


def search_scale(
    full: torch.Tensor, error: ErrorFn, also: torch.Tensor | None = None, candidates: int = CANDIDATES, rounds: int = ROUNDS
) -> torch.Tensor:
    """The scale in ``(0, full]`` (per row of ``full``, shape ``(C,)``) with the least ``error``.

    Round one tries ``full * j / candidates`` and the scales in ``also`` (``(C,)``: a
    closed-form start, so the result is never worse than it, even where the error is
    jagged, as for a channel of a few weights); each later round tries ``candidates``
    values evenly spaced between the best one's neighbours.

    >>> full = torch.tensor([1.0, 4.0])
    >>> best = search_scale(full, lambda s: (s - torch.tensor([[0.3], [1.0]])) ** 2)
    >>> [round(v, 3) for v in best.tolist()]
    [0.3, 1.0]
    """
    full = full.double().clamp_min(MIN_SCALE)
    lo, hi = torch.zeros_like(full), full
    best, best_error = full, torch.full_like(full, math.inf)
    for r in range(rounds):
        frac = torch.arange(1, candidates + 1, dtype=torch.float64) / candidates
        scales = lo[:, None] + (hi - lo)[:, None] * frac  # (C, K), never 0
        if r == 0 and also is not None:
            scales = torch.cat([scales, also.double().clamp_min(MIN_SCALE).view(-1, 1)], dim=1)
        errors, i = error(scales).min(dim=1)
        better = errors < best_error  # a later round only ever improves
        best = torch.where(better, scales.gather(1, i[:, None]).squeeze(1), best)
        best_error = torch.minimum(errors, best_error)
        width = full / candidates**(r + 1)
        lo, hi = (best - width).clamp_min(0), torch.minimum(best + width, full.maximum(best))
    return best


def channel_error(w: torch.Tensor, values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ErrorFn:
    """The error of a per-output-channel grid on ``w``: ``values(w, scale)`` is the
    quantizer's forward value with ``scale`` shaped ``(C, 1, ...)``; one candidate at a
    time, so memory stays at the weight's size."""
    w = w.detach()
    view = (-1,) + (1,) * (w.dim() - 1)

    def error(scales: torch.Tensor) -> torch.Tensor:
        # in place on the fresh values tensor: a weight-sized temporary fewer per candidate
        cols = [values(w, s.to(w.dtype).view(view)).sub_(w).square_().flatten(1).sum(1) for s in scales.T]
        return torch.stack(cols, dim=1).double()

    return error


def histogram_sse(counts: torch.Tensor, edge: float, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Expected sum of squared errors when magnitudes counted in ``counts`` (equal bins
    over ``[0, edge)``, spread evenly within a bin) go to the nearest of
    ``{0, step, ..., levels * step}`` (above the top level: the top level).

    ``step`` has shape ``(K, 1)``; the result ``(K,)``. ``levels = 0`` is a grid
    that sends everything to zero (the negatives of an unsigned grid).

    >>> counts = torch.tensor([0.0, 1.0])  # one value, evenly in [0.5, 1)
    >>> round(float(histogram_sse(counts, 1.0, torch.tensor([[1.0]]), 0)), 6)  # mean of x^2 over [0.5, 1): 7/12
    0.583333
    """
    bins = counts.numel()
    filled = torch.nonzero(counts).flatten()
    used = int(filled[-1]) + 1 if filled.numel() else 0  # bins past the last count add nothing
    edges = torch.linspace(0.0, edge, bins + 1, dtype=torch.float64)[:used + 1]
    top = levels * step

    def integral(x: torch.Tensor) -> torch.Tensor:
        # the integral of err(t)^2 from 0 to x: k whole periods of the rounding
        # sawtooth (s^3 / 12 each) plus the part of the current one, plus (x - top)^3 / 3 past the top
        inside = torch.minimum(x, top)
        k = torch.floor(inside / step + 0.5)
        r = inside - k * step
        return k * step**3 / 12 + r**3 / 3 + (x - top).clamp_min(0) ** 3 / 3

    # one integral per edge (each bin's upper edge is the next one's lower edge), zeros for
    # the empty bins at the top, so the sum runs over the same terms in the same order
    at = integral(edges)
    per_value = torch.zeros(*at.shape[:-1], bins, dtype=torch.float64)
    per_value[..., :used] = (at[..., 1:] - at[..., :-1]) / (edges[1:] - edges[:-1])
    return (per_value * counts.double()).sum(dim=-1)


@dataclass(frozen=True)
class ActGridFit:
    """The best step of one activation grid and its expected mean squared error."""

    signed: bool
    step: float
    mse: float


@functools.lru_cache(maxsize=64)  # choose_signed fits both grids (choose_grid many), act_clip then the chosen one again
def fit_act_grid(hist: AbsHistogram, bits: int, signed: bool, zero_point: int | None = None) -> ActGridFit:
    """The MSE-optimal step of a ``bits``-wide grid on the histogram.

    Signed codes reach ``qmax * s`` above zero and ``-qmin * s`` below; unsigned codes
    send every negative value to zero. A ``zero_point`` makes the grid asymmetric
    (:func:`qcompiler.numerics.offset_range`), ``signed`` then being ``zero_point > 0``.
    """
    qmin, qmax = int_range(bits, signed) if zero_point is None else offset_range(bits, zero_point)
    pos = torch.tensor(hist.positive, dtype=torch.float64)
    neg = torch.tensor(hist.negative, dtype=torch.float64)
    width = hist.edge / hist.bins
    top_pos = _top(pos, width)
    full = top_pos / qmax if not signed else max(top_pos / qmax, _top(neg, width) / -qmin)

    def error(scales: torch.Tensor) -> torch.Tensor:
        s = scales.reshape(-1, 1)
        return (histogram_sse(pos, hist.edge, s, qmax) + histogram_sse(neg, hist.edge, s, -qmin)).view(1, -1)

    step = search_scale(torch.tensor([full]), error)
    total = float(pos.sum() + neg.sum())
    mse = float(error(step.view(1, 1))) / max(total, 1.0)
    return ActGridFit(signed, float(step), mse)


def _top(counts: torch.Tensor, width: float) -> float:
    """The upper edge of the last non-empty bin (0 when all are empty)."""
    nonzero = torch.nonzero(counts).flatten()
    return float(nonzero[-1] + 1) * width if nonzero.numel() else 0.0


def choose_signed(rng: TensorRange, bits: int) -> bool:
    """Signed or unsigned codes for an activation: the grid with the lower expected
    error at its own best step. Without a histogram (records saved before it was kept)
    or with no negative value, the old rule: signed when any value was negative.

    >>> from qcompiler.observers import RangeObserver
    >>> g = torch.Generator().manual_seed(0)
    >>> obs = RangeObserver(); obs.update(torch.nn.functional.silu(torch.randn(10000, generator=g) + 3))
    >>> choose_signed(obs.summary(), 8)  # 0.1 % of the values below zero, none below -0.28
    False
    >>> obs = RangeObserver(); obs.update(torch.randn(10000, generator=g))
    >>> choose_signed(obs.summary(), 8)
    True

    A SiLU of standard-normal inputs is half negative (small values): at 8 bits the
    signed grid loses less; at 4 bits, where steps are coarse, the unsigned one.
    """
    if rng.hist is None or not rng.signed:
        return rng.signed
    return fit_act_grid(rng.hist, bits, True).mse < fit_act_grid(rng.hist, bits, False).mse


def zero_point_candidates(bits: int) -> list[int]:
    """Zero points :func:`choose_grid` tries first: 0, then ``2^(b-1)`` down by factors
    of ``sqrt 2`` (the negative tail's share of the range spans orders of magnitude).

    >>> zero_point_candidates(4)
    [0, 1, 2, 3, 4, 6, 8]
    """
    half = 2 ** (bits - 1)
    return sorted({0, *(max(1, round(half * 2 ** (-k / 2))) for k in range(2 * bits - 1))})


def choose_grid(rng: TensorRange, bits: int, asymmetric: bool = False) -> tuple[bool, int | None]:
    """``(signed, zero_point)`` of an activation grid: :func:`choose_signed`'s choice, or
    with ``asymmetric`` the zero point with the least expected error, searched on the
    histogram (the geometric :func:`zero_point_candidates`, then every integer between
    the best one's neighbours). A zero point of 0 or ``2^(b-1)`` is the plain unsigned
    or signed grid and comes back as ``None``, and so does one that does not cut the
    plain grid's error by ``1 - ASYMMETRIC_GAIN`` at least (a near-symmetric tensor keeps
    the signed grid rather than a zero point a few codes off the middle).

    >>> from qcompiler.observers import RangeObserver
    >>> obs = RangeObserver(); obs.update(torch.nn.functional.hardswish(torch.linspace(-4, 6, 10001)))
    >>> signed, zero_point = choose_grid(obs.summary(), 8, asymmetric=True)
    >>> signed, 0 < zero_point < 64  # a thin negative tail gets a few codes below zero
    (True, True)
    """
    signed = choose_signed(rng, bits)
    if not asymmetric or rng.hist is None or not rng.signed:
        return signed, None

    def mse(z: int) -> float:
        return fit_act_grid(rng.hist, bits, z > 0, z).mse

    coarse = zero_point_candidates(bits)
    i = min(range(len(coarse)), key=lambda j: mse(coarse[j]))
    lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
    # every integer between the neighbours, at most 16 of them evenly spread
    fine = sorted({round(lo + (hi - lo) * j / 16) for j in range(17)})
    best = min(fine, key=lambda z: (mse(z), z))
    plain = 2 ** (bits - 1) if signed else 0
    if best in (0, 2 ** (bits - 1)) or mse(best) > ASYMMETRIC_GAIN * mse(plain):
        return signed, None
    return True, best


def act_clip(rng: TensorRange, bits: int, signed: bool, init: str, zero_point: int | None = None) -> float | None:
    """The magnitude an activation grid should reach for ``init`` ``"mse"`` /
    ``"percentile"`` / ``"max"``, as a step times ``qmax``; ``None`` for ``"lsq"``
    (a formula on the mean, not a clip). ``zero_point``: the asymmetric grid of
    :func:`choose_grid`."""
    qmin, qmax = int_range(bits, signed) if zero_point is None else offset_range(bits, zero_point)
    if init == "mse" and rng.hist is not None:
        return fit_act_grid(rng.hist, bits, signed, zero_point).step * qmax
    if init == "percentile":
        return rng.abs_p9999
    if init in ("max", "mse") and zero_point is not None:  # the step that reaches both ends
        return max(max(rng.max, 0.0) / qmax, max(-rng.min, 0.0) / -qmin) * qmax
    if init in ("max", "mse"):  # "mse" without a histogram: no statistics to search
        return max(abs(rng.min), abs(rng.max)) if signed else max(rng.max, 0.0)
    assert init == "lsq", init
    return None


__all__ = [
    "INITS", "ActGridFit", "act_clip", "channel_error", "choose_grid", "choose_signed", "fit_act_grid", "histogram_sse",
    "search_scale", "zero_point_candidates",
]
