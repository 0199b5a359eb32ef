"""VGG with batch norm for CIFAR: five stages of 3x3 conv-BN-ReLU layers, global average pooling and
a single Linear(512, num_classes). A 2x2 max-pool starts stages 2 to 4, so on 32x32 inputs the
stages run at 32, 16, 8, 4 and 4 pixels; only 64-pixel inputs are pooled before stage 5 as well, as in
the reference CIFAR knowledge-distillation code."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bayeskd.declare import net
from bayeskd.zoo._layers import ZooNet, rgb_size

STAGE_WIDTHS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _stage(in_ch: int, widths: Sequence[int], pool_first: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool_first else []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    return nn.Sequential(*layers)


@net("vgg8", depth=8)
@net("vgg11", depth=11)
@net("vgg13", depth=13)
@net("vgg16", depth=16)
@net("vgg19", depth=19)
def vgg(num_classes: int, in_shape: tuple[int, ...], *, depth: int) -> ZooNet:
    """`vgg{depth}` (8, 11, 13, 16 or 19 weight layers). Taps: each stage's output, taken before the
    max-pool that starts the next stage, and the pre-logit vector."""
    image_size = rgb_size(in_shape)
    stages = []
    in_ch = 3
    for i, widths in enumerate(STAGE_WIDTHS[depth], start=1):
        stages.append(_stage(in_ch, widths, pool_first=1 < i < 5 or (i == 5 and image_size == 64)))
        in_ch = widths[-1]
    return ZooNet(None, stages, None, in_ch, num_classes)
