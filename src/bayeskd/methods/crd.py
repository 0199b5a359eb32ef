"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.declare import Float, Int, method
from bayeskd.methods.base import FeatureMethod, Features


class MemoryBank(nn.Module):
    """One embedding per training sample (num_samples x dim), initialised uniformly in
    [-1/sqrt(dim/3), 1/sqrt(dim/3)] and refreshed as row_i <- normalize(m * row_i + (1 - m) * e_i)."""

    def __init__(self, num_samples: int, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("rows", (torch.rand(num_samples, dim) * 2 - 1) * bound)

    def forward(self, idx: Tensor) -> Tensor:
        return self.rows[idx]

    @torch.no_grad()
    def update(self, idx: Tensor, embedding: Tensor) -> None:
        mixed = self.momentum * self.rows[idx] + (1 - self.momentum) * embedding.detach().float()
        self.rows[idx] = F.normalize(mixed, dim=1)


def nce_loss(p: Tensor, num_samples: int) -> Tensor:
    """The NCE loss of the paper on scores p (B x (1 + K): the positive first, then K negatives), with
    uniform noise P_n = 1/N over the N samples: h = p / (p + K/N), and
    L = -mean_b [log h(positive) + sum_k log(1 - h(negative_k))]."""
    c = (p.shape[1] - 1) / num_samples
    positive = torch.log(p[:, 0] / (p[:, 0] + c))
    negatives = torch.log(c / (p[:, 1:] + c)).sum(1)
    return -(positive + negatives).mean()


@method("crd", single_process=True,  # memory banks per sample
        uses_stages=False, in_float32=True, weight=Float(0.8, ge=0), ce_weight=Float(1.0, ge=0),
        feat_dim=Int(128, gt=0), nce_k=Int(16384, gt=0), nce_t=Float(0.07, gt=0),
        nce_m=Float(0.5, ge=0, le=1))
class CRD(FeatureMethod):
    """CRD (Tian, Krishnan, Isola, ICLR 2020). The pooled vectors are embedded, e_s = normalize(W_s f_s)
    and e_t = normalize(W_t f_t), and each is contrasted against the other net's memory bank: for
    sample i, the bank row of i is the positive and K rows of other samples, drawn uniformly, are the
    negatives, scored p = exp(<row, e> / nce_t) / Z (Z = N * the mean score of the first batch, then
    fixed). Loss: weight * (NCE(e_s vs teacher bank) + NCE(e_t vs student bank)), the paper's NCE
    loss (`nce_loss`), not the InfoNCE/softmax variant. The banks then take e_s and e_t for the
    batch's samples with momentum nce_m (in training mode only).

    Deviation: the reference CIFAR code draws the negatives without replacement from the samples of
    other classes; here they are drawn i.i.d. uniformly (with replacement, the noise NCE assumes) from
    all other samples, since the labels of the training set are not at hand; K = min(nce_k, N - 1)."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, feat_dim: int, nce_k: int, nce_t: float,
                 nce_m: float):
        super().__init__(ce_weight)
        if num_samples < 2:
            raise ValueError(f"CRD needs at least 2 training samples for negatives; got {num_samples}")
        self.weight = weight
        self.num_samples = num_samples
        self.nce_k = min(nce_k, num_samples - 1)
        self.nce_t = nce_t
        self.embed_s = nn.Linear(student.pooled.flatten(1).shape[1], feat_dim)
        self.embed_t = nn.Linear(teacher.pooled.flatten(1).shape[1], feat_dim)
        self.memory_s = MemoryBank(num_samples, feat_dim, nce_m)
        self.memory_t = MemoryBank(num_samples, feat_dim, nce_m)
        self.register_buffer("z", torch.full((2,), -1.0))  # normalising constants; < 0 until the first batch

    def negatives(self, idx: Tensor) -> Tensor:
        """K indices per sample (B x K), uniform with replacement over the other samples, drawn on
        idx's device from its default generator (torch's global one on the CPU)."""
        drawn = torch.randint(self.num_samples - 1, (len(idx), self.nce_k), device=idx.device)
        return drawn + (drawn >= idx[:, None]).long()

    def scores(self, anchor: Tensor, bank: MemoryBank, contrast: Tensor, side: int) -> Tensor:
        e = torch.exp(torch.bmm(bank(contrast), anchor.unsqueeze(2)).squeeze(2) / self.nce_t)
        # Z is set by the first batch, on the device: the step never waits to read it
        z = torch.where(self.z[side] < 0, e.detach().mean() * self.num_samples, self.z[side])
        self.z[side] = z
        return e / z

    def contrast_loss(self, e_s: Tensor, e_t: Tensor, contrast: Tensor) -> Tensor:
        """The two NCE losses for embeddings e_s, e_t (B x feat_dim) and contrast indices (B x (1 + K):
        each sample's own index, then its negatives)."""
        p_s = self.scores(e_s, self.memory_t, contrast, 0)
        p_t = self.scores(e_t, self.memory_s, contrast, 1)
        return nce_loss(p_s, self.num_samples) + nce_loss(p_t, self.num_samples)

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        idx = batch.idx.to(self.z.device)
        contrast = torch.cat([idx[:, None], self.negatives(idx)], 1)
        e_s = F.normalize(self.embed_s(s.pooled.flatten(1)), dim=1)
        e_t = F.normalize(self.embed_t(t.pooled.detach().flatten(1)), dim=1)
        loss = self.contrast_loss(e_s, e_t, contrast)
        if self.training:
            self.memory_s.update(contrast[:, 0], e_s)
            self.memory_t.update(contrast[:, 0], e_t)
        return {"crd": self.weight * loss}
