"""Distillation: `distiller`, the one place that turns a method name into the student's training loss.

The methods are in bayeskd.methods, each declared with its hyperparameters and their defaults
(params.yaml lists them under `student.<method>`). Logit methods return named loss terms from the
student's and the teacher's logits; the training loop sums the terms and logs each. Feature methods
need the teacher's intermediate features and run the teacher online.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayeskd import methods, placement
from bayeskd.batch import Batch, LossFn
from bayeskd.cache import LogitCache
from bayeskd.placement import Teacher
from bayeskd.taps import Extractor

METHODS: dict[str, Callable[..., dict[str, Tensor]]] = methods.LOGIT  # they run from the logit cache


def loss_terms(name: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               epoch: int = 0, **hparams: float) -> dict[str, Tensor]:
    """The named loss terms of logit method `name`, with its declared defaults unless overridden."""
    if name not in METHODS:
        known = ", ".join(METHODS)
        raise ValueError(f"logit distillation method {name!r} is not known; expected one of {known}")
    hp = methods.METHODS[name].defaults() | hparams
    return METHODS[name](student_logits, teacher_logits, targets, epoch, **hp)


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
    hp = methods.METHODS[method].defaults() | (hparams or {})
    if method in METHODS:
        fn = METHODS[method]
        if cache is not None:
            def cached(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
                teacher_logits = cache.logits(batch.idx, batch.slots, batch.host_idx, batch.host_slots)
                return fn(logits, teacher_logits, batch.y, epoch, **hp)

            return Distiller(cached, view_table=cache.view_table)
        if teacher is None:
            raise ValueError(f"{method} needs the teacher's logits: give a logit cache or the teacher")
        frozen = Teacher(teacher, placement.choose(device))

        def online(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
            return fn(logits, frozen(batch.x), batch.y, epoch, **hp)

        return Distiller(online)

    if teacher is None:
        raise ValueError(f"{method} needs the teacher's features: give the teacher")
    frozen = Teacher(teacher, placement.choose(device))
    method_parts = methods.build(method, student, frozen, in_shape, num_samples, **hp)
    if method_parts.single_process and processes > 1:
        raise ValueError(f"{method} runs in one process only (compute.processes = {processes}; set it to 1)")
    student_features, teacher_features = Extractor(student), Extractor(frozen)

    def features(logits: Tensor, batch: Batch, epoch: int) -> dict[str, Tensor]:
        return method_parts(student_features.last(logits), teacher_features(batch.x), batch, epoch)

    return Distiller(features, extra=method_parts)
