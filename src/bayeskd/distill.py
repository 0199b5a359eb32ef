"""Distillation methods on logits. Each returns named loss terms; the training loop sums and logs them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def none(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0,
         **_: float) -> dict[str, Tensor]:
    """The baseline: the student learns from the labels alone."""
    return {"ce": F.cross_entropy(student_logits, targets)}


def kd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0, *,
       temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> dict[str, Tensor]:
    """Hinton et al. 2015: ce_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T), KL batch-averaged."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets), "kd": kd_weight * t * t * kl}


METHODS = {"none": none, "kd": kd}


def loss_terms(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> dict[str, Tensor]:
    if name not in METHODS:
        raise ValueError(f"distillation method {name!r} is not known; expected one of {', '.join(METHODS)}")
    return METHODS[name](student_logits, teacher_logits, targets, epoch, **hparams)


def logit_loss(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> Tensor:
    """The method's full training loss, with its defaults unless overridden."""
    return sum(loss_terms(name, student_logits, teacher_logits, targets, epoch, **hparams).values())
