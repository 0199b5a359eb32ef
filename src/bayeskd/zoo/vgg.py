"""VGG with batch norm for 32x32 inputs: five stages of 3x3 conv-BN-ReLU layers, a 2x2 max-pool
before each stage after the first, global average pooling and a single Linear(512, num_classes)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bayeskd.zoo._layers import ZooNet

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


def vgg(depth: int, num_classes: int) -> ZooNet:
    """`vgg{depth}` (8, 11, 13, 16 or 19 weight layers). Features: each stage's output, taken
    before the max-pool that starts the next stage, and the pre-logit vector."""
    body: dict[str, nn.Module] = {}
    in_ch = 3
    for i, widths in enumerate(STAGE_WIDTHS[depth], start=1):
        body[f"stage{i}"] = _stage(in_ch, widths, pool_first=i > 1)
        in_ch = widths[-1]
    return ZooNet(body, in_ch, num_classes)
