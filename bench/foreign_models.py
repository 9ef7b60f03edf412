"""Five "foreign" architectures for bench/ptq.py, written from scratch in plain PyTorch.

The zoo (``qcompiler.zoo``) holds the models qcompiler was built around; these are
the layer patterns a user brings from elsewhere, so the PTQ bench measures how much
of such a model qcompiler quantizes and how well:

- ``mobilenetv3``: depthwise-separable inverted residuals with squeeze-excitation
  (hardsigmoid gate, a ``mul`` of two activations) and hardswish;
- ``efficientnet``: MBConv blocks with SiLU and a sigmoid-gated squeeze-excitation;
- ``densenet``: dense blocks whose every layer reads the concatenation of all before it;
- ``unet``: a two-level UNet with ``nn.ConvTranspose2d`` upsampling and skip concats,
  read out as per-class logits by a 1x1 conv and a global average pool;
- ``vit``: a small vision transformer: patch-embedding conv, class token, learned
  position embedding, pre-norm ``nn.MultiheadAttention`` blocks with GELU MLPs.

All are sized for the 8x8 digits (any ``H, W`` divisible by 4 works) and for a few
seconds of training on two CPU cores; each is written so ``torch.fx.symbolic_trace``
sees a static graph (no data-dependent control flow), as the zoo's are. Weights are
PyTorch's default initialisation under the caller's ``torch.manual_seed``.

    >>> import torch
    >>> model = build("vit", in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FOREIGN", "build"]


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
             act: Callable[[], nn.Module] | None = None) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d [-> act]`` with 'same' padding for odd kernels."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Global pool, 1x1 reduce + ``act``, 1x1 expand + ``gate``, then scale the input channels by the gate.

    The scaling is a product of two activations (not a layer with weights): the
    pattern a quantizer has to handle beyond conv/linear.
    """

    def __init__(self, channels: int, reduced: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, squeeze-excitation, 1x1 linear project; residual when shapes match.

    With hardswish / ReLU and a hardsigmoid gate this is MobileNetV3's block; with
    SiLU and a sigmoid gate it is EfficientNet's MBConv.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, act: Callable[[], nn.Module],
                 se_act: Callable[[], nn.Module], gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = _conv_bn(in_ch, mid, 1, act=act)
        self.depthwise = _conv_bn(mid, mid, 3, stride=stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid, max(8, mid // 4), se_act, gate)
        self.project = _conv_bn(mid, out_ch, 1)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class MobileNetV3(nn.Module):
    """Hardswish stem, four SE inverted residuals (ReLU then hardswish), 1x1 head, pool, two-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        block = lambda i, o, s, act: InvertedResidual(i, o, s, 3, act, nn.ReLU, nn.Hardsigmoid)  # noqa: E731
        self.stem = _conv_bn(in_channels, w, 3, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            block(w, w, 1, nn.ReLU),
            block(w, 2 * w, 2, nn.ReLU),
            block(2 * w, 2 * w, 1, nn.Hardswish),
            block(2 * w, 3 * w, 2, nn.Hardswish),
        )
        self.head = _conv_bn(3 * w, 6 * w, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * w, 8 * w), nn.Hardswish(), nn.Dropout(0.1), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(torch.flatten(x, 1))


class EfficientNet(nn.Module):
    """SiLU stem, MBConv blocks (expand 1 then 4, sigmoid-gated SE), 1x1 SiLU head, pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        block = lambda i, o, s, e: InvertedResidual(i, o, s, e, nn.SiLU, nn.SiLU, nn.Sigmoid)  # noqa: E731
        self.stem = _conv_bn(in_channels, w, 3, act=nn.SiLU)
        self.blocks = nn.Sequential(
            block(w, w, 1, 1),
            block(w, 2 * w, 2, 4),
            block(2 * w, 2 * w, 1, 4),
            block(2 * w, 3 * w, 2, 4),
            block(3 * w, 3 * w, 1, 4),
        )
        self.head = _conv_bn(3 * w, 8 * w, 1, act=nn.SiLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1 conv to ``4*growth``, BN-ReLU-3x3 conv to ``growth``."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))


class DenseBlock(nn.Module):
    """Each layer reads the channel concatenation of the block input and every earlier layer's output."""

    def __init__(self, in_ch: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:  # a fixed Python loop: fx unrolls it
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """Stem conv, dense block, transition (BN-ReLU-1x1 conv, 2x2 average pool), dense block, BN-ReLU, pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, growth: int = 12, layers: int = 4) -> None:
        super().__init__()
        stem = 2 * growth
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.block1 = DenseBlock(stem, growth, layers)
        mid = stem + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid // 2, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = DenseBlock(mid // 2, growth, layers)
        out = mid // 2 + layers * growth
        self.norm = nn.Sequential(nn.BatchNorm2d(out), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.norm(x)), 1))


class UNet(nn.Module):
    """Two-level UNet: encoder (conv pairs, max pool), bottleneck, ``ConvTranspose2d`` upsampling with skip concats.

    The decoder's full-resolution features go through a 1x1 conv to one map per class
    and a global average pool, so the output is per-class logits ``(B, classes)``
    (argmax agreement is per image); a segmentation net would stop before the pool.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        pair = lambda i, o: nn.Sequential(_conv_bn(i, o, 3, act=nn.ReLU), _conv_bn(o, o, 3, act=nn.ReLU))  # noqa: E731
        self.enc1 = pair(in_channels, w)
        self.down1 = nn.MaxPool2d(2)
        self.enc2 = pair(w, 2 * w)
        self.down2 = nn.MaxPool2d(2)
        self.bottleneck = pair(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, kernel_size=2, stride=2)
        self.dec2 = pair(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = pair(2 * w, w)
        self.classes = nn.Conv2d(w, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.down1(e1))
        b = self.bottleneck(self.down2(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return torch.flatten(self.pool(self.classes(d1)), 1)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch-embedding conv, class token, learned position embedding, encoder blocks, LayerNorm, linear head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 8, patch: int = 2, dim: int = 48,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.patch_embed(x), 2).transpose(1, 2)  # (B, tokens, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


FOREIGN: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv3": MobileNetV3,
    "efficientnet": EfficientNet,
    "densenet": DenseNet,
    "unet": UNet,
    "vit": ViT,
}
"""Model name -> class; every constructor takes ``in_channels`` and ``num_classes`` (and sizes with defaults)."""


def build(name: str, in_channels: int, num_classes: int, **kwargs: object) -> nn.Module:
    """The foreign model ``name`` with PyTorch's default initialisation (seed it first)."""
    return FOREIGN[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
