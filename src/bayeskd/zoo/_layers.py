"""Building blocks shared by the zoo's networks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bayeskd.taps import Taps


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


def rgb_size(in_shape: tuple[int, ...]) -> int:
    """The height of 3-channel images of shape `in_shape`; ValueError for other inputs."""
    if len(in_shape) != 3 or in_shape[0] != 3:
        raise ValueError("needs 3-channel image input of shape (3, height, width); the data has shape "
                         f"{in_shape}")
    return in_shape[1]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal channel groups (ShuffleNet's channel shuffle)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class GlobalAvgPool(nn.Module):
    """The mean over height and width (N x C x 1 x 1). Equal to AdaptiveAvgPool2d(1), whose CUDA
    backward is nondeterministic (atomic adds); a mean's backward is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class ZooNet(nn.Sequential):
    """A network run as a chain of named parts: `stem` (if any), `stage1` ... `stageN`, `head` (if
    any), then `pool` (global average), `flatten` (the pre-logit vector) and `fc` (the logits).
    Its taps are the stage outputs and the pre-logit vector."""

    def __init__(self, stem: nn.Module | None, stages: list[nn.Module], head: nn.Module | None, width: int,
                 num_classes: int):
        names = [f"stage{i}" for i in range(1, len(stages) + 1)]
        parts = [("stem", stem), *zip(names, stages, strict=True), ("head", head)]
        super().__init__(OrderedDict([
            *((name, part) for name, part in parts if part is not None),
            ("pool", GlobalAvgPool()),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(width, num_classes)),
        ]))
        self.taps = Taps(tuple(names), "flatten")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
