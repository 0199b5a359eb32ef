"""What the training loop hands a loss: the batch record and the loss and hook types. A leaf module:
it imports nothing else of bayeskd, so losses, methods and the loop can all depend on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    x: Tensor  # inputs, augmented when training with views
    y: Tensor
    idx: Tensor  # sample indices into the training set
    slots: Tensor | None = None  # per sample: the column of the view table drawn
    views: Tensor | None = None  # per sample: the view id applied to x
    # idx and slots in host memory, where the loop draws them: a reader of data held there (a logit
    # cache too large for the device) gathers with them without waiting for the device
    host_idx: Tensor | None = None
    host_slots: Tensor | None = None


# loss_fn(logits, batch, epoch) -> named loss terms, summed for the gradient; epoch counts from 0
LossFn = Callable[[Tensor, Batch, int], dict[str, Tensor]]
# on_epoch(epoch, metrics), epoch counting from 0
EpochHook = Callable[[int, dict[str, float]], None]
