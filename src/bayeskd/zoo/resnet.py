"""Residual networks for 32x32 inputs: the thin CIFAR `resnetN` family (three stages of basic
blocks), its wide `x4` variants, and ResNet18/ResNet50 (the ImageNet designs with a 3x3 stem and no
max-pool)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bayeskd.declare import net
from bayeskd.zoo._layers import ZooNet, conv_bn, rgb_size


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(conv_bn(in_ch, width, 3, stride), conv_bn(width, width, 3, relu=False))
        self.shortcut = _shortcut(in_ch, width, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand to `expansion * width`, with a residual connection."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = self.expansion * width
        self.residual = nn.Sequential(
            conv_bn(in_ch, width, 1),
            conv_bn(width, width, 3, stride),
            conv_bn(width, out_ch, 1, relu=False),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return conv_bn(in_ch, out_ch, 1, stride, relu=False)


def _resnet(stem_width: int, block: type[BasicBlock | Bottleneck], widths: Sequence[int],
            depths: Sequence[int], strides: Sequence[int], num_classes: int) -> ZooNet:
    stages = []
    in_ch = stem_width
    for width, depth, stride in zip(widths, depths, strides, strict=True):
        blocks = []
        for j in range(depth):
            blocks.append(block(in_ch, width, stride if j == 0 else 1))
            in_ch = width * block.expansion
        stages.append(nn.Sequential(*blocks))
    return ZooNet(conv_bn(3, stem_width, 3), stages, None, in_ch, num_classes)


@net("resnet8", depth=8)
@net("resnet14", depth=14)
@net("resnet20", depth=20)
@net("resnet32", depth=32)
@net("resnet44", depth=44)
@net("resnet56", depth=56)
@net("resnet110", depth=110)
@net("resnet8x4", depth=8, widths=[32, 64, 128, 256])
@net("resnet32x4", depth=32, widths=[32, 64, 128, 256])
def cifar_resnet(num_classes: int, in_shape: tuple[int, ...], *, depth: int,
                 widths: Sequence[int] = (16, 16, 32, 64)) -> ZooNet:
    """`resnet{depth}`: a 3x3 stem to `widths[0]` channels, then three stages of (depth - 2) / 6
    basic blocks with widths `widths[1:]` at strides 1, 2, 2 (x4: four times as wide, a stem twice as
    wide)."""
    rgb_size(in_shape)
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR resnet needs depth 6n + 2; got {depth}")
    n = (depth - 2) // 6
    return _resnet(widths[0], BasicBlock, widths[1:], [n] * 3, [1, 2, 2], num_classes)


@net("ResNet18")
def resnet18(num_classes: int, in_shape: tuple[int, ...]) -> ZooNet:
    rgb_size(in_shape)
    return _resnet(64, BasicBlock, [64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], num_classes)


@net("ResNet50")
def resnet50(num_classes: int, in_shape: tuple[int, ...]) -> ZooNet:
    rgb_size(in_shape)
    return _resnet(64, Bottleneck, [64, 128, 256, 512], [3, 4, 6, 3], [1, 2, 2, 2], num_classes)
