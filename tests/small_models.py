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


def hardswish_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """conv → BN → Hardswish → conv → BN → SiLU → pool → linear, for 8×8 digits (MobileNetV3's activations)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


class Upsampler(nn.Module):
    """conv, a grouped transposed conv with output_padding and a batch norm, then a dilated one."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 8, 3, padding=1)
        self.t = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.t2 = nn.ConvTranspose2d(6, 4, (4, 3), stride=(2, 1), dilation=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t2(torch.relu(self.bn(self.t(torch.relu(self.c(x))))))


class FloatActivations(nn.Module):
    """Activations that run in float regions (no integer form), as modules and as functions, and a
    squeeze-excitation gate (two activations multiplied): MobileNetV3's and EfficientNet's patterns."""

    def __init__(self, smooth: bool):
        super().__init__()
        torch.manual_seed(0)
        self.smooth = smooth
        self.conv, self.bn, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.SiLU() if smooth else nn.Hardswish()
        self.gate = nn.Sigmoid() if smooth else nn.Hardsigmoid()
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        s = x.mean((2, 3), keepdim=True)
        s = self.gate(self.excite(torch.relu(self.squeeze(s))))
        x = x * s
        f = torch.nn.functional
        x = f.gelu(self.conv2(x)) if self.smooth else f.leaky_relu(f.hardswish(self.conv2(x)), 0.1)
        return self.fc(torch.flatten(torch.tanh(x) if self.smooth else f.hardsigmoid(x), 1))
