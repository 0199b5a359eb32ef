"""Logit methods: they need only the teacher's logits, so they run from the logit cache. Each is a
function `(student_logits, teacher_logits, targets, epoch, **hparams) -> {term: loss}`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bayeskd.declare import Float, Int, method
from bayeskd.losses import soft_kl


def standardize(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): (z - mean) / (std + 1e-7) over the classes, with
    the Bessel-corrected std. Invariant to shifting and (up to the 1e-7) scaling the logits."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


@method("none")
def none(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int) -> dict[str, Tensor]:
    """The baseline: the student learns from the labels alone."""
    return {"ce": F.cross_entropy(student_logits, targets)}


def _kd(raw: Tensor, s: Tensor, t: Tensor, targets: Tensor, temperature: float, ce_weight: float,
        kd_weight: float) -> dict[str, Tensor]:
    return {"ce": ce_weight * F.cross_entropy(raw, targets), "kd": kd_weight * soft_kl(s, t, temperature)}


@method("kd", temperature=Float(4.0, gt=0), ce_weight=Float(0.1, ge=0), kd_weight=Float(0.9, ge=0))
def kd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
       temperature: float, ce_weight: float, kd_weight: float) -> dict[str, Tensor]:
    """Hinton et al. 2015: ce_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T)."""
    return _kd(student_logits, student_logits, teacher_logits.float(), targets, temperature, ce_weight,
               kd_weight)


@method("lskd", temperature=Float(2.0, gt=0), ce_weight=Float(0.1, ge=0), kd_weight=Float(9.0, ge=0))
def lskd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
         temperature: float, ce_weight: float, kd_weight: float) -> dict[str, Tensor]:
    """KD on standardised logits (Sun et al., CVPR 2024): ce_weight * CE(raw student logits)
    + kd_weight * T^2 * KL(softmax(standardize(t) / T) || softmax(standardize(s) / T))."""
    return _kd(student_logits, standardize(student_logits), standardize(teacher_logits.float()), targets,
               temperature, ce_weight, kd_weight)


def _dkd(raw: Tensor, s: Tensor, t: Tensor, targets: Tensor, epoch: int, temperature: float,
         ce_weight: float, alpha: float, beta: float, warmup: int) -> dict[str, Tensor]:
    s, t = s / temperature, t / temperature
    target = F.one_hot(targets, s.shape[1]).bool()
    rest = torch.arange(s.shape[1] - 1, device=s.device)
    rest = rest + (rest >= targets[:, None])  # the non-target classes of each sample, in order

    def binary(z: Tensor) -> Tensor:  # log [p_target, 1 - p_target]
        log_p = F.log_softmax(z, dim=1)
        return torch.stack([log_p.gather(1, targets[:, None])[:, 0],
                            torch.logsumexp(log_p.masked_fill(target, -torch.inf), 1)], 1)

    def others(z: Tensor) -> Tensor:  # the non-target logits (a boolean mask would wait for the device)
        return z.gather(1, rest)

    tckd = F.kl_div(binary(s), binary(t), reduction="batchmean", log_target=True)
    nckd = soft_kl(others(s), others(t), 1.0)
    # the reference counts epochs from 1: its weight min(epoch / warmup, 1) is 1 / warmup in the first
    ramp = min((epoch + 1) / warmup, 1.0) * temperature**2
    return {"ce": ce_weight * F.cross_entropy(raw, targets), "tckd": ramp * alpha * tckd,
            "nckd": ramp * beta * nckd}


@method("dkd", temperature=Float(4.0, gt=0), ce_weight=Float(1.0, ge=0), alpha=Float(1.0, ge=0),
        beta=Float(8.0, ge=0), warmup=Int(20, gt=0))
def dkd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
        temperature: float, ce_weight: float, alpha: float, beta: float, warmup: int) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): CE + min((epoch + 1) / warmup, 1) * (alpha * TCKD
    + beta * NCKD). TCKD: T^2 * KL between the binary (target, rest) probabilities; NCKD: T^2 * KL
    between the softmaxes over the non-target classes alone."""
    return _dkd(student_logits, student_logits, teacher_logits.float(), targets, epoch, temperature,
                ce_weight, alpha, beta, warmup)


@method("lsdkd", temperature=Float(2.0, gt=0), ce_weight=Float(1.0, ge=0), alpha=Float(9.0, ge=0),
        beta=Float(72.0, ge=0), warmup=Int(20, gt=0))
def lsdkd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
          temperature: float, ce_weight: float, alpha: float, beta: float, warmup: int) -> dict[str, Tensor]:
    """DKD on standardised logits (Sun et al., CVPR 2024), with that paper's own defaults: DKD's weights
    scaled by its KD weight 9 and base temperature 2; CE on the raw student logits."""
    return _dkd(student_logits, standardize(student_logits), standardize(teacher_logits.float()), targets,
                epoch, temperature, ce_weight, alpha, beta, warmup)


def _mean_pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Mean Pearson correlation of a and b along `dim`, as the cosine of the centred vectors."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return ((a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)).mean()


@method("dist", tau=Float(4.0, gt=0), ce_weight=Float(1.0, ge=0), beta=Float(2.0, ge=0),
        gamma=Float(2.0, ge=0))
def dist(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
         tau: float, ce_weight: float, beta: float, gamma: float) -> dict[str, Tensor]:
    """DIST (Huang et al., NeurIPS 2022): CE + tau^2 * (beta * (1 - mean Pearson of each sample's class
    probabilities) + gamma * (1 - mean Pearson of each class's probabilities over the batch)), on
    softmax(z / tau); beta = gamma = 2 as the reference code uses on CIFAR."""
    p_s, p_t = F.softmax(student_logits / tau, dim=1), F.softmax(teacher_logits.float() / tau, dim=1)
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets),
            "inter": tau**2 * beta * (1 - _mean_pearson(p_s, p_t, 1)),
            "intra": tau**2 * gamma * (1 - _mean_pearson(p_s, p_t, 0))}
