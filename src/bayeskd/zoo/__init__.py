"""The standard CIFAR knowledge-distillation model zoo (ResNets, wide ResNets, VGGs, MobileNetV2,
ShuffleNets), for 3-channel image input.

`ZOO` maps each name of `bayeskd.config.ZOO_NETS` to a builder `(num_classes, in_shape) -> nn.Module`.
Every model's forward returns the logits only; its `taps` declare its stage outputs and pre-logit
vector (`bayeskd.taps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from bayeskd.config import ZOO_NETS, check_registry
from bayeskd.zoo.mobilenet import mobilenet_v2
from bayeskd.zoo.resnet import cifar_resnet, resnet18, resnet50
from bayeskd.zoo.shufflenet import shufflenet_v1, shufflenet_v2
from bayeskd.zoo.vgg import vgg
from bayeskd.zoo.wrn import wide_resnet

THIN = [16, 16, 32, 64]
WIDE = [32, 64, 128, 256]

_MAKERS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": partial(cifar_resnet, d, THIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, WIDE),
    "resnet32x4": partial(cifar_resnet, 32, WIDE),
    "ResNet18": resnet18,
    "ResNet50": resnet50,
    **{f"wrn_{d}_{w}": partial(wide_resnet, d, w) for d in (16, 40) for w in (1, 2)},
    "MobileNetV2": mobilenet_v2,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
}
_SIZED: dict[str, Callable[[int, int], nn.Module]] = {  # (num_classes, image size)
    f"vgg{d}": partial(vgg, d) for d in (8, 11, 13, 16, 19)  # pools before stage 5 only at 64 pixels
}


def _builder(name: str) -> Callable[[int, Sequence[int]], nn.Module]:
    def build(num_classes: int, in_shape: Sequence[int]) -> nn.Module:
        shape = tuple(in_shape)
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(
                f"net {name!r} needs 3-channel image input of shape (3, height, width); "
                f"the data has shape {shape}"
            )
        return _SIZED[name](num_classes, shape[1]) if name in _SIZED else _MAKERS[name](num_classes)

    return build


ZOO: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {name: _builder(name) for name in ZOO_NETS}
check_registry("zoo net", ZOO_NETS, {*_MAKERS, *_SIZED})
