"""Small models and model sizes shared by tests (imported as a top-level module, like untraceable_helpers)."""

import torch
from torch import nn

# Narrow widths keep the zoo's models fast in tests; the architectures are unchanged.
SMALL_KWARGS: dict[str, dict[str, object]] = {
    "resnet20": {"width": 8},
    "adder_resnet20": {"width": 8},
    "resnet18": {"width": 8},
    "resnet50": {"width": 8},
    "mobilenetv2": {"width_mult": 0.5},
    "plain_cnn": {"width": 8},
    "conv1d_net": {"width": 8},
}


def small_cnn() -> nn.Sequential:
    """conv → ReLU → conv → ReLU → linear on 1×6×6 inputs, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )
