"""Distillation methods, registered by name.

Logit methods (this module) need only the teacher's logits, so they run from the logit cache. Each is
a function `(student_logits, teacher_logits, targets, epoch, **hparams) -> {term: loss}`; the training
loop sums the terms and logs each. Feature methods (bayeskd.feature) need the teacher's
intermediate features and run the teacher online. A method's keyword-only arguments and their
defaults are its hyperparameters: params.yaml lists them under `student.<method>`.

`epoch` counts from 1, as the reference code does: DKD's warm-up weight min(epoch / 20, 1) is 0.05 in
the first epoch and 0 at epoch 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bayeskd import feature
from bayeskd.losses import soft_kl

LogitMethod = Callable[..., dict[str, Tensor]]


def standardize(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): (z - mean) / (std + 1e-7) over the classes, with
    the Bessel-corrected std. Invariant to shifting and (up to the 1e-7) scaling the logits."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def none(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
         epoch: int = 0) -> dict[str, Tensor]:
    """The baseline: the student learns from the labels alone."""
    return {"ce": F.cross_entropy(student_logits, targets)}


def kd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0, *,
       temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
       standardize_logits: bool = False) -> dict[str, Tensor]:
    """Hinton et al. 2015: ce_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T)."""
    s, t = student_logits, teacher_logits.float()
    if standardize_logits:
        s, t = standardize(s), standardize(t)
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets),
            "kd": kd_weight * soft_kl(s, t, temperature)}


def lskd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0, *,
         temperature: float = 2.0, ce_weight: float = 0.1, kd_weight: float = 9.0) -> dict[str, Tensor]:
    """KD on standardised logits (Sun et al., CVPR 2024): 0.1 * CE(raw student logits)
    + 9 * T^2 * KL(softmax(standardize(t) / T) || softmax(standardize(s) / T)), T = 2."""
    return kd(student_logits, teacher_logits, targets, epoch, temperature=temperature, ce_weight=ce_weight,
              kd_weight=kd_weight, standardize_logits=True)


def dkd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0, *,
        temperature: float = 4.0, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
        warmup: int = 20, standardize_logits: bool = False) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD).
    TCKD: T^2 * KL between the binary (target, rest) probabilities; NCKD: T^2 * KL between the
    softmaxes over the non-target classes alone."""
    s, t = student_logits, teacher_logits.float()
    if standardize_logits:
        s, t = standardize(s), standardize(t)
    s, t = s / temperature, t / temperature
    target = F.one_hot(targets, s.shape[1]).bool()

    def binary(z: Tensor) -> Tensor:  # log [p_target, 1 - p_target]
        log_p = F.log_softmax(z, dim=1)
        return torch.stack([log_p[target], torch.logsumexp(log_p.masked_fill(target, -torch.inf), 1)], 1)

    def others(z: Tensor) -> Tensor:  # the non-target logits
        return z[~target].view(len(z), -1)

    tckd = F.kl_div(binary(s), binary(t), reduction="batchmean", log_target=True)
    nckd = soft_kl(others(s), others(t), 1.0)
    ramp = min(epoch / warmup, 1.0) * temperature**2
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets),
            "tckd": ramp * alpha * tckd, "nckd": ramp * beta * nckd}


def _mean_pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Mean Pearson correlation of a and b along `dim`, as the cosine of the centred vectors."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return ((a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)).mean()


def dist(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int = 0, *,
         tau: float = 4.0, ce_weight: float = 1.0, beta: float = 2.0,
         gamma: float = 2.0) -> dict[str, Tensor]:
    """DIST (Huang et al., NeurIPS 2022): CE + tau^2 * (beta * (1 - mean Pearson of each sample's class
    probabilities) + gamma * (1 - mean Pearson of each class's probabilities over the batch)), on
    softmax(z / tau); beta = gamma = 2 as the reference code uses on CIFAR."""
    p_s, p_t = F.softmax(student_logits / tau, dim=1), F.softmax(teacher_logits.float() / tau, dim=1)
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets),
            "inter": tau**2 * beta * (1 - _mean_pearson(p_s, p_t, 1)),
            "intra": tau**2 * gamma * (1 - _mean_pearson(p_s, p_t, 0))}


METHODS: dict[str, LogitMethod] = {"none": none, "kd": kd, "dkd": dkd, "dist": dist, "lskd": lskd}


def hparams(name: str) -> dict[str, float | int | bool]:
    """Method `name`'s hyperparameters and their defaults (logit or feature method)."""
    if name in METHODS:
        fn = METHODS[name]
    elif name in feature.METHODS:
        fn = feature.METHODS[name].__init__
    else:
        known = ", ".join(all_methods())
        raise ValueError(f"distillation method {name!r} is not known; expected one of {known}")
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def all_methods() -> list[str]:
    return [*METHODS, *feature.METHODS]


def loss_terms(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> dict[str, Tensor]:
    """The named loss terms of logit method `name`."""
    if name not in METHODS:
        known = ", ".join(METHODS)
        raise ValueError(f"logit distillation method {name!r} is not known; expected one of {known}")
    return METHODS[name](student_logits, teacher_logits, targets, epoch, **hparams)


def logit_loss(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> Tensor:
    """The method's full training loss, with its defaults unless overridden."""
    return sum(loss_terms(name, student_logits, teacher_logits, targets, epoch, **hparams).values())
