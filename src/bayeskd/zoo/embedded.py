"""Small nets for the embedded datasets: MLPs on flattened inputs and CNNs on images of any size
and channel count. Built from torch.nn alone: importing torchvision (for its MLP and
Conv2dNormActivation, the same layers) costs every stage process torch._dynamo's import, about 2 s."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from bayeskd.declare import net
from bayeskd.taps import Taps
from bayeskd.zoo._layers import GlobalAvgPool, conv_bn


@net("mlp_teacher", hidden=[128, 128])  # the paper's synthetic-benchmark MLP (30-128-128-K)
@net("mlp_student", hidden=[16])
def mlp(num_classes: int, in_shape: Sequence[int], *, hidden: Sequence[int]) -> nn.Module:
    """A fully connected ReLU net on the flattened input. Its one tap is the last hidden layer (the
    pre-logit vector): it has no stages."""
    widths = [math.prod(in_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in itertools.pairwise(widths):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))
    model.taps = Taps((), str(len(model) - 2))  # the last hidden activation
    return model


@net("cnn_teacher", widths=[32, 64, 128])
@net("cnn_student", widths=[8, 16])
def cnn(num_classes: int, in_shape: Sequence[int], *, widths: Sequence[int]) -> nn.Module:
    """Conv-BN-ReLU stages (a 2x2 max-pool ends the first), global average pool, linear head. The
    stage outputs and the pooled vector are its taps, as in the zoo."""
    if len(in_shape) != 3:
        raise ValueError(
            f"a CNN needs image input (channels, height, width); the data has shape {tuple(in_shape)}"
        )
    layers: dict[str, nn.Module] = {}
    channels = in_shape[0]
    for i, w in enumerate(widths):
        block = conv_bn(channels, w, kernel_size=3)
        layers[f"stage{i + 1}"] = nn.Sequential(block, nn.MaxPool2d(2)) if i == 0 else block
        channels = w
    layers |= {"pool": GlobalAvgPool(), "flatten": nn.Flatten(), "fc": nn.Linear(channels, num_classes)}
    model = nn.Sequential(OrderedDict(layers))
    model.taps = Taps(tuple(f"stage{i + 1}" for i in range(len(widths))), "flatten")
    return model
