"""Building blocks shared by the zoo's networks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """A bias-free 'same'-padded convolution followed by batch norm and, optionally, a ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal channel groups (ShuffleNet's channel shuffle)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ZooNet(nn.Sequential):
    """A network run as a chain of named parts: the body parts, then `pool` (global average),
    `flatten` (the pre-logit vector) and `fc` (the logits).

    `feature_names` lists the parts whose outputs are the intermediate features for feature-based
    distillation: every body part (stem, stages, ...) in order, then `flatten`.
    """

    def __init__(self, body: dict[str, nn.Module], width: int, num_classes: int):
        super().__init__(OrderedDict([
            *body.items(),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(width, num_classes)),
        ]))
        self.feature_names: list[str] = [*body, "flatten"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
