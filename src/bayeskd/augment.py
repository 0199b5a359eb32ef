"""The standard CIFAR augmentation as a finite, indexed view space.

Random crop of the original size from the image zero-padded by `p` pixels, then a random horizontal
flip: (2p + 1)^2 crop offsets x 2 flips. View v names one of them:
v = (top * (2p + 1) + left) * 2 + flip, with top, left in [0, 2p] the crop's corner in the padded
image. `apply` takes a batch of images and one view per image and works on any device, so the same
function serves training (a random view per sample and step) and the teacher-output cache (every
view, or a fixed set of views, of every sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CropFlip:
    padding: int = 4

    @property
    def side(self) -> int:
        return 2 * self.padding + 1

    @property
    def num_views(self) -> int:
        return self.side * self.side * 2

    def spec(self) -> dict:
        """What defines the views; recorded in cache manifests."""
        return {"name": "crop_flip", "padding": self.padding, "views": self.num_views}

    def decode(self, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(top, left, flip) of each view."""
        flip = views % 2
        offset = views // 2
        return offset // self.side, offset % self.side, flip.bool()

    def apply(self, x: Tensor, views: Tensor) -> Tensor:
        """Views of a batch: x (B, C, H, W), views (B,) integers in [0, num_views). The range is
        checked without a wait for the device: at once on the CPU, by the device on a GPU."""
        views = views.to(x.device)
        torch._assert_async(((views >= 0) & (views < self.num_views)).all(),
                            f"views must lie in [0, {self.num_views})")
        b, _, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        top, left, flip = self.decode(views)
        rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = torch.arange(w, device=x.device).expand(b, w)
        cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # flip folds into columns
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)  # a channels_last view of the gathered (B, H, W, C) block

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """One uniformly drawn view per sample."""
        return torch.randint(0, self.num_views, (n,), generator=generator)
