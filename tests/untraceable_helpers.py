"""Models torch.fx cannot trace, for the front-end and CLI tests.

Importable as ``untraceable_helpers`` (pytest puts ``tests/`` on ``sys.path``; the CLI
tests add it to ``PYTHONPATH``), so ``untraceable_helpers:Gate`` works as a leaf
module name and ``untraceable_helpers:gated_net`` as an ``--arch`` factory.
"""

from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    """Data-dependent control flow: flips the sign of a batch whose sum is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    """conv -> [ReLU, Gate] -> global pool -> linear; the Gate sits at ``body.1``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class RootBranch(nn.Module):
    """The untraceable ``if`` is in the root module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            x = x * 2
        return self.fc(x)


def gated_net(in_channels: int = 1, num_classes: int = 10, width: int = 4) -> GatedNet:
    """``--arch untraceable_helpers:gated_net`` factory."""
    return GatedNet(in_channels, num_classes, width)
