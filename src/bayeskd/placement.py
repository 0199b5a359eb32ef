"""The placement policy that every stage shares: which device runs the work, and how nets and data
are placed and run there.

- Device (`compute.device`): `auto` is CUDA when a GPU is visible (the process's own GPU,
  LOCAL_RANK, under torchrun), else the CPU; `cpu` and `cuda` insist. Training, the cache build,
  distillation, evaluation and export all run on it.
- What fits: a tensor (the training set, the logit cache) is held on a CUDA device when it takes
  less than half the device's free memory; otherwise it stays in host memory.
- Training precision and layout: bf16 autocast and channels_last for images on CUDA, neither on the
  CPU (both are switches of bayeskd.train.fit, so their logic also runs on the CPU).
- The teacher (`Teacher`), wherever a student learns from it (the cache build, online KD, the
  feature methods): eval mode, no gradients, float32 outside any autocast, images in channels_last,
  on every device. One forward for all three, so cached and online supervision are the same numbers.
- Prediction (evaluate, export's parity check, validation): float32, in batches on the device.

The stand-in devices of the tests (`meta`) pass through `choose` as they are.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn

from bayeskd.config import DEVICES
from bayeskd.io import Failure


class DeviceError(Failure):
    """The device asked for is not there."""


def choose(name: str | torch.device = "auto") -> torch.device:
    """The device of `compute.device`: auto, cpu or cuda (a torch.device passes through)."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise DeviceError(f"compute.device = {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("compute.device = 'cuda', but no CUDA device is visible "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` may be held on `device`: under half the free memory of a CUDA device; on
    the CPU (and the stand-in devices) always."""
    return device.type != "cuda" or nbytes < torch.cuda.mem_get_info(device)[0] // 2


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `enabled`; else autocast switched off there (it may be on
    around the call: the teacher runs inside a student's step)."""
    kind = "cuda" if device.type == "cuda" else "cpu"  # the stand-in devices have no autocast of their own
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


def image_layout(x: Tensor, channels_last: bool) -> torch.memory_format:
    """channels_last for a batch of images when asked, else the layout the tensor has."""
    return torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format


class Teacher(nn.Module):
    """A trained net as students learn from it, on `device`: eval mode, no gradients, float32 outside
    any autocast, images (and its weights) in channels_last. It declares the net's feature taps, so
    the feature methods read its features through this same forward."""

    def __init__(self, net: nn.Module, device: torch.device):
        super().__init__()
        self.device = device
        self.net = net.requires_grad_(False).to(device, memory_format=torch.channels_last)
        if hasattr(net, "taps"):
            self.taps = net.taps.under("net")
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # never trains: its batch norm keeps the running statistics

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad(), autocast(x.device, enabled=False):
            return self.net(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def rng_state(device: torch.device) -> list[Tensor]:
    """The random states a training step draws from: torch's CPU generator and, on CUDA, the device's."""
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])]


def set_rng_state(states: list[Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)
