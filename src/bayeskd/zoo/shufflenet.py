"""ShuffleNet V1 (groups 3) and V2 (1x) for 32x32 inputs: a 1x1 stem to 24 channels at full
resolution, then three stages that each halve the resolution in their first block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bayeskd.declare import net
from bayeskd.zoo._layers import ZooNet, channel_shuffle, conv_bn, rgb_size


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1. At stride 2 the block's output is
    its branch concatenated with the 3x3 average-pooled input; at stride 1 the branch is added to
    the input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        branch_ch = out_ch - in_ch if stride == 2 else out_ch
        mid = branch_ch // 4
        self.first_groups = first_groups
        self.reduce = conv_bn(in_ch, mid, 1, groups=first_groups)
        self.branch = nn.Sequential(
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, branch_ch, 1, groups=groups, relu=False),
        )
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(channel_shuffle(self.reduce(x), self.first_groups))
        if self.downsample is None:
            return self.relu(out + x)
        return self.relu(torch.cat([out, self.downsample(x)], 1))


@net("ShuffleV1")
def shufflenet_v1(num_classes: int, in_shape: tuple[int, ...], *, widths: Sequence[int] = (240, 480, 960),
                  depths: Sequence[int] = (4, 8, 4), groups: int = 3) -> ZooNet:
    """The first 1x1 conv of the very first block is not grouped (the 24-channel stem is too narrow)."""
    rgb_size(in_shape)
    stages = []
    in_ch = 24
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        blocks = []
        for j in range(depth):
            first_groups = 1 if i == 0 and j == 0 else groups
            blocks.append(ShuffleV1Block(in_ch, width, 2 if j == 0 else 1, groups, first_groups))
            in_ch = width
        stages.append(nn.Sequential(*blocks))
    return ZooNet(conv_bn(3, 24, 1), stages, None, in_ch, num_classes)


class ShuffleV2Block(nn.Module):
    """Splits the channels in half, transforms the second half (1x1, 3x3 depthwise, 1x1), then
    concatenates the halves and shuffles them."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches on the whole input, each giving half the output channels, concatenated
    and shuffled."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        half = out_ch // 2
        self.left = nn.Sequential(
            conv_bn(in_ch, in_ch, 3, 2, groups=in_ch, relu=False),
            conv_bn(in_ch, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_ch, half, 1),
            conv_bn(half, half, 3, 2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


@net("ShuffleV2")
def shufflenet_v2(num_classes: int, in_shape: tuple[int, ...], *, widths: Sequence[int] = (116, 232, 464),
                  depths: Sequence[int] = (3, 7, 3), head_width: int = 1024) -> ZooNet:
    """Each stage is a down-sampling block followed by `depth` basic blocks. Taps: the three stages
    and the pre-logit vector (after the 1x1 `head` conv)."""
    rgb_size(in_shape)
    stages = []
    in_ch = 24
    for width, depth in zip(widths, depths, strict=True):
        blocks = [ShuffleV2DownBlock(in_ch, width), *(ShuffleV2Block(width) for _ in range(depth))]
        stages.append(nn.Sequential(*blocks))
        in_ch = width
    return ZooNet(conv_bn(3, 24, 1), stages, conv_bn(in_ch, head_width, 1), head_width, num_classes)
