"""A small zoo of reference models shared by users, tests, examples and benchmarks.

The quantization passes have to cope with the layer patterns real networks use:
residual joins, projection shortcuts, bottlenecks, depthwise and grouped
convolutions, channel concatenation, 1-D convolutions. Rather than every test
inventing its own toy network (and every example a slightly different ResNet),
the canonical versions live here, written so that ``torch.fx.symbolic_trace``
sees a static graph: no data-dependent Python control flow, no shape-driven
branches, ``torch.flatten(x, 1)`` instead of ``x.view(x.size(0), -1)``, and each
module object used at exactly one call site.

All image models use adaptive average pooling before the classifier, so they run
on the 8x8 scikit-learn digits (the test data) as well as on 32x32 CIFAR-sized
and larger inputs.

Example:
    >>> import torch
    >>> from qcompiler import zoo
    >>> model = zoo.build("resnet20", in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qcompiler.errors import SpecError

__all__ = [
    "ZOO",
    "adder_resnet20",
    "build",
    "conv1d_net",
    "mobilenetv2",
    "plain_cnn",
    "resnet18",
    "resnet20",
    "resnet50",
]

ConvFactory = Callable[..., nn.Module]
"""Builds a 2-D convolution-like module: ``conv(in_ch, out_ch, kernel_size=..., stride=..., padding=..., bias=...)``."""


# --------------------------------------------------------------------------- helpers


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal for standard convolutions, BN to identity, small normal for Linear.

    Only ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` / BN instances are touched, so
    custom layers built through a ``conv`` factory (e.g. adder layers) keep the
    initialisation their own constructor chose.
    """
    for module in model.modules():
        if type(module) in (nn.Conv1d, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif type(module) is nn.Linear:
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)


def _check_positive(**values: float) -> None:
    """Raise ``SpecError`` naming the first argument that is not a positive number."""
    for name, value in values.items():
        if not value > 0:
            raise SpecError(f"zoo: {name}={value!r} must be positive; pass a value > 0")


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` with 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=False),
    )


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes match, otherwise a 1x1 projection conv + BN ("option B")."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual join: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, conv: ConvFactory = nn.Conv2d) -> None:
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = conv(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by ``expansion``, with a residual join."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid_ch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, a sequence of residual stages, global average pool, linear classifier."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16, conv: ConvFactory = nn.Conv2d) -> ResNet:
    """CIFAR-style ResNet-20 (He et al. 2016, section 4.2) with projection shortcuts.

    3x3 stem conv + BN + ReLU, three stages of three ``BasicBlock`` s with
    ``width``, ``2*width``, ``4*width`` channels (stride 2 entering stages 2 and 3),
    1x1 conv + BN shortcuts where the shape changes, global average pool, linear.
    About 0.27 M parameters at ``width=16``.

    ``conv`` builds only the 18 3x3 convolutions inside the residual blocks,
    called as ``conv(in_ch, out_ch, kernel_size=3, stride=s, padding=1, bias=False)``;
    the stem, the shortcuts and the classifier stay ``nn.Conv2d`` / ``nn.Linear``.
    That is how the AdderNet ResNet-20 is built: ``resnet20(conv=AdderConv2d)``.

    Input: ``(B, in_channels, H, W)`` with ``H, W >= 1`` (8x8 digits, 32x32 CIFAR).

    Example:
        >>> model = resnet20(in_channels=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    stem = _conv_bn_relu(in_channels, width, kernel_size=3)
    blocks: list[nn.Module] = []
    in_ch = width
    for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
        for index in range(3):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(BasicBlock(in_ch, out_ch, stride, conv=conv))
            in_ch = out_ch
    model = ResNet(stem, nn.Sequential(*blocks), in_ch, num_classes)
    _init_weights(model)
    return model


def adder_resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> ResNet:
    """AdderNet ResNet-20: ``resnet20`` whose 18 block convolutions are adder layers.

    As in AdderNet, the stem, the 1x1 shortcuts and the classifier stay multiply
    layers; every adder layer is followed by batch norm.

    Example:
        >>> model = adder_resnet20(in_channels=1, width=8)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    from .nn.adder import AdderConv2d

    return resnet20(in_channels, num_classes, width, conv=AdderConv2d)


def _imagenet_stem(in_channels: int, width: int) -> nn.Sequential:
    """7x7 stride-2 conv + BN + ReLU, then 3x3 stride-2 max pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def _imagenet_resnet(
    block: type[BasicBlock] | type[Bottleneck],
    depths: Sequence[int],
    in_channels: int,
    num_classes: int,
    width: int,
    zero_init_residual: bool = False,
) -> ResNet:
    """Four stages with ``width * 2**i`` channels (times the block's expansion)."""
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    blocks: list[nn.Module] = []
    in_ch = width
    for stage, depth in enumerate(depths):
        mid_ch = width * 2**stage
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(block(in_ch, mid_ch, stride))
            in_ch = mid_ch * block.expansion
    model = ResNet(_imagenet_stem(in_channels, width), nn.Sequential(*blocks), in_ch, num_classes)
    _init_weights(model)
    if zero_init_residual:  # each block starts as its shortcut: deep stacks of them train far better
        for b in blocks:
            nn.init.zeros_(b.bn3.weight if isinstance(b, Bottleneck) else b.bn2.weight)
    return model


def resnet18(in_channels: int = 3, num_classes: int = 1000, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    """ImageNet-style ResNet-18: 7x7/2 stem, max pool, four stages of two ``BasicBlock`` s.

    Stage widths ``width * (1, 2, 4, 8)``; 1x1 conv + BN shortcuts where the shape
    changes. About 11.7 M parameters at the defaults. ``zero_init_residual`` starts the
    last batch norm of every block at zero gain, so each block starts as its shortcut
    (Goyal et al., 2017; torchvision's option of the same name).

    Input: ``(B, in_channels, H, W)``, any ``H, W >= 1`` (the spatial size bottoms
    out at 1x1, so 8x8 digits work as well as 224x224).

    Example:
        >>> model = resnet18(in_channels=1, num_classes=10, width=8)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, width, zero_init_residual)


def resnet50(in_channels: int = 3, num_classes: int = 1000, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    """ImageNet-style ResNet-50: 7x7/2 stem, max pool, stages of 3, 4, 6, 3 ``Bottleneck`` s.

    Bottleneck widths ``width * (1, 2, 4, 8)``, outputs four times that; 1x1
    conv + BN shortcuts where the shape changes. About 25.6 M parameters at the
    defaults. ``zero_init_residual`` as in :func:`resnet18`: without it, 16 bottlenecks
    train poorly from scratch on small data.

    Input: ``(B, in_channels, H, W)``, any ``H, W >= 1``.

    Example:
        >>> model = resnet50(in_channels=3, num_classes=10, width=8)
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """
    return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), in_channels, num_classes, width, zero_init_residual)


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` without losing more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear project.

    The residual add is present only when ``stride == 1`` and ``in_ch == out_ch``;
    that is decided here, at construction, so the traced graph is static.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=False)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=False),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper's Table 2,
# cut down to 7 blocks so it trains on 8x8 digits in seconds.
_MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 1),
)


class MobileNetV2(nn.Module):
    """Stem, inverted-residual blocks, 1x1 head conv, global average pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        stem_ch = _make_divisible(32 * width_mult)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU6(inplace=False),
        )
        blocks: list[nn.Module] = []
        in_ch = stem_ch
        for expand_ratio, channels, repeats, first_stride in _MOBILENETV2_SETTINGS:
            out_ch = _make_divisible(channels * width_mult)
            for index in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, first_stride if index == 0 else 1, expand_ratio))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        head_ch = _make_divisible(256 * max(1.0, width_mult))
        self.head = nn.Sequential(
            nn.Conv2d(in_ch, head_ch, 1, bias=False),
            nn.BatchNorm2d(head_ch),
            nn.ReLU6(inplace=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenetv2(in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """A small MobileNetV2-style network (Sandler et al. 2018), not the full ImageNet model.

    3x3 stride-1 stem, seven inverted-residual blocks (expansion 1 then 6,
    depthwise 3x3 with ``groups=hidden``, ReLU6, linear bottleneck, residual add
    when stride is 1 and channels match), 1x1 head conv, global average pool,
    linear. Two stride-2 blocks, so the spatial size shrinks by 4 overall.
    ``width_mult`` scales every channel count (rounded to multiples of 8).

    Input: ``(B, in_channels, H, W)``, any ``H, W >= 1`` (8x8 digits, 32x32 CIFAR).

    Example:
        >>> model = mobilenetv2(in_channels=1, num_classes=10, width_mult=0.5)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width_mult=width_mult)
    model = MobileNetV2(in_channels, num_classes, width_mult)
    _init_weights(model)
    return model


# --------------------------------------------------------------------------- plain CNN


class PlainCNN(nn.Module):
    """Conv-BN-ReLU layers, a max pool, an Inception-like two-branch block joined by concat."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width, kernel_size=3),
            _conv_bn_relu(width, width, kernel_size=3),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        # Branch A: a 3x3 conv. Branch B: average pool then a 1x1 conv (the "pool branch").
        self.branch_conv = _conv_bn_relu(width, width, kernel_size=3)
        self.branch_pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool_conv = _conv_bn_relu(width, width, kernel_size=1)
        self.mix = _conv_bn_relu(2 * width, 2 * width, kernel_size=3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        a = self.branch_conv(x)
        b = self.branch_pool_conv(self.branch_pool(x))
        x = self.mix(torch.cat([a, b], dim=1))
        return self.fc(torch.flatten(self.pool(x), 1))


def plain_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> PlainCNN:
    """A plain CNN with one concatenation join, the smallest model with a multi-input node.

    Two 3x3 conv-BN-ReLU layers, 2x2 max pool, then two branches (3x3 conv; 3x3
    average pool + 1x1 conv) concatenated along channels to ``2*width``, one more
    3x3 conv-BN-ReLU, global average pool, linear.

    Input: ``(B, in_channels, H, W)`` with ``H, W >= 2`` (the max pool halves them).

    Example:
        >>> model = plain_cnn(in_channels=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    model = PlainCNN(in_channels, num_classes, width)
    _init_weights(model)
    return model


# --------------------------------------------------------------------------- 1-D CNN

_CONV1D_GROUPS = 4


class Conv1dNet(nn.Module):
    """Conv1d-BN-ReLU stack (the middle conv grouped), global average pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()

        def layer(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(
                    in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
                ),
                nn.BatchNorm1d(out_ch),
                nn.ReLU(inplace=False),
            )

        self.features = nn.Sequential(
            layer(in_channels, width, kernel_size=5),
            layer(width, 2 * width, kernel_size=3, stride=2, groups=_CONV1D_GROUPS),
            layer(2 * width, 2 * width, kernel_size=3),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def conv1d_net(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Conv1dNet:
    """A 1-D convolutional classifier for signals shaped ``(B, C, L)``.

    Three Conv1d-BN-ReLU layers (kernel 5; kernel 3 stride 2 with 4 groups;
    kernel 3), global average pool, linear. ``width`` must be a multiple of 4
    because of the grouped layer.

    Input: ``(B, in_channels, L)`` with ``L >= 1``, e.g. ``(2, 1, 64)``.

    Example:
        >>> model = conv1d_net(in_channels=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 64)).shape
        torch.Size([2, 10])
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    if width % _CONV1D_GROUPS:
        raise SpecError(
            f"conv1d_net: width={width} must be a multiple of {_CONV1D_GROUPS} (grouped conv); pick e.g. 16"
        )
    model = Conv1dNet(in_channels, num_classes, width)
    _init_weights(model)
    return model


# --------------------------------------------------------------------------- registry

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "plain_cnn": plain_cnn,
    "conv1d_net": conv1d_net,
    "adder_resnet20": adder_resnet20,
}
"""Model name -> factory. Every factory takes ``in_channels`` and ``num_classes`` keywords."""


def build(name: str, **kwargs: object) -> nn.Module:
    """Build the zoo model called ``name``, passing ``kwargs`` to its factory.

    Raises:
        SpecError: ``name`` is not in ``ZOO``, or the factory does not take one of ``kwargs``.

    Example:
        >>> build("plain_cnn", in_channels=1, num_classes=10).fc.out_features
        10
    """
    factory = ZOO.get(name)
    if factory is None:
        raise SpecError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}")
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(signature.parameters)
        raise SpecError(f"model {name!r}: {error}; it accepts: {accepted}") from error
    return factory(**kwargs)
