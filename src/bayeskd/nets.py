"""Architectures by name. `NETS` maps each name of `bayeskd.config.NETS` to a builder
`(num_classes, in_shape) -> nn.Module`: small MLPs and CNNs for the embedded datasets, and the CIFAR
KD model zoo of `bayeskd.zoo`. Every net declares its feature taps (`bayeskd.taps.Taps`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import MLP, Conv2dNormActivation

from bayeskd import config
from bayeskd.io import Failure
from bayeskd.taps import Taps
from bayeskd.zoo import ZOO
from bayeskd.zoo._layers import GlobalAvgPool


def mlp(hidden: Sequence[int]) -> Callable[[int, Sequence[int]], nn.Module]:
    """A fully connected ReLU net on the flattened input. Its one tap is the last hidden layer (the
    pre-logit vector): it has no stages."""

    def build(num_classes: int, in_shape: Sequence[int]) -> nn.Module:
        in_features = 1
        for d in in_shape:
            in_features *= d
        net = nn.Sequential(nn.Flatten(), MLP(in_features, [*hidden, num_classes]))
        net.taps = Taps((), f"1.{len(net[1]) - 3}")  # the last hidden activation (MLP ends Linear, Dropout)
        return net

    return build


def cnn(widths: Sequence[int]) -> Callable[[int, Sequence[int]], nn.Module]:
    """Conv-BN-ReLU stages (a 2x2 max-pool ends the first), global average pool, linear head. The
    stage outputs and the pooled vector are its taps, as in the zoo."""

    def build(num_classes: int, in_shape: Sequence[int]) -> nn.Module:
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
        layers |= {"pool": GlobalAvgPool(), "flatten": nn.Flatten(),
                   "fc": nn.Linear(channels, num_classes)}
        net = nn.Sequential(OrderedDict(layers))
        net.taps = Taps(tuple(f"stage{i + 1}" for i in range(len(widths))), "flatten")
        return net

    return build


# small nets for the embedded datasets
EMBEDDED: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    "mlp_teacher": mlp([128, 128]),  # the paper's synthetic-benchmark MLP (30-128-128-K)
    "mlp_student": mlp([16]),
    "cnn_teacher": cnn([32, 64, 128]),
    "cnn_student": cnn([8, 16]),
}
NETS = EMBEDDED | ZOO  # plus the standard CIFAR KD zoo (bayeskd.zoo)
config.check_registry("net", config.NETS, NETS)


class Normalized(nn.Module):
    """`net` behind per-channel normalisation (x - mean) / std, so the model takes raw [0, 1] pixels."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        if hasattr(net, "taps"):
            self.taps = net.taps.under("net")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build(name: str, num_classes: int, in_shape: Sequence[int], normalize: dict | None = None) -> nn.Module:
    """The net `name` for `num_classes` classes and inputs of shape `in_shape`; with `normalize`
    ({"mean": [...], "std": [...]}) it normalises its input itself."""
    if name not in NETS:
        raise ValueError(f"net {name!r} is not known; expected one of {', '.join(sorted(NETS))}")
    net = NETS[name](num_classes, in_shape)
    return Normalized(net, normalize["mean"], normalize["std"]) if normalize else net


class WeightsError(Failure):
    """A weights file is missing, damaged, or holds another net's weights."""


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's tensors as safetensors, with `metadata` (strings) in the file's header."""
    from safetensors.torch import save

    from bayeskd.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(save(model.state_dict(), metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata that save_weights wrote into a weights file's header ({} if none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # as in read_weights: safetensors raises several kinds
        raise WeightsError(f"cannot read {path}: {str(e).splitlines()[0][:200] or type(e).__name__}; "
                           "restore it with `dvc checkout` or rebuild it with `dvc repro`") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; WeightsError naming the file if it cannot be read."""
    from safetensors.torch import load

    try:
        return load(Path(path).read_bytes())
    except Exception as e:  # a missing, truncated or foreign file: safetensors raises several kinds
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0][:200] or type(e).__name__
        raise WeightsError(f"cannot read {path}: {reason}; restore it with `dvc checkout` or rebuild it "
                           "with `dvc repro`") from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    tensors = read_weights(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # keys or shapes of another net
        raise WeightsError(f"{path} holds the weights of another net: {str(e).splitlines()[0]}") from None
    return model.eval()
