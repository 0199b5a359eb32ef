"""Wide residual networks (pre-activation): `wrn_{depth}_{widen}` has a 3x3 stem to 16 channels and
three stages of (depth - 4) / 6 blocks with widths 16, 32, 64 times `widen`."""

from __future__ import annotations

import torch
from torch import nn

from bayeskd.declare import net
from bayeskd.zoo._layers import ZooNet, rgb_size


def _bn_relu(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU())


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice with a residual connection. When the shape changes, the shortcut is a
    1x1 convolution of the activated input; otherwise it is the raw input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.preact = _bn_relu(in_ch)
        self.residual = nn.Sequential(
            _conv3x3(in_ch, out_ch, stride), _bn_relu(out_ch), _conv3x3(out_ch, out_ch)
        )
        self.projection = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preact(x)
        skip = x if self.projection is None else self.projection(a)
        return self.residual(a) + skip


@net("wrn_16_1", depth=16, widen=1)
@net("wrn_16_2", depth=16, widen=2)
@net("wrn_40_1", depth=40, widen=1)
@net("wrn_40_2", depth=40, widen=2)
def wide_resnet(num_classes: int, in_shape: tuple[int, ...], *, depth: int, widen: int) -> ZooNet:
    """Taps: the three stages' (pre-activation) outputs; `head` is the final BN-ReLU before pooling."""
    rgb_size(in_shape)
    if (depth - 4) % 6:
        raise ValueError(f"a wide resnet needs depth 6n + 4; got {depth}")
    n = (depth - 4) // 6
    stages = []
    in_ch = 16
    for width, stride in [(16, 1), (32, 2), (64, 2)]:
        out_ch = width * widen
        blocks = [PreActBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*blocks))
        in_ch = out_ch
    return ZooNet(_conv3x3(3, 16), stages, _bn_relu(in_ch), in_ch, num_classes)
