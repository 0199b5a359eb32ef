"""Small nets for the embedded datasets: MLPs on flattened inputs and CNNs on images of any size
and channel count."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn
from torchvision.ops import MLP, Conv2dNormActivation

from bayeskd.declare import net
from bayeskd.taps import Taps
from bayeskd.zoo._layers import GlobalAvgPool


@net("mlp_teacher", hidden=[128, 128])  # the paper's synthetic-benchmark MLP (30-128-128-K)
@net("mlp_student", hidden=[16])
def mlp(num_classes: int, in_shape: Sequence[int], *, hidden: Sequence[int]) -> nn.Module:
    """A fully connected ReLU net on the flattened input. Its one tap is the last hidden layer (the
    pre-logit vector): it has no stages."""
    in_features = 1
    for d in in_shape:
        in_features *= d
    model = nn.Sequential(nn.Flatten(), MLP(in_features, [*hidden, num_classes]))
    model.taps = Taps((), f"1.{len(model[1]) - 3}")  # the last hidden activation (MLP ends Linear, Dropout)
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
        block = Conv2dNormActivation(channels, w, kernel_size=3)
        layers[f"stage{i + 1}"] = nn.Sequential(block, nn.MaxPool2d(2)) if i == 0 else block
        channels = w
    layers |= {"pool": GlobalAvgPool(), "flatten": nn.Flatten(), "fc": nn.Linear(channels, num_classes)}
    model = nn.Sequential(OrderedDict(layers))
    model.taps = Taps(tuple(f"stage{i + 1}" for i in range(len(widths))), "flatten")
    return model
