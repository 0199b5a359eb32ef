"""Distillation: the logit methods, and `distiller`, the one place that turns a method name into the
student's training loss.

Logit methods need only the teacher's logits, so they run from the logit cache. Each is a function
`(student_logits, teacher_logits, targets, epoch, **hparams) -> {term: loss}`; the training loop sums
the terms and logs each. Feature methods (bayeskd.feature) need the teacher's intermediate features
and run the teacher online. A method's hyperparameters are its keyword-only arguments; their
defaults live in the params schema (bayeskd.config), which params.yaml lists under `student.<method>`.

`epoch` counts from 1 in the methods, as the reference code does: DKD's warm-up weight
min(epoch / 20, 1) is 0.05 in the first epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd import config, feature, placement
from bayeskd.batch import Batch, LossFn
from bayeskd.cache import LogitCache
from bayeskd.losses import soft_kl
from bayeskd.placement import Teacher
from bayeskd.taps import Extractor

LogitMethod = Callable[..., dict[str, Tensor]]


def standardize(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): (z - mean) / (std + 1e-7) over the classes, with
    the Bessel-corrected std. Invariant to shifting and (up to the 1e-7) scaling the logits."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def none(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int) -> dict[str, Tensor]:
    """The baseline: the student learns from the labels alone."""
    return {"ce": F.cross_entropy(student_logits, targets)}


def _kd(raw: Tensor, s: Tensor, t: Tensor, targets: Tensor, temperature: float, ce_weight: float,
        kd_weight: float) -> dict[str, Tensor]:
    return {"ce": ce_weight * F.cross_entropy(raw, targets), "kd": kd_weight * soft_kl(s, t, temperature)}


def kd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
       temperature: float, ce_weight: float, kd_weight: float) -> dict[str, Tensor]:
    """Hinton et al. 2015: ce_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T)."""
    return _kd(student_logits, student_logits, teacher_logits.float(), targets, temperature, ce_weight,
               kd_weight)


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
    ramp = min(epoch / warmup, 1.0) * temperature**2
    return {"ce": ce_weight * F.cross_entropy(raw, targets), "tckd": ramp * alpha * tckd,
            "nckd": ramp * beta * nckd}


def dkd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
        temperature: float, ce_weight: float, alpha: float, beta: float, warmup: int) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD).
    TCKD: T^2 * KL between the binary (target, rest) probabilities; NCKD: T^2 * KL between the
    softmaxes over the non-target classes alone."""
    return _dkd(student_logits, student_logits, teacher_logits.float(), targets, epoch, temperature,
                ce_weight, alpha, beta, warmup)


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


def dist(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, epoch: int, *,
         tau: float, ce_weight: float, beta: float, gamma: float) -> dict[str, Tensor]:
    """DIST (Huang et al., NeurIPS 2022): CE + tau^2 * (beta * (1 - mean Pearson of each sample's class
    probabilities) + gamma * (1 - mean Pearson of each class's probabilities over the batch)), on
    softmax(z / tau); beta = gamma = 2 as the reference code uses on CIFAR."""
    p_s, p_t = F.softmax(student_logits / tau, dim=1), F.softmax(teacher_logits.float() / tau, dim=1)
    return {"ce": ce_weight * F.cross_entropy(student_logits, targets),
            "inter": tau**2 * beta * (1 - _mean_pearson(p_s, p_t, 1)),
            "intra": tau**2 * gamma * (1 - _mean_pearson(p_s, p_t, 0))}


METHODS: dict[str, LogitMethod] = {"none": none, "kd": kd, "dkd": dkd, "dist": dist, "lskd": lskd,
                                   "lsdkd": lsdkd}
config.check_registry("distillation method", config.METHODS, {*METHODS, *feature.METHODS})


def loss_terms(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> dict[str, Tensor]:
    """The named loss terms of logit method `name`, with its params.yaml defaults unless overridden."""
    if name not in METHODS:
        known = ", ".join(METHODS)
        raise ValueError(f"logit distillation method {name!r} is not known; expected one of {known}")
    return METHODS[name](student_logits, teacher_logits, targets, epoch, **(config.hparams(name) | hparams))


def logit_loss(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> Tensor:
    """The method's full training loss, with its defaults unless overridden."""
    return sum(loss_terms(name, student_logits, teacher_logits, targets, epoch, **hparams).values())


@dataclass
class Distiller:
    """What `train.fit` needs to distill a student: the loss, the method's own trainable parts (for
    feature methods), and the view table the loop must draw from (a cache's, for cached methods)."""

    loss_fn: LossFn
    extra: nn.Module | None = None
    view_table: Tensor | None = None


def distiller(method: str, student: nn.Module, *, hparams: dict | None = None,
              cache: LogitCache | None = None, teacher: nn.Module | None = None,
              in_shape: Sequence[int] = (), num_samples: int = 0, processes: int = 1,
              device: torch.device | str = "auto") -> Distiller:
    """The student's training loss for `method` (hyperparameters: its defaults, then `hparams`).

    A logit method reads the teacher's logits of each drawn view from `cache` (held on the training
    device), with no teacher forward; without a cache it runs `teacher` on each batch (online KD,
    for comparison). A feature method runs `teacher` for its features and never needs a cache; it
    is sized for `in_shape` and `num_samples` training samples. The teacher runs on `device` as
    bayeskd.placement.Teacher declares (float32, outside the student's autocast, channels_last),
    the same forward that built the cache. Raises ValueError when the method cannot distill this
    pair or cannot run in `processes` processes.
    """
    hp = config.hparams(method) | (hparams or {})
    if method in METHODS:
        fn = METHODS[method]
        if cache is not None:
            def cached(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
                return fn(logits, cache.logits(batch.idx, batch.slots), batch.y, epoch + 1, **hp)

            return Distiller(cached, view_table=cache.view_table)
        if teacher is None:
            raise ValueError(f"{method} needs the teacher's logits: give a logit cache or the teacher")
        frozen = Teacher(teacher, placement.choose(device))

        def online(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
            return fn(logits, frozen(batch.x), batch.y, epoch + 1, **hp)

        return Distiller(online)

    if teacher is None:
        raise ValueError(f"{method} needs the teacher's features: give the teacher")
    frozen = Teacher(teacher, placement.choose(device))
    method_parts = feature.build(method, student, frozen, in_shape, num_samples, **hp)
    if method_parts.single_process and processes > 1:
        raise ValueError(f"{method} runs in one process only (compute.processes = {processes}; set it to 1)")
    student_features, teacher_features = Extractor(student), Extractor(frozen)

    def features(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
        return method_parts(student_features.last(logits), teacher_features(batch.x), batch, epoch + 1)

    return Distiller(features, extra=method_parts)
