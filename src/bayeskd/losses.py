"""Teacher losses. `mse` is the paper's: squared error between softmax output and one-hot label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bayeskd import config


def ce(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy, averaged over the batch."""
    return F.cross_entropy(logits, targets)


def mse(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """sum_k (softmax(z)_k - onehot(y)_k)^2, summed over classes and averaged over the batch.

    Its population minimiser is the Bayes conditional probability p*(y|x).
    """
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=1).mean()


def ls(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Label-smoothed cross-entropy: target (1 - s) * onehot + s / K."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


# ce_ts trains with CE; the train_teacher stage then fits its temperature (bayeskd.calibration)
TEACHER_LOSSES = {"ce": ce, "mse": mse, "ls": ls, "ce_ts": ce}
config.check_registry("teacher loss", config.TEACHER_LOSSES, TEACHER_LOSSES)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes, batch-averaged:
    the distillation term of Hinton et al. and of the methods built on it."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return t * t * kl
