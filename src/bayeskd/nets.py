"""Nets by name: `build` turns a name of `NETS` (the nets declared in bayeskd.zoo: small MLPs and
CNNs for the embedded datasets, and the CIFAR KD model zoo) into a model, normalising its input if
asked; and the models' weights files. Every net declares its feature taps (`bayeskd.taps.Taps`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bayeskd import integrity, zoo
from bayeskd.io import Failure

NETS = zoo.NETS


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
    try:
        net = NETS[name].build(num_classes, in_shape)
    except ValueError as e:  # the builder says what inputs it needs
        raise ValueError(f"net {name!r}: {e}") from None
    return Normalized(net, normalize["mean"], normalize["std"]) if normalize else net


class WeightsError(Failure):
    """A weights file is missing, damaged, or holds another net's weights."""


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's tensors as safetensors, with `metadata` (strings) in the file's header."""
    save_tensors(model.state_dict(), path, metadata)


def save_tensors(state: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Tensors (a state dict) as safetensors, with `metadata` and the sha256 of the tensors in the
    file's header."""
    from safetensors.torch import save

    from bayeskd.io import atomic_path

    digest, _ = integrity.weights_digests(save(state))
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(state, metadata={**(metadata or {}), integrity.DIGEST_KEY: digest}))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata that save_weights wrote into a weights file's header ({} if none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # as in read_weights: safetensors raises several kinds
        raise WeightsError(f"cannot read {path}: {str(e).splitlines()[0][:200] or type(e).__name__}; "
                           f"{integrity.remedy(path)}") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose content matches the sha256 in its metadata;
    WeightsError naming the file, what is wrong and the command that restores it otherwise."""
    from safetensors.torch import load

    try:
        raw = Path(path).read_bytes()
        actual, recorded = integrity.weights_digests(raw)
        tensors = load(raw)
    except Exception as e:  # a missing, truncated or foreign file: safetensors raises several kinds
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0][:200] or type(e).__name__
        raise WeightsError(f"cannot read {path}: {reason}; {integrity.remedy(path)}") from None
    if actual != recorded:
        why = ("no sha256 in its metadata" if recorded is None
               else "its tensors do not match the sha256 in its metadata")
        raise WeightsError(f"{path}: damaged ({why}); {integrity.remedy(path)}")
    return tensors


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    tensors = read_weights(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # keys or shapes of another net
        raise WeightsError(f"{path} holds the weights of another net: {str(e).splitlines()[0]}") from None
    return model.eval()
