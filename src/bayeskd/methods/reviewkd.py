"""Knowledge review (Chen, Liu, Zhao, Jia, CVPR 2021: "Distilling Knowledge via Knowledge Review")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.declare import Float, Int, method
from bayeskd.methods.base import FeatureMethod, Features, mean_pool, paired

HCL_LEVELS = (4, 2, 1)


def hcl(fs: Tensor, ft: Tensor) -> Tensor:
    """Hierarchical context loss of one pair of maps: the MSE at full size, plus the MSEs after average
    pooling both to 4x4, 2x2 and 1x1 (only the levels smaller than the map), weighted 1, 1/2, 1/4, ...
    and divided by the sum of the weights used."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= fs.shape[-2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(mean_pool(fs, (level, level)), mean_pool(ft, (level, level)))
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion. A 1x1 conv + BN takes the student map to `mid` channels; given the
    residual from the deeper level (resized to this map), a 1x1 conv + sigmoid gives two per-pixel
    weights and the two maps are mixed with them. The mix, resized to the teacher's size, is the
    residual passed to the shallower level, and a 3x3 conv + BN maps it to the teacher's channels."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        self.project = nn.Sequential(
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            a = self.attention(torch.cat([x, residual], 1))
            x = x * a[:, :1] + residual * a[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


def _as_map(v: Tensor) -> Tensor:
    return v.flatten(1)[:, :, None, None]


@method("reviewkd", weight=Float(1.0, ge=0), ce_weight=Float(1.0, ge=0), warmup=Int(20, gt=0),
        max_mid_channels=Int(512, gt=0))
class ReviewKD(FeatureMethod):
    """ReviewKD (Chen et al., CVPR 2021). The paired stages plus the pooled vector (as a 1x1 map) are
    the levels, shallow to deep. ABF fuses the student's levels from deep to shallow, each output at
    its teacher level's size and channels: F_i = ABF_i(S_i, residual_{i+1}). Loss:
    weight * min((epoch + 1) / warmup, 1) * sum_i HCL(F_i, T_i).

    ABF width: min(max_mid_channels, the student's pooled width), as the reference code (so 256 for
    resnet8x4, 64 for resnet8, 16 for the tiny cnn_student). Maps are resized with nearest-neighbour
    interpolation, as the reference code does.

    Deviations: both nets' levels are their tapped stage outputs (post-activation); the reference
    code takes the teacher's pre-activation features. The reference scripts tune the weight per pair
    (0.6 to 8); the default here is 1."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, warmup: int, max_mid_channels: int):
        super().__init__(ce_weight)
        self.weight = weight
        self.warmup = warmup
        pairs = self.levels(student, teacher)
        mid = min(max_mid_channels, student.pooled.flatten(1).shape[1])
        self.abfs = nn.ModuleList(
            ABF(fs.shape[1], mid, ft.shape[1], fuse=i > 0) for i, (fs, ft) in enumerate(reversed(pairs))
        )

    @staticmethod
    def levels(s: Features, t: Features) -> list[tuple[Tensor, Tensor]]:
        """(student, teacher) maps, shallow to deep: the paired stages, then the pooled vectors."""
        return [*paired(s.stages, t.stages), (_as_map(s.pooled), _as_map(t.pooled))]

    def review(self, student: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
        """The student's levels (given shallow to deep) fused from deep to shallow, returned shallow
        to deep, each at the size in `sizes`."""
        fused, residual = [], None
        for abf, x, size in zip(self.abfs, reversed(student), reversed(sizes), strict=True):
            out, residual = abf(x, residual, size)
            fused.append(out)
        return fused[::-1]

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        pairs = self.levels(s, t)
        fused = self.review([fs for fs, _ in pairs], [tuple(ft.shape[-2:]) for _, ft in pairs])
        loss = sum(hcl(f, ft.detach()) for f, (_, ft) in zip(fused, pairs, strict=True))
        # the reference counts epochs from 1: its weight min(epoch / warmup, 1) is 1 / warmup in the first
        return {"reviewkd": self.weight * min((epoch + 1) / self.warmup, 1.0) * loss}
