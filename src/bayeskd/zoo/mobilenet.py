"""MobileNetV2 for 32x32 inputs at width multiplier 0.5 (expansion 6): a stride-2 3x3 stem, inverted
residual blocks grouped into four stages by resolution (16, 8, 4 and 2 pixels for a 32-pixel
input), and a 1x1 conv head to 1280 channels."""

from __future__ import annotations

import torch
from torch import nn

from bayeskd.declare import net
from bayeskd.zoo._layers import ZooNet, conv_bn, rgb_size

# Per stage, the block groups as (expansion, output channels at width 1, blocks, first stride).
STAGES: list[list[tuple[int, int, int, int]]] = [
    [(1, 16, 1, 1), (6, 24, 2, 1)],
    [(6, 32, 3, 2)],
    [(6, 64, 4, 2), (6, 96, 3, 1)],
    [(6, 160, 3, 2), (6, 320, 1, 1)],
]
HEAD_WIDTH = 1280


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, linear 1x1 project; residual when stride 1 and the width is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.body = nn.Sequential(
            conv_bn(in_ch, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, relu=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


@net("MobileNetV2")
def mobilenet_v2(num_classes: int, in_shape: tuple[int, ...], *, width_mult: float = 0.5) -> ZooNet:
    """Taps: the four stages and the pre-logit vector (after the 1x1 `head` conv)."""
    rgb_size(in_shape)
    in_ch = int(32 * width_mult)
    stem = conv_bn(3, in_ch, 3, stride=2)
    stages = []
    for groups in STAGES:
        blocks = []
        for expansion, channels, count, stride in groups:
            out_ch = int(channels * width_mult)
            for j in range(count):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if j == 0 else 1, expansion))
                in_ch = out_ch
        stages.append(nn.Sequential(*blocks))
    head_width = int(HEAD_WIDTH * width_mult) if width_mult > 1 else HEAD_WIDTH
    return ZooNet(stem, stages, conv_bn(in_ch, head_width, 1), head_width, num_classes)
