"""What every feature-based method shares: the method base, stage pairing, float32 relations."""

from __future__ import annotations

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
    hyperparameters (declared with the class, `@method(name, ..., weight=Float(...), ...)`: these are
    the method's params.yaml keys). Their trainable parts (connectors, heads) and buffers (memory
    banks) are submodules: they train with the student, are saved in its checkpoint, and are not part
    of the exported student.

    A call returns named loss terms: "ce" (ce_weight * cross-entropy on the labels) and the method's
    own, which `terms` computes. `epoch` counts from 0."""

    # flags, set by the method's declaration (bayeskd.declare.MethodDecl)
    single_process = False  # True: the method's state cannot be shared by DDP processes
    uses_stages = True  # False: the pre-logit vectors are all it needs
    in_float32 = False  # True: `terms` runs outside autocast on float32 features

    def __init__(self, ce_weight: float):
        super().__init__()
        self.ce_weight = ce_weight

    def forward(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        ce = {"ce": self.ce_weight * F.cross_entropy(s.logits, batch.y)}
        if self.in_float32:
            return ce | terms_in_float32(self, s, t, batch, epoch)
        return ce | self.terms(s, t, batch, epoch)

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError


def _wide(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_float(f: Features) -> Features:
    return Features(_wide(f.logits), [_wide(x) for x in f.stages], _wide(f.pooled), f.rerun)


def terms_in_float32(method: FeatureMethod, s: Features, t: Features, batch: Batch,
                     epoch: int) -> dict[str, Tensor]:
    """`method.terms` outside autocast on float32 features: batch relations computed in bf16 lose too
    much (PKT's term, for one, comes out several times off)."""
    with torch.autocast(s.pooled.device.type, enabled=False):
        return method.terms(_as_float(s), _as_float(t), batch, epoch)
