"""Switching a module between training and eval mode for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``module`` in training (``True``) or eval (``False``) mode inside the block.

    On exit, even by an exception, every submodule gets back its own earlier flag,
    not the root's: a model whose batch norms were frozen in eval mode stays so.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> m[1].eval()  # doctest: +ELLIPSIS
        BatchNorm1d(...)
        >>> with training_mode(m, False):
        ...     m.training, m[1].training
        (False, False)
        >>> m.training, m[1].training
        (True, False)
    """
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, was_training in saved:
            m.training = was_training
