"""What every feature-based method shares: the method base, stage pairing, float32 relations, and
average pooling with a deterministic CUDA backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd import placement
from bayeskd.batch import Batch
from bayeskd.taps import Features


def paired(student: list[Tensor], teacher: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The deepest min(len) entries of both lists, paired in order: nets with fewer stages are
    matched from the top, where the features are closest to the output."""
    n = min(len(student), len(teacher))
    return list(zip(student[len(student) - n :], teacher[len(teacher) - n :], strict=True))


def mean_pool(x: Tensor, size: tuple[int, int]) -> Tensor:
    """`x` (N x C x H x W) average-pooled to `size`: each output the mean of an equal window. Equal,
    bit for bit on the CPU, to adaptive average pooling, whose CUDA backward is nondeterministic
    (atomic adds); these have deterministic ones. Sizes that do not divide the map's fall back to
    adaptive pooling (nondeterministic on CUDA; no pair of the zoo's nets on 32x32 images needs it)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if tuple(size) == (1, 1):
        return x.mean((2, 3), keepdim=True)
    if h % size[0] or w % size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.avg_pool2d(x, (h // size[0], w // size[1]))


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
    with placement.autocast(s.pooled.device, enabled=False):
        return method.terms(_as_float(s), _as_float(t), batch, epoch)
