"""What every feature-based method shares: the method base, stage pairing, float32 relations."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.taps import Features


def paired(student: list[Tensor], teacher: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The deepest min(len) entries of both lists, paired in order: nets with fewer stages are
    matched from the top, where the features are closest to the output."""
    n = min(len(student), len(teacher))
    return list(zip(student[len(student) - n :], teacher[len(teacher) - n :], strict=True))


class FeatureMethod(nn.Module):
    """A feature-based KD method. Subclasses take, in this order, the student's and the teacher's
    `Features` of a probe batch (for shapes), the number of training samples, and keyword-only
    hyperparameters with their defaults (these are the method's params.yaml keys). Their trainable
    parts (connectors, heads) and buffers (memory banks) are submodules: they train with the student,
    are saved in its checkpoint, and are not part of the exported student.

    A call returns named loss terms: "ce" (ce_weight * cross-entropy on the labels) and the method's
    own, which `terms` computes."""

    single_process = False  # True: the method's state cannot be shared by DDP processes
    uses_stages = True  # False: the pre-logit vectors are all it needs

    def __init__(self, ce_weight: float):
        super().__init__()
        self.ce_weight = ce_weight

    def forward(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        """`epoch` counts from 1, as the reference code does (warm-ups reach full weight at epoch w)."""
        return {"ce": self.ce_weight * F.cross_entropy(s.logits, batch.y)} | self.terms(s, t, batch, epoch)

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError


Terms = Callable[[FeatureMethod, Features, Features, Batch, int], dict[str, Tensor]]


def in_float32(terms: Terms) -> Terms:
    """`terms` run outside autocast on float32 features: batch relations computed in bf16 lose too much
    (PKT's term, for one, comes out several times off)."""

    def wide(x: Tensor) -> Tensor:
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def as_float(f: Features) -> Features:
        return Features(wide(f.logits), [wide(x) for x in f.stages], wide(f.pooled), f.rerun)

    @functools.wraps(terms)
    def run(self: FeatureMethod, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        with torch.autocast(s.pooled.device.type, enabled=False):
            return terms(self, as_float(s), as_float(t), batch, epoch)

    return run
