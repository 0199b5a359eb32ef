"""The standard CIFAR knowledge-distillation model zoo (ResNets, wide ResNets, VGGs, MobileNetV2,
ShuffleNets), for 3-channel image input.

`ZOO` maps each name to a builder `(num_classes, in_shape) -> nn.Module`. Every model's forward
returns the logits only; its `feature_names` lists the submodules whose outputs are the
intermediate features (stem, stages, ..., then the pre-logit vector), and `features` runs the model
and collects them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from bayeskd.zoo.mobilenet import mobilenet_v2
from bayeskd.zoo.resnet import cifar_resnet, resnet18, resnet50
from bayeskd.zoo.shufflenet import shufflenet_v1, shufflenet_v2
from bayeskd.zoo.vgg import vgg
from bayeskd.zoo.wrn import wide_resnet

THIN = [16, 16, 32, 64]
WIDE = [32, 64, 128, 256]


def _builder(name: str, make: Callable[[int], nn.Module]) -> Callable[[int, Sequence[int]], nn.Module]:
    def build(num_classes: int, in_shape: Sequence[int]) -> nn.Module:
        shape = tuple(in_shape)
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(
                f"net {name!r} needs 3-channel image input of shape (3, height, width); "
                f"the data has shape {shape}"
            )
        return make(num_classes)

    return build


_MAKERS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": partial(cifar_resnet, d, THIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, WIDE),
    "resnet32x4": partial(cifar_resnet, 32, WIDE),
    "ResNet18": resnet18,
    "ResNet50": resnet50,
    **{f"wrn_{d}_{w}": partial(wide_resnet, d, w) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": partial(vgg, d) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": mobilenet_v2,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
}

ZOO: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    name: _builder(name, make) for name, make in _MAKERS.items()
}


class Tap:
    """Keeps the latest outputs of `model`'s feature layers (forward hooks on `model.feature_names`),
    so a loss can read the features of the forward pass that produced the logits."""

    def __init__(self, model: nn.Module):
        names = getattr(model, "feature_names", None)
        if not names:
            raise ValueError(f"{type(model).__name__} has no feature taps (no `feature_names`)")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._keeper(n)) for n in names]
        self.names = list(names)

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self.outputs[name] = output

        return keep

    def read(self) -> dict[str, torch.Tensor]:
        return {name: self.outputs[name] for name in self.names}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `model` on `x` and return (logits, {name: output}) for every name in `model.feature_names`."""
    tap = Tap(model)
    try:
        return model(x), tap.read()
    finally:
        tap.remove()
